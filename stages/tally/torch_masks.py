"""The torch mask producer (SEMANTICS.md §2 masks, on any device).

:func:`torch_mask_classes` counts a block's mask pixels per pixel class on GPUs, and on CPUs
where the compiled loop (:mod:`stages.tally.compiled`) is not exact; :func:`unit_mask` is the
mask the report draws.  Kept apart from :mod:`stages.tally.masks` so that the compiled CPU
tally never imports torch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from stages.tally.masks import MaskClasses, float32_below, skip_bound

FULL_MAP_CHUNK = 512  # maps upsampled at once where row bands are not exact


def upsample_masks(acts: torch.Tensor, size: tuple[int, int], t32: torch.Tensor) -> torch.Tensor:
    """M = bilinear(A) > T, strict; acts (P, h, w), t32 (P,) float32 as given by
    :func:`float32_below` -> (P, sh, sw) bool."""
    up = F.interpolate(acts[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return up > t32[:, None, None]


def unit_mask(act_map: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """M_k(x) of one raw map (h, w) at ``size``, for a float64 threshold T: the mask every
    count is made of (the report draws it)."""
    acts = torch.from_numpy(np.ascontiguousarray(act_map, dtype=np.float32))[None]
    t32 = torch.from_numpy(float32_below(np.array([threshold], dtype=np.float64)))
    return upsample_masks(acts, size, t32)[0].numpy()


@lru_cache(maxsize=64)
def row_bands_exact(h: int, w: int, sh: int, sw: int, device: str = "cpu") -> bool:
    """Does interpolating a band of input rows give bit-identical output rows?

    True only for integer row scale factors where torch's kernel, on this device, returns
    the same float32 values for every band as for the full map (checked on random maps of
    mixed magnitude over every band).  Where it doesn't, callers upsample whole maps.
    """
    if sh % h or h < 2:
        return False
    s = sh // h
    gen = torch.Generator().manual_seed(12345)
    maps = torch.randn((6, h, w), generator=gen) * torch.tensor([1e-3, 1, 1, 10, 1e3, 1e5]).view(6, 1, 1)
    maps = maps.to(device)
    full = F.interpolate(maps[:, None], size=(sh, sw), mode="bilinear", align_corners=False)[:, 0]
    y0 = _source_rows(h, sh).to(device)
    for lo in range(h):
        for hi in range(lo + 1, h):  # bands of at least two rows (one row is a special case)
            band = F.interpolate(maps[:, None, lo : hi + 1], size=((hi - lo + 1) * s, sw),
                                 mode="bilinear", align_corners=False)[:, 0]
            rows = torch.nonzero(_band_valid(y0[lo * s : (hi + 1) * s], lo, hi, h))[:, 0]
            if not torch.equal(band[:, rows], full[:, lo * s + rows]):
                return False
    return True


def _source_rows(h: int, sh: int) -> torch.Tensor:
    """y0 of every output row, as torch's bilinear kernel computes it (align_corners=False)."""
    scale = torch.tensor(h / sh, dtype=torch.float32)
    src = torch.clamp(scale * (torch.arange(sh, dtype=torch.float32) + 0.5) - 0.5, min=0)
    return src.floor().long().clamp(max=h - 1)


def _band_valid(band_y0: torch.Tensor, lo: int | torch.Tensor, hi: int | torch.Tensor,
                h: int) -> torch.Tensor:
    """Rows of a band [lo, hi] whose value equals the full map's: both source rows inside
    the band and no clamping that the full map doesn't have.  ``band_y0`` is the source row
    of each of the band's output rows; lo and hi are ints, or (n, 1) for n bands at once."""
    return (band_y0 >= lo) & ((band_y0 <= hi - 1) | (hi == h - 1))


