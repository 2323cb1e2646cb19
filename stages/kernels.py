"""Device-agnostic torch kernels shared by the stages.

Small pure functions on tensors: exact order statistics (top-k merge, radix histograms over
order-preserving float keys, numpy's linear interpolation) and the IoU tally (upsample
active (image, unit) pairs, threshold, count labels).  The device is whatever the input
tensors live on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

KEY_BITS = 32
RADIX_WIDTHS = (11, 11, 10)  # three histogram passes pin down a float32 exactly
FULL_MAP_CHUNK = 512  # maps upsampled at once where row bands are not exact


# ---------------------------------------------------------------- exact quantiles


def quantile_position(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' method for quantile ``1 - q`` of n values: (lo, hi, gamma).

    lo and hi are 0-based ascending ranks; the answer is lerp(v[lo], v[hi], gamma).
    """
    virtual = (n - 1) * (1.0 - q)
    lo = int(math.floor(virtual))
    lo = min(max(lo, 0), n - 1)
    hi = min(lo + 1, n - 1)
    return lo, hi, float(virtual - lo)


def lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's own interpolation formula (``numpy.lib._function_base_impl._lerp``)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    out = a + diff * gamma
    if gamma >= 0.5:
        out = b - diff * (1 - gamma)
    return out


def unit_values(block: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (K, B·h·w) float32: every raw value of each unit."""
    b, k = block.shape[:2]
    return block.float().permute(1, 0, 2, 3).reshape(k, -1)


def top_values(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per-unit largest ``k`` values, descending (k clipped to what is there)."""
    k = min(k, values.shape[1])
    return torch.topk(values, k, dim=1, largest=True, sorted=True).values


def merge_top(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """Associative merge of per-unit top lists: keep the top ``k`` of their union."""
    return top_values(torch.cat(parts, dim=1), k)


def float_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float32 -> int64 in [0, 2^32): a < b  <=>  key(a) < key(b)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys`."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys >= (1 << 31), keys - (1 << 31), ((1 << 31) - 1 - keys) | (1 << 31))
    return bits.astype(np.uint32).view(np.float32)


def radix_histogram(
    keys: torch.Tensor, prefixes: torch.Tensor, done_bits: int, width: int
) -> torch.Tensor:
    """Per unit and target, counts of the next ``width`` key bits among keys whose top
    ``done_bits`` equal the target's prefix.  keys (K, n); prefixes (K, T) -> (K, T, 2^width).
    """
    k, t = prefixes.shape
    bins = 1 << width
    shift = KEY_BITS - done_bits - width
    digits = (keys >> shift) & (bins - 1)
    out = torch.zeros((k, t, bins), dtype=torch.int64, device=keys.device)
    unit_index = torch.arange(k, device=keys.device).unsqueeze(1).expand_as(keys)
    for target in range(t):
        if done_bits == 0:
            match = torch.ones_like(keys, dtype=torch.bool)
        else:
            match = (keys >> (KEY_BITS - done_bits)) == prefixes[:, target : target + 1]
        flat = unit_index[match] * bins + digits[match]
        out[:, target] = torch.bincount(flat, minlength=k * bins).view(k, bins)
    return out


def radix_step(
    hist: np.ndarray, prefixes: np.ndarray, ranks: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Descend one digit: the bucket holding each target rank, and the rank inside it."""
    cum = np.cumsum(hist, axis=-1)
    digit = (cum <= ranks[..., None]).sum(axis=-1)
    before = np.where(digit > 0, np.take_along_axis(cum, np.maximum(digit - 1, 0)[..., None], -1)[..., 0], 0)
    return (prefixes << width) | digit, ranks - before


# ---------------------------------------------------------------- IoU tally


@dataclass
class TallyInputs:
    """Labels of one image block, already mapped to dense label indices (0 = none)."""

    pixel: torch.Tensor  # (B, P, S) int64 dense label index per pixel plane
    image: torch.Tensor  # (B, Q) int64 dense index of image-level labels
    label_category: torch.Tensor  # (L + 1,) int64 primary category index, -1 for index 0
    n_categories: int


def set_semantics(
    pixel: torch.Tensor,
    image: torch.Tensor,
    plane_pairs: list[tuple[int, int]] | None = None,
    image_slots: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop repeats so each (pixel, label) counts once: across planes, and where an
    image-level label already covers the whole image; repeated image-level labels too.

    ``plane_pairs`` (i < j) and ``image_slots`` limit the comparisons to those that can
    find a repeat (see ``stages.labels.repeat_checks``); by default everything is compared.
    """
    pixel = pixel.clone()
    image = image.clone()
    n_planes = pixel.shape[1]
    if plane_pairs is None:
        plane_pairs = [(i, j) for j in range(1, n_planes) for i in range(j)]
    for i, j in plane_pairs:  # ordered by j, so an earlier plane keeps the label
        plane = pixel[:, j]
        plane[(plane == pixel[:, i]) & (plane > 0)] = 0
    slots = set(range(image.shape[1]) if image_slots is None else image_slots)
    for qi in range(image.shape[1]):
        lab = image[:, qi]
        if qi > 0:
            image[:, qi] = torch.where((image[:, :qi] == lab[:, None]).any(1), 0, lab)
        if qi not in slots:
            continue
        lab = image[:, qi]
        covered = (pixel == lab[:, None, None]) & (lab[:, None, None] > 0)
        pixel[covered] = 0
    return pixel, image


def pixel_label_counts(pixel: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B, L+1) pixel count of every dense label in each image, over all its planes."""
    b = pixel.shape[0]
    width = n_labels + 1
    offsets = (torch.arange(b, device=pixel.device) * width).view(b, 1, 1)
    return torch.bincount((pixel + offsets).reshape(-1), minlength=b * width).view(b, width)


def label_area(inputs: TallyInputs, n_labels: int, seg_pixels: int,
               pixel_counts: torch.Tensor) -> torch.Tensor:
    """G_l over the block: pixel counts (from :func:`pixel_label_counts`) plus seg_pixels
    per image-level occurrence."""
    area = pixel_counts.sum(dim=0)
    area += torch.bincount(inputs.image.reshape(-1), minlength=n_labels + 1) * seg_pixels
    area[0] = 0
    return area


def image_incidence(image: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B, L+1) counts of each image-level label per image (column 0 zeroed)."""
    b = image.shape[0]
    rows = torch.arange(b, device=image.device).unsqueeze(1).expand_as(image)
    inc = torch.zeros((b, n_labels + 1), dtype=torch.int64, device=image.device)
    inc.index_put_((rows.reshape(-1), image.reshape(-1)), torch.ones_like(image.reshape(-1)), accumulate=True)
    inc[:, 0] = 0
    return inc


def category_presence(
    inputs: TallyInputs, pixel_counts: torch.Tensor, image_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) bools: image carries a label of primary category c (any kind), and image
    carries an image-level label of category c.  Takes the per-image label counts of
    :func:`pixel_label_counts` and :func:`image_incidence`."""
    c = inputs.n_categories
    lc = inputs.label_category
    n_labels = lc.shape[0] - 1
    onehot = torch.zeros((n_labels + 1, c), dtype=torch.float64, device=lc.device)
    known = torch.nonzero(lc >= 0)[:, 0]
    onehot[known, lc[known]] = 1.0
    image_level = (image_counts.double() @ onehot) > 0
    pixel_level = ((pixel_counts[:, 1:] > 0).double() @ onehot[1:]) > 0
    return pixel_level | image_level, image_level


def float32_below(thresholds: torch.Tensor) -> torch.Tensor:
    """The largest float32 <= T for each float64 T: for a float32 u, u > T  <=>  u > result.

    (Rounding T to nearest could round up and drop pixels equal to the rounded value.)
    """
    t = thresholds.double()
    t32 = t.float()
    lower = torch.nextafter(t32, torch.full_like(t32, -float("inf")))
    return torch.where(t32.double() > t, lower, t32)


def skip_bound(t32: torch.Tensor) -> torch.Tensor:
    """Pairs whose raw max is <= this cannot produce a mask pixel.

    In exact arithmetic a bilinear value never exceeds its largest corner, so max <= T
    would do; float32 interpolation can overshoot a flat region by a few ulps, so the
    bound keeps a margin of 16 float32 epsilons (relative).  Pairs inside the margin are
    upsampled and tested exactly, so the skip never changes a count.
    """
    eps = torch.finfo(torch.float32).eps
    return t32 - 16 * eps * t32.abs()


def upsample_masks(acts: torch.Tensor, size: tuple[int, int], thresholds: torch.Tensor) -> torch.Tensor:
    """M = bilinear(A) > T, strict; acts (P, h, w), thresholds (P,) float32 as given by
    :func:`float32_below` -> (P, sh, sw) bool."""
    up = F.interpolate(acts[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return up > thresholds[:, None, None]


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
            rows = torch.nonzero(_band_valid(y0, lo, hi, h, s))[:, 0]
            if not torch.equal(band[:, rows], full[:, lo * s + rows]):
                return False
    return True


def _source_rows(h: int, sh: int) -> torch.Tensor:
    """y0 of every output row, as torch's bilinear kernel computes it (align_corners=False)."""
    scale = torch.tensor(h / sh, dtype=torch.float32)
    src = torch.clamp(scale * (torch.arange(sh, dtype=torch.float32) + 0.5) - 0.5, min=0)
    return src.floor().long().clamp(max=h - 1)


def _band_valid(y0: torch.Tensor, lo: int, hi: int, h: int, s: int) -> torch.Tensor:
    """Rows of a band [lo, hi] whose value equals the full map's: both source rows inside
    the band and no clamping that the full map doesn't have."""
    rows = y0[lo * s : (hi + 1) * s]
    return (rows >= lo) & ((rows <= hi - 1) | (hi == h - 1))


def masked_pixels(
    maps: torch.Tensor, t32: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair, pixel) of every output pixel with bilinear(map) > t32, exactly as a full
    :func:`upsample_masks` would give.

    Where :func:`row_bands_exact` holds, each map is upsampled only over the band of rows
    around its hot rows (cells above :func:`skip_bound`): rows outside the band interpolate
    cells that cannot produce a mask pixel.  Maps are grouped by band so each group is one
    interpolate call.
    """
    p, h, w = maps.shape
    sh, sw = size
    if p == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=maps.device)
        return empty, empty
    if not row_bands_exact(h, w, sh, sw, maps.device.type):
        pairs, pixels = [], []
        for start in range(0, p, FULL_MAP_CHUNK):  # bounded memory: chunk x sh x sw floats
            masks = upsample_masks(maps[start : start + FULL_MAP_CHUNK], size,
                                   t32[start : start + FULL_MAP_CHUNK]).reshape(-1, sh * sw)
            q, pix = torch.nonzero(masks, as_tuple=True)
            pairs.append(q + start)
            pixels.append(pix)
        return torch.cat(pairs), torch.cat(pixels)
    s = sh // h
    hot = (maps > skip_bound(t32)[:, None, None]).any(dim=2)  # (P, h)
    idx = torch.arange(h, device=maps.device)
    lo = (torch.where(hot, idx, h).amin(dim=1) - 1).clamp(min=0)
    hi = (torch.where(hot, idx, -1).amax(dim=1) + 1).clamp(max=h - 1)
    single = hi <= lo  # widen one-row bands: torch treats a one-row input specially
    lo = torch.where(single & (lo > 0), lo - 1, lo)
    hi = torch.where(single & (lo == hi), hi + 1, hi)
    y0 = _source_rows(h, sh).to(maps.device)
    pairs, pixels = [], []
    keys = lo * h + hi
    for key in torch.unique(keys).tolist():
        band_lo, band_hi = divmod(int(key), h)
        sel = torch.nonzero(keys == key)[:, 0]
        band = F.interpolate(maps[sel, band_lo : band_hi + 1][:, None].float(),
                             size=((band_hi - band_lo + 1) * s, sw), mode="bilinear",
                             align_corners=False)[:, 0]
        valid = _band_valid(y0, band_lo, band_hi, h, s)
        mask = (band > t32[sel][:, None, None]) & valid[None, :, None]
        q, r, x = torch.nonzero(mask, as_tuple=True)
        pairs.append(sel[q])
        pixels.append((band_lo * s + r) * sw + x)
    return torch.cat(pairs), torch.cat(pixels)


def tally_block(
    acts: torch.Tensor,
    thresholds: torch.Tensor,
    inputs: TallyInputs,
    n_labels: int,
    seg_size: tuple[int, int],
    union: str,
    pair_chunk: int = 4096,
) -> dict[str, torch.Tensor]:
    """Exact int64 counts of one block of images for every unit and label.

    acts (B, K, h, w) raw activations; thresholds (K,) float64.  Only (image, unit) pairs
    whose raw maximum can reach the threshold are upsampled (:func:`skip_bound`): a bilinear
    value is a convex combination of raw cells, so the others have empty masks.
    Returns intersection (K, L+1), unit_area (K, C), label_area (L+1,).
    """
    device = acts.device
    b, k = acts.shape[:2]
    c = inputs.n_categories
    s = seg_size[0] * seg_size[1]
    width = n_labels + 1
    thresholds = float32_below(thresholds.to(device=device, dtype=torch.float64))
    active = acts.float().amax(dim=(2, 3)) > skip_bound(thresholds)[None, :]
    img_idx, unit_idx = torch.nonzero(active, as_tuple=True)
    inter_flat = torch.zeros(k * width, dtype=torch.int64, device=device)
    area = torch.zeros((b, k), dtype=torch.int64, device=device)
    pixel_overlap = torch.zeros((len(img_idx), c), dtype=torch.bool, device=device)
    pixel = inputs.pixel
    lc = inputs.label_category
    for start in range(0, len(img_idx), pair_chunk):
        bi = img_idx[start : start + pair_chunk]
        ki = unit_idx[start : start + pair_chunk]
        pair, pix = masked_pixels(acts[bi, ki], thresholds[ki], seg_size)
        area[bi, ki] = torch.bincount(pair, minlength=len(bi))
        labels = pixel[bi[pair], :, pix]  # (M, P)
        owner = ki[pair].unsqueeze(1).expand_as(labels)
        keep = labels > 0
        inter_flat += torch.bincount(owner[keep] * width + labels[keep], minlength=k * width)
        if union == "lite":
            cats = lc[labels]
            rows = (pair + start).unsqueeze(1).expand_as(labels)
            ok = keep & (cats >= 0)
            hits = torch.bincount(rows[ok] * c + cats[ok], minlength=len(img_idx) * c)
            pixel_overlap |= hits.view(len(img_idx), c) > 0
    intersection = inter_flat.view(k, width)
    # image-level labels: the whole mask intersects (float64 matmul is exact here)
    inc = image_incidence(inputs.image, n_labels)
    intersection += torch.round(area.double().T @ inc.double()).to(torch.int64)
    pixel_counts = pixel_label_counts(pixel, n_labels)
    any_cat, image_cat = category_presence(inputs, pixel_counts, inc)
    if union == "global":
        unit_area = area.sum(dim=0, keepdim=True).T.expand(k, c).clone()
    elif union == "restricted":
        unit_area = torch.round(area.double().T @ any_cat.double()).to(torch.int64)
    elif union == "lite":
        indicator = pixel_overlap | image_cat[img_idx]
        unit_area = torch.zeros((k, c), dtype=torch.int64, device=device)
        unit_area.index_add_(0, unit_idx, area[img_idx, unit_idx][:, None] * indicator)
    else:
        raise ValueError(f"unknown union mode {union!r}")
    intersection[:, 0] = 0
    return {
        "intersection": intersection,
        "unit_area": unit_area,
        "label_area": label_area(inputs, n_labels, s, pixel_counts),
    }
