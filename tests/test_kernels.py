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


def test_set_semantics_across_categories_sharing_a_label(tmp_path):
    """A label listed in two categories, at the same pixel in a plane of each, counts once;
    planes of categories that share no label are never compared (and need not be)."""
    from stages.blocks import LayerBlocks
    from stages.concepts import ConceptsConfig, build_concept_store
    from stages.iou import ScoringConfig, TallyReduction
    from stages.labels import label_space, repeat_checks
    from stages.reduction import reduce_in_process
    from storage import activations as astore
    from tests.broden_factory import BrodenBuilder

    b = BrodenBuilder(tmp_path / "ds", ["color", "part", "material", "scene"], sh=4, sw=4)
    b.label(1, "red", color=1.0).label(48, "glass", part=0.2, material=0.1)
    b.label(300, "door", part=0.3).label(40, "sky", material=0.5).label(100, "park", scene=1.0)
    glass = np.zeros((4, 4), dtype=np.int64)
    glass[:2, :2] = 48
    part = np.where(glass > 0, 48, 300)
    material = np.where(glass > 0, 48, 40)
    for _ in range(3):
        b.image(planes={"color": [np.ones((4, 4), int)], "part": [part, part],
                        "material": [material]}, scalars={"scene": [100]})
    root = b.write()
    store = build_concept_store(ConceptsConfig(root, tmp_path / "c.zarr", 2, False), None)
    space = label_space(store, None)
    pairs, slots = repeat_checks(store.read_block(0, 3), space.category_share)
    assert (0, 1) not in pairs and (1, 2) in pairs and (1, 3) in pairs and (2, 3) in pairs
    assert slots == []
    path = tmp_path / "a.zarr"
    acts = np.zeros((3, 1, 4, 4), dtype=np.float32)
    astore.create_store(path, store.image_paths(), {"l": (1, 4, 4)}, 2, "float32", {"m": 1})
    astore.write_block(path, 0, 0, {"l": acts[:2]})
    astore.write_block(path, 1, 2, {"l": acts[2:]})
    astore.mark_complete(path)
    for planes, expected in (("set", 3 * 4), ("multiset", 3 * 4 * 3)):
        counts = reduce_in_process(
            TallyReduction(LayerBlocks(str(path), "l"), str(store.path), np.array([1.0]), space,
                           ScoringConfig(planes=planes)), range(2))
        glass_index = int(space.lut[48])
        assert counts["label_area"][glass_index] == expected