def row_bands(maps: torch.Tensor, t32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per map, the band [lo, hi] of input rows whose interpolation can hold mask pixels:
    one row around every hot row (a row with a cell above :func:`skip_bound`), at least two
    rows (torch treats a one-row input specially)."""
    h = maps.shape[1]
    hot = (maps > skip_bound(t32)[:, None, None]).any(dim=2)  # (P, h)
    idx = torch.arange(h, device=maps.device)
    lo = (torch.where(hot, idx, h).amin(dim=1) - 1).clamp(min=0)
    hi = (torch.where(hot, idx, -1).amax(dim=1) + 1).clamp(max=h - 1)
    single = hi <= lo
    lo = torch.where(single & (lo > 0), lo - 1, lo)
    hi = torch.where(single & (lo == hi), hi + 1, hi)
    return lo, hi


def masked_pixels(
    maps: torch.Tensor, t32: torch.Tensor, size: tuple[int, int], values: bool = False
) -> tuple[torch.Tensor, ...]:
    """(pair, pixel) of every output pixel with bilinear(map) > t32, exactly as a full
    :func:`upsample_masks` would give; with ``values``, (pair, pixel, bilinear value).

    Where :func:`row_bands_exact` holds, each map is upsampled only over its
    :func:`row_bands`: rows outside the band interpolate cells that cannot produce a mask
    pixel.  Maps are grouped by band so each group is one interpolate call.
    """
    p, h, w = maps.shape
    sh, sw = size
    if p == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=maps.device)
        return (empty, empty, empty.float()) if values else (empty, empty)
    pairs, pixels, found = [], [], []
    if not row_bands_exact(h, w, sh, sw, maps.device.type):
        for start in range(0, p, FULL_MAP_CHUNK):  # bounded memory: chunk x sh x sw floats
            chunk = maps[start : start + FULL_MAP_CHUNK]
            up = F.interpolate(chunk[:, None].float(), size=size, mode="bilinear",
                               align_corners=False)[:, 0].reshape(len(chunk), sh * sw)
            q, pix = torch.nonzero(up > t32[start : start + FULL_MAP_CHUNK][:, None],
                                   as_tuple=True)
            pairs.append(q + start)
            pixels.append(pix)
            if values:
                found.append(up[q, pix])
        return (torch.cat(pairs), torch.cat(pixels)) + ((torch.cat(found),) if values else ())
    s = sh // h
    lo, hi = row_bands(maps, t32)
    y0 = _source_rows(h, sh).to(maps.device)
    keys = lo * h + hi
    for key in torch.unique(keys).tolist():
        band_lo, band_hi = divmod(int(key), h)
        sel = torch.nonzero(keys == key)[:, 0]
        band = F.interpolate(maps[sel, band_lo : band_hi + 1][:, None].float(),
                             size=((band_hi - band_lo + 1) * s, sw), mode="bilinear",
                             align_corners=False)[:, 0]
        valid = _band_valid(y0[band_lo * s : (band_hi + 1) * s], band_lo, band_hi, h)
        mask = (band > t32[sel][:, None, None]) & valid[None, :, None]
        q, r, x = torch.nonzero(mask, as_tuple=True)
        pairs.append(sel[q])
        pixels.append((band_lo * s + r) * sw + x)
        if values:
            found.append(band[q, r, x])
    return (torch.cat(pairs), torch.cat(pixels)) + ((torch.cat(found),) if values else ())


def torch_mask_classes(acts: torch.Tensor, t32: np.ndarray, pixel_class: np.ndarray,
                       n_classes: int, seg_size: tuple[int, int], pair_chunk: int = 1024,
                       bands: np.ndarray | None = None) -> MaskClasses:
    """:class:`MaskClasses` of a block on the device of ``acts`` (B, K, h, w): the pixels of
    every active pair's mask (:func:`masked_pixels`, ``pair_chunk`` pairs at a time) keyed by
    (unit, class of the pixel) and counted; with ``bands`` (K, R) ascending float32
    thresholds (``t32`` their first column), by band too."""
    device = acts.device
    k = acts.shape[1]
    t = torch.from_numpy(np.asarray(t32, np.float32)).to(device)
    stride = 1 if bands is None else bands.shape[1] + 1
    ascending = None if bands is None else torch.from_numpy(
        np.ascontiguousarray(bands, np.float32)).to(device)
    active = acts.amax(dim=(2, 3)) > torch.from_numpy(skip_bound(t32)).to(device)[None, :]
    image, unit = torch.nonzero(active, as_tuple=True)
    classes = torch.from_numpy(np.ascontiguousarray(pixel_class)).to(device)
    width = k * max(n_classes, 1)
    counts = torch.zeros(width if ascending is None else 0, dtype=torch.int64, device=device)
    keys = []
    for start in range(0, len(image), max(pair_chunk, 1)):
        bi, ki = image[start : start + pair_chunk], unit[start : start + pair_chunk]
        pair, pixel, *value = masked_pixels(acts[bi, ki], t[ki], seg_size, ascending is not None)
        key = ki[pair] * n_classes + classes[bi[pair], pixel]
        if ascending is None:
            counts += torch.bincount(key, minlength=width)
        else:  # a pixel's band: how many of its unit's thresholds lie below its value
            band = torch.zeros_like(key)
            for column in ascending.T:  # one column at a time: memory of one value per pixel
                band += value[0] > column[ki[pair]]
            keys.append(key * stride + band)
    if ascending is None:
        found = torch.nonzero(counts)[:, 0]
        pixels = counts[found]
    else:
        found, pixels = torch.unique(torch.cat(keys) if keys else counts, return_counts=True)
    found, pixels = found.cpu().numpy(), pixels.cpu().numpy().astype(np.int64)
    band, found = found % stride, found // stride
    return MaskClasses(found // max(n_classes, 1), found % max(n_classes, 1), pixels, band)
