"""Kernels: the fast mask paths must give exactly the pixels of a full upsample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.kernels import float32_below, masked_pixels, row_bands_exact, skip_bound


def full_pixels(maps: torch.Tensor, t32: torch.Tensor, size) -> set[tuple[int, int]]:
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    q, pix = torch.nonzero((up > t32[:, None, None]).reshape(len(maps), -1), as_tuple=True)
    return set(zip(q.tolist(), pix.tolist(), strict=True))


def random_maps(rng: np.random.Generator, p: int, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    x = rng.standard_normal((p, h, w)).astype(np.float32)
    if kind == 1:  # plateaus: ties at the threshold
        x = np.round(x)
    elif kind == 2:  # mostly zeros
        x = np.maximum(x - 1.5, 0)
    elif kind == 3:  # mixed magnitudes and negatives
        x = x * rng.choice([1e-4, 1.0, 1e4], size=(p, 1, 1)).astype(np.float32)
    return x


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (14, 14, 56, 56), (7, 9, 112, 100),
                                   (4, 5, 12, 14), (13, 13, 113, 113), (2, 2, 16, 16)])
def test_masked_pixels_equal_full_upsample(shape):
    h, w, sh, sw = shape
    rng = np.random.default_rng(sum(shape))
    for _ in range(25):
        maps = torch.from_numpy(random_maps(rng, 40, h, w))
        flat = maps.reshape(40, -1)
        # thresholds equal to stored values (ties), between values, zero and negative
        pick = flat[torch.arange(40), torch.from_numpy(rng.integers(0, h * w, 40))].double()
        t = torch.where(torch.from_numpy(rng.random(40) < 0.3), pick + 1e-9, pick)
        t[:3] = torch.tensor([0.0, -0.5, 1e-12], dtype=torch.float64)
        t32 = float32_below(t)
        active = maps.amax(dim=(1, 2)) > skip_bound(t32)
        q, pix = masked_pixels(maps[active], t32[active], (sh, sw))
        fast = set(zip(torch.nonzero(active)[:, 0][q].tolist(), pix.tolist(), strict=True))
        assert fast == full_pixels(maps, t32, (sh, sw))


def test_row_bands_only_where_exact():
    assert row_bands_exact(7, 7, 112, 112) in (True, False)  # machine-dependent, but checked
    assert not row_bands_exact(13, 13, 113, 113)  # not an integer factor: never banded
    assert not row_bands_exact(1, 1, 16, 16)


def test_float32_below_is_the_exact_comparison():
    t = torch.tensor([1.0 + 0.75 * 2**-23, 0.1, -0.1, 0.0, 3.0], dtype=torch.float64)
    t32 = float32_below(t)
    assert (t32.double() <= t).all()
    nxt = torch.nextafter(t32, torch.full_like(t32, float("inf")))
    assert (nxt.double() > t).all()
