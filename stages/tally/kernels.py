"""Device-agnostic torch kernels shared by the stages.

Small pure functions on tensors: exact order statistics (top-k merge, radix histograms over
order-preserving float keys, numpy's linear interpolation) and the IoU tally (upsample only
what active (image, unit) pairs can mask, threshold, and count labels as exact bfloat16
products of masks and per-image label indicators).  The device is whatever the input
tensors live on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from stages.tally.compiled import compiled_plan

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
    """Per-unit largest ``k`` values, in no particular order (k clipped to what is there)."""
    k = min(k, values.shape[1])
    return torch.topk(values, k, dim=1, largest=True, sorted=False).values


def merge_top(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """Associative merge of per-unit top lists (any order): the top ``k`` of their union.

    A full list W (k wide) met by c <= k/2 new columns E only trades its c smallest L:
    every value of W outside L is >= max(L), and at most c values of L ∪ E exceed max(L),
    so the top k of W ∪ E is (W minus L) plus the top c of L ∪ E, ties included.  That
    costs one scan of W instead of a selection over all k + c columns per unit.
    """
    parts = sorted(parts, key=lambda part: part.shape[1], reverse=True)
    wide, extra = parts[0], sum(part.shape[1] for part in parts[1:])
    if wide.shape[1] != k or not 0 < extra <= k // 2:
        return top_values(torch.cat(parts, dim=1), k)
    smallest = torch.topk(wide, extra, dim=1, largest=False, sorted=False)
    keep = top_values(torch.cat([smallest.values, *parts[1:]], dim=1), extra)
    return wide.clone().scatter_(1, smallest.indices, keep)


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
#
# Counting is a matrix product per image: the masks of its active units, one 0/1 row per
# unit over the S pixels, times a per-image label indicator (S, L_i) over the labels the image
# carries.  Entries are small integers, so the product is exact in bfloat16 as long as no
# partial sum passes 2^8: the pixel axis is cut into chunks that keep every sum at or below
# that and the chunk results are added in float32 (exact far beyond S).  This holds whatever
# precision the backend accumulates in, on every device.

BF16_EXACT = 256  # every integer up to 2^8 is a bfloat16
MIN_GEMM_CHUNK = 16  # narrower exact chunks are not worth a batched product: use float64


class Workspace:
    """Scratch tensors reused by the chunks of one tally.

    A fresh large tensor costs a page fault per 4 KiB on first touch (always so under
    ``MALLOC_MMAP_THRESHOLD_``, as the Dask workers run), which costs more than the cheap
    passes that fill it; buffers here are allocated once per call and grown on demand.
    A view handed out is valid until the same name is requested again.
    """

    def __init__(self, device: torch.device | str):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n + n // 4, dtype=dtype, device=self.device)  # slack for growth
            self.buffers[name] = buf
        return buf[:n].view(shape)

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.empty(name, shape, dtype).zero_()


@dataclass
class TallyInputs:
    """Labels of one image block as stored, and how the tally reads them (SEMANTICS.md §3).

    Label numbers stay as stored (planes of unselected categories already zeroed): the kernel
    numbers each image's labels itself, so no per-pixel dense copy of the block is made.
    """

    stored_pixel: torch.Tensor  # (B, P, S) int32 label number per pixel plane, 0 = none
    stored_image: torch.Tensor  # (B, Q) int32 image-level label numbers, 0 = none
    lut: torch.Tensor  # (V,) int64 label number -> dense index, 0 = not scored
    label_category: torch.Tensor  # (L + 1,) int64 primary category index, -1 for index 0
    n_categories: int
    planes: str = "set"  # "set": a pixel counts once per label; "multiset": once per plane


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] through index_select (an order of magnitude faster than advanced indexing)."""
    return table.index_select(0, index.reshape(-1).long()).view(index.shape)


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
    maps: torch.Tensor, t32: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair, pixel) of every output pixel with bilinear(map) > t32, exactly as a full
    :func:`upsample_masks` would give.

    Where :func:`row_bands_exact` holds, each map is upsampled only over its
    :func:`row_bands`: rows outside the band interpolate cells that cannot produce a mask
    pixel.  Maps are grouped by band so each group is one interpolate call.
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
    lo, hi = row_bands(maps, t32)
    y0 = _source_rows(h, sh).to(maps.device)
    pairs, pixels = [], []
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
    return torch.cat(pairs), torch.cat(pixels)


def write_masks(canvas: torch.Tensor, rows: torch.Tensor, maps: torch.Tensor, t32: torch.Tensor,
                size: tuple[int, int]) -> None:
    """canvas[rows[i]] = M_i as 0/1, for maps (n, h, w) and their float32 thresholds.

    canvas (m, sh·sw) holds zeros in those rows.  Where :func:`row_bands_exact` holds only
    each map's :func:`row_bands` are interpolated, in one call per band height; rows of a band
    that differ from the full map's (clamping at the band's edges) are thresholded at +inf,
    which is right because they interpolate cells that cannot reach the threshold.
    """
    n, h, w = maps.shape
    sh, sw = size
    if n == 0:
        return
    if not row_bands_exact(h, w, sh, sw, maps.device.type):
        for start in range(0, n, FULL_MAP_CHUNK):
            stop = start + FULL_MAP_CHUNK
            up = F.interpolate(maps[start:stop, None].float(), size=size, mode="bilinear",
                               align_corners=False)[:, 0]
            mask = torch.gt(up, t32[start:stop, None, None],
                            out=torch.empty_like(up, dtype=canvas.dtype))
            canvas.index_copy_(0, rows[start:stop], mask.view(len(mask), -1))
        return
    s = sh // h
    lo, hi = row_bands(maps, t32)
    y0 = _source_rows(h, sh).to(maps.device)
    cell_rows = canvas.view(-1, s * sw)  # one block of s output rows per input row
    heights = hi - lo + 1
    for height in torch.unique(heights).tolist():
        sel = torch.nonzero(heights == height)[:, 0]
        band_rows = lo[sel, None] + torch.arange(height, device=maps.device)  # (g, height)
        band_in = maps[sel].gather(1, band_rows[:, :, None].expand(-1, -1, w))
        band = F.interpolate(band_in[:, None].float(), size=(height * s, sw), mode="bilinear",
                             align_corners=False)[:, 0]
        out_rows = lo[sel, None] * s + torch.arange(height * s, device=maps.device)
        valid = _band_valid(y0[out_rows], lo[sel, None], hi[sel, None], h)
        limit = torch.where(valid, t32[sel, None], torch.inf)
        mask = torch.gt(band, limit[:, :, None], out=torch.empty_like(band, dtype=canvas.dtype))
        cell_rows.index_copy_(0, (rows[sel, None] * h + band_rows).view(-1), mask.view(-1, s * sw))


# ---------------------------------------------------------------- quads
#
# With integer scale factors every output pixel lies in one "quad": the pixels between input
# rows j-1, j and columns i-1, i (j in 0..h, i in 0..w; the border quads hold the clamped
# pixels and only read one row or column).  A quad can hold mask pixels only if one of its
# corner cells is hot, which on resnet-like layers is ~6 quads of 64 per active pair.  For
# large outputs torch's CPU kernel is separable (a horizontal linear pass, then a vertical
# one, each a fused multiply-add), so a quad's exact values come from two 1-D interpolations:
# the whole map's rows, then a two-row segment of those rows over the quad's columns.  That
# identity is checked per shape and device (:func:`quads_exact`), like :func:`row_bands_exact`.


@dataclass(frozen=True)
class AxisQuads:
    """Quads along one axis of n_in cells upsampled to n_out positions."""

    start: torch.Tensor  # (n_in + 1,) first output position of each quad
    size: torch.Tensor  # (n_in + 1,) output positions in each quad
    segment: torch.Tensor  # (n_in + 1,) first of the two input cells a quad's segment reads
    tile: int  # the largest quad


def axis_quads(n_in: int, n_out: int) -> AxisQuads:
    """Quad of every output position from torch's own source index (align_corners=False)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5
    i0 = src.clamp(min=0).floor().long().clamp(max=n_in - 1)
    quad = torch.where(src < 0, 0, torch.where(i0 == n_in - 1, n_in, i0 + 1))
    start = torch.full((n_in + 1,), n_out, dtype=torch.int64).scatter_reduce(
        0, quad, torch.arange(n_out), "amin")
    size = torch.bincount(quad, minlength=n_in + 1)
    segment = (torch.arange(n_in + 1) - 1).clamp(0, n_in - 2)
    return AxisQuads(start, size, segment, int(size.max()))


@dataclass(frozen=True)
class QuadGrid:
    """Every output pixel as (quad, position in the quad's tile); tiles are column-major
    (tile_cols x tile_rows), padded where a quad is smaller than the largest."""

    rows: AxisQuads
    cols: AxisQuads
    position: torch.Tensor  # (sh·sw,) tile-axis position of each pixel, row-major pixels

    @property
    def n_quads(self) -> int:
        return len(self.rows.start) * len(self.cols.start)

    @property
    def tile(self) -> int:
        return self.rows.tile * self.cols.tile


@lru_cache(maxsize=64)
def quad_grid(h: int, w: int, sh: int, sw: int, device: str = "cpu") -> QuadGrid | None:
    """The quads of an (h, w) -> (sh, sw) upsampling; None unless both scale factors are
    integers (then every quad's segment output lines up with the full map's) and tiles are
    large enough for a batched product per quad to pay."""
    if sh % h or sw % w or h < 2 or w < 2 or (sh // h) * (sw // w) < MIN_GEMM_CHUNK:
        return None
    rows, cols = axis_quads(h, sh), axis_quads(w, sw)
    y, x = torch.arange(sh), torch.arange(sw)
    qy = torch.bucketize(y, rows.start, right=True) - 1
    qx = torch.bucketize(x, cols.start, right=True) - 1
    quad = qy[:, None] * (w + 1) + qx[None, :]
    dx = x[None, :] - cols.start[qx][None, :]
    dy = y[:, None] - rows.start[qy][:, None]
    inner = dx * rows.tile + dy  # column-major inside the tile
    position = (quad * (rows.tile * cols.tile) + inner).reshape(-1)

    def to(a: AxisQuads) -> AxisQuads:
        return AxisQuads(a.start.to(device), a.size.to(device), a.segment.to(device), a.tile)

    return QuadGrid(to(rows), to(cols), position.to(device))


def active_quads(maps: torch.Tensor, t32: torch.Tensor) -> torch.Tensor:
    """(n, (h+1)·(w+1)) bool: quads with a hot corner cell (above :func:`skip_bound`)."""
    hot = (maps > skip_bound(t32)[:, None, None]).float()[:, None]
    return F.max_pool2d(F.pad(hot, (1, 1, 1, 1)), 2, stride=1)[:, 0].flatten(1) > 0


def _linear(x: torch.Tensor, size: int, out: torch.Tensor, scale: float | None = None
            ) -> torch.Tensor:
    """F.interpolate(x, size, mode="linear", align_corners=False) into ``out`` (same kernel);
    ``scale`` (output/input) lets a longer output's first ``size`` positions be computed."""
    return torch.ops.aten.upsample_linear1d.out(x, [size], False, scale, out=out)


def quad_rows(maps: torch.Tensor, sw: int, ws: Workspace) -> torch.Tensor:
    """(n, h, sw): every row of every map interpolated to the output width."""
    n, h, _ = maps.shape
    return _linear(maps.float(), sw, ws.empty("quad_rows", (n, h, sw), torch.float32))


def quad_values(rows: torch.Tensor, pair: torch.Tensor, quad: torch.Tensor, grid: QuadGrid,
                ws: Workspace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The bilinear values of quad ``quad[e]`` of map ``pair[e]``, from ``rows`` (n, h, sw)
    as given by :func:`quad_rows`: [(entries (E_g,), values (E_g, tile_cols, r_g))] per
    group of entries whose tiles start at the same row of their segment.

    Each quad reads a two-row segment of ``rows`` over its columns (columns past the quad
    read clamped neighbours) and interpolates it vertically, only as far as its tile needs;
    tile rows past r_g (bottom border quads) are padding.
    """
    n, h, sw = rows.shape
    device = rows.device
    ry, rx = grid.rows, grid.cols
    qy, qx = quad // len(rx.start), quad % len(rx.start)
    first = ry.start[qy] - ry.segment[qy] * ry.tile  # segment row of each tile's first row
    cols = (rx.start[qx, None] + torch.arange(rx.tile, device=device)).clamp(max=sw - 1)
    seg_rows = (pair[:, None] * h + ry.segment[qy, None] + torch.arange(2, device=device)) * sw
    groups = []
    for top in torch.unique(first).tolist():
        sel = torch.nonzero(first == top)[:, 0]
        e = len(sel)
        length = min(top + ry.tile, 2 * ry.tile)
        at = torch.add(seg_rows[sel, :, None], cols[sel, None, :],
                       out=ws.empty(f"at{top}", (e, 2, rx.tile), torch.int64))
        segment = torch.index_select(rows.view(-1), 0, at.view(-1),
                                     out=ws.empty(f"segment{top}", (e * 2 * rx.tile,),
                                                  torch.float32))
        column = _linear(segment.view(e, 2, rx.tile).transpose(1, 2), length,
                         ws.empty(f"column{top}", (e, rx.tile, length), torch.float32),
                         float(ry.tile))
        groups.append((sel, column[:, :, top:]))
    return groups


@lru_cache(maxsize=64)
def quads_exact(h: int, w: int, sh: int, sw: int, device: str = "cpu") -> bool:
    """Do :func:`quad_values` equal ``F.interpolate`` bit for bit on this device?  Checked on
    random maps of mixed magnitude over every pixel of every quad."""
    grid = quad_grid(h, w, sh, sw, device)
    if grid is None:
        return False
    gen = torch.Generator().manual_seed(12345)
    scale = torch.tensor([1e-30, 1e-3, 1, 1, 10, 1e3, 1e5, 1e30]).view(8, 1, 1)
    maps = (torch.randn((8, h, w), generator=gen) * scale).to(device)
    maps[3] = maps[3].round()  # plateaus
    full = F.interpolate(maps[:, None], size=(sh, sw), mode="bilinear", align_corners=False)
    pair = torch.arange(8, device=device).repeat_interleave(grid.n_quads)
    quad = torch.arange(grid.n_quads, device=device).repeat(8)
    ws = Workspace(device)
    tiles = torch.zeros((len(pair), grid.cols.tile, grid.rows.tile), device=device)
    for entries, values in quad_values(quad_rows(maps, sw, ws), pair, quad, grid, ws):
        tiles[entries, :, : values.shape[2]] = values
    got = tiles.view(8, -1).gather(1, grid.position[None, :].expand(8, -1))
    return torch.equal(got, full.view(8, -1))


# ---------------------------------------------------------------- labels of a run of images


@dataclass
class ImageLabels:
    """The labels of a run of images, numbered per image ("local" columns).

    Column 0 of every image is "every pixel" (its count under a mask is the mask's area);
    columns 1..widths[i]-1 are the labels image i carries, ascending; later columns of
    ``labels`` are padding (dense label 0).  :meth:`indicator` builds image i's
    (positions, widths[i]) indicator just before its product, so it is still in cache:
    how often each column covers the pixel at each position (positions are pixels, or quad
    tile positions; padding rows stay 0).
    """

    labels: torch.Tensor  # (n, W) int64 dense label of each column
    widths: list[int]
    positions: int
    image_level: torch.Tensor  # (n, W) float32 occurrences of each column as image-level label
    largest: int  # largest indicator entry of the run
    repeats: list[bool]  # image has a label in two planes (multiset counts above 1)
    plane_at: torch.Tensor  # (n, P, S) int64 flat indicator index of every plane entry
    pixel_at: torch.Tensor  # (n, S) int64 flat indicator index of every pixel's column 0

    def indicator(self, i: int, ws: Workspace) -> torch.Tensor:
        width = self.widths[i]
        out = ws.zeros("indicator", (self.positions * width,), torch.bfloat16)
        if not self.repeats[i]:  # set semantics, or a multiset without repeats
            out.index_fill_(0, self.plane_at[i].view(-1), 1.0)
        else:  # count planes; a plane meets each position once, so no index repeats per call
            for at in self.plane_at[i]:
                out.index_copy_(0, at, out.index_select(0, at) + 1)
        out.index_fill_(0, self.pixel_at[i], 1.0)
        return out.view(self.positions, width)


def image_labels(inputs: TallyInputs, first: int, last: int, position: torch.Tensor,
                 positions: int, ws: Workspace) -> ImageLabels:
    """Local label columns of images [first, last) and where their pixels go in each image's
    indicator (SEMANTICS.md §3).

    ``position`` (S,) places every pixel on the indicator's axis of ``positions`` rows.
    The indicator holds the pixel planes only: 1 wherever a plane carries the label
    (``set``) or the number of planes that do (``multiset``); image-level labels cover the
    whole image, so :func:`whole_image_labels` adds them to the counts afterwards.
    """
    pixel = inputs.stored_pixel[first:last]
    image = inputs.stored_image[first:last].long()
    n, p, s = pixel.shape
    v = inputs.lut.numel()
    device = pixel.device
    key_type = torch.int32 if n * p * v < 2**31 else torch.int64  # half the bytes of int64
    keys = torch.add(pixel, (torch.arange(n * p, device=device, dtype=key_type) * v).view(n, p, 1),
                     out=ws.empty("keys", (n, p, s), key_type))  # (image, plane, label)
    in_plane = torch.bincount(keys.view(-1), minlength=n * p * v).view(n, p, v) > 0
    image_keys = image + (torch.arange(n, device=device) * v)[:, None]
    on_image = torch.zeros((n, v), dtype=torch.bool, device=device)
    on_image.view(-1).index_fill_(0, image_keys.view(-1), True)
    scored = inputs.lut > 0
    carried = (in_plane.any(dim=1) | on_image) & scored
    local = carried.cumsum(dim=1) * carried  # label number -> local column (0 = none)
    width = carried.sum(dim=1) + 1
    labels = torch.zeros((n, int(width.max())), dtype=torch.int64, device=device)
    img, number = torch.nonzero(carried, as_tuple=True)
    labels[img, local[img, number]] = inputs.lut[number]
    pixel_at = torch.mul(position[None, :], width[:, None], out=ws.empty("pixel_at", (n, s),
                                                                          torch.int64))
    plane_at = torch.index_select(local[:, None, :].expand(n, p, v).reshape(-1), 0, keys.view(-1),
                                  out=ws.empty("plane_at", (n * p * s,), torch.int64))
    plane_at = plane_at.view(n, p, s).add_(pixel_at[:, None, :])
    planes_per_label = (in_plane & scored).sum(dim=1).amax(dim=1)  # (n,)
    if inputs.planes == "set":
        largest, repeats = 1, [False] * n
    else:
        largest, repeats = int(planes_per_label.max()), (planes_per_label > 1).tolist()
    image_local = _lookup(local.view(-1), image_keys)  # (n, q)
    image_level = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    image_level.scatter_add_(1, image_local, torch.ones_like(image_local, dtype=torch.float32))
    image_level[:, 0] = 0
    return ImageLabels(labels, width.tolist(), positions, image_level, max(largest, 1), repeats,
                       plane_at, pixel_at)


def whole_image_labels(counts: torch.Tensor, occurrences: torch.Tensor,
                       planes: str) -> torch.Tensor:
    """Add image-level labels to plane counts (rows, W) whose column 0 is the mask area:
    such a label covers every pixel, so it meets the whole mask once (``set``, whatever the
    planes say) or once per occurrence on top of the planes (``multiset``)."""
    area = counts[:, :1]
    if planes == "set":
        return torch.where(occurrences > 0, area, counts)
    return counts + area * occurrences


# ---------------------------------------------------------------- exact products


def product_plan(k: int, largest: int) -> tuple[int, torch.dtype]:
    """(chunk, dtype) for exact products over a K axis of 0/1 masks and indicator entries up
    to ``largest``: the widest divisor of K that keeps every partial sum <= 2^8 in bfloat16,
    or all of K in float64 where no such divisor is wide enough to pay."""
    cap = max(BF16_EXACT // largest, 1)
    chunk = max(d for d in range(1, min(cap, k) + 1) if k % d == 0)
    return (chunk, torch.bfloat16) if chunk >= MIN_GEMM_CHUNK else (k, torch.float64)


def exact_products(masks: torch.Tensor, indicator: torch.Tensor, group: int,
                   dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """masks (B, m, chunk) @ indicator (B, chunk, W), summed over runs of ``group`` batches
    into ``out`` (B / group, m, W) float32; exact in the dtype of :func:`product_plan`."""
    parts = torch.bmm(masks.to(dtype), indicator.to(dtype))
    b, m, w = parts.shape
    if group == 1:
        return out.copy_(parts)
    return torch.sum(parts.view(b // group, group, m, w), dim=1, dtype=torch.float32, out=out)


@dataclass(frozen=True)
class TallyRows:
    """A run of count rows of a block: per image an all-ones row, then one row per active
    unit.  ``image`` is relative to ``first``."""

    image: torch.Tensor  # (R,) image of each row, minus first
    unit: torch.Tensor  # (R,) unit of each row, -1 for the all-ones rows
    first: int
    last: int
    whole: torch.Tensor  # rows that are all ones
    pairs: torch.Tensor  # rows that are (image, unit) masks


def tally_rows(image: torch.Tensor, unit: torch.Tensor) -> TallyRows:
    first, last = int(image[0]), int(image[-1]) + 1
    return TallyRows(image - first, unit, first, last, torch.nonzero(unit < 0)[:, 0],
                     torch.nonzero(unit >= 0)[:, 0])


def dense_counts(maps: torch.Tensor, t32: torch.Tensor, rows: TallyRows, inputs: TallyInputs,
                 size: tuple[int, int], ws: Workspace) -> tuple[torch.Tensor, ImageLabels]:
    """Counts of every row when quads don't apply: one full (sh·sw) mask row per pair and
    per image (all ones), times the image's indicator."""
    s = size[0] * size[1]
    device = maps.device
    labels = image_labels(inputs, rows.first, rows.last, torch.arange(s, device=device), s, ws)
    canvas = ws.zeros("canvas", (len(rows.image), s), torch.bfloat16)
    canvas.index_fill_(0, rows.whole, 1.0)
    write_masks(canvas, rows.pairs, maps, t32, size)
    chunk, dtype = product_plan(s, labels.largest)
    counts = torch.zeros((len(rows.image), labels.labels.shape[1]), dtype=torch.float32,
                         device=device)
    images, sizes = torch.unique_consecutive(rows.image, return_counts=True)
    start = 0
    for image, n in zip(images.tolist(), sizes.tolist(), strict=True):
        width = labels.widths[image]
        masks = canvas[start : start + n].view(n, s // chunk, chunk).transpose(0, 1)
        indicator = labels.indicator(image, ws).view(s // chunk, chunk, width)
        exact_products(masks, indicator, s // chunk, dtype, counts[start : start + n, :width][None])
        start += n
    return counts, labels


def quad_slots(image: torch.Tensor, quad: torch.Tensor, n_images: int,
               n_quads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of every active (image, quad) entry - its rank among the entries of that image
    and quad, from 1 - and the slots each image needs per quad (slot 0: all ones)."""
    key = image * n_quads + quad
    per_quad = torch.bincount(key, minlength=n_images * n_quads)
    order = torch.argsort(key, stable=True)
    slot = torch.empty_like(key)
    first_of_key = per_quad.cumsum(0) - per_quad
    slot[order] = torch.arange(len(key), device=key.device) - first_of_key[key[order]]
    return slot + 1, per_quad.view(n_images, n_quads).amax(dim=1) + 1


@dataclass(frozen=True)
class QuadCanvas:
    """Where mask tiles go: per image, (quad, chunk of the tile, slot) rows of ``chunk``
    values, so that an image's product is one batched product over its quads and chunks."""

    slots: torch.Tensor  # (n,) slots per quad of each image
    start: torch.Tensor  # (n,) first product row of each image (n_quads x slots rows)
    n_quads: int
    per_tile: int  # chunks per tile

    @property
    def product_rows(self) -> int:
        return int(self.slots.sum()) * self.n_quads

    def rows(self, image: torch.Tensor, quad: torch.Tensor, slot: torch.Tensor | int
             ) -> torch.Tensor:
        """(..., per_tile) canvas rows of every chunk of the (image, quad, slot) tile."""
        slots = self.slots[image]
        base = (self.start[image] + quad * slots) * self.per_tile + slot
        chunk = torch.arange(self.per_tile, device=slots.device)
        return base[..., None] + chunk * slots[..., None]

    def product_row(self, image: torch.Tensor, quad: torch.Tensor, slot: torch.Tensor | int
                    ) -> torch.Tensor:
        return self.start[image] + quad * self.slots[image] + slot


def quad_products(canvas: torch.Tensor, layout: QuadCanvas, labels: ImageLabels,
                  dtype: torch.dtype, ws: Workspace) -> torch.Tensor:
    """(product rows, W) float32: every (image, quad, slot) tile against its image's
    indicator, one exact batched product per image."""
    chunk = canvas.shape[1]
    blocks = layout.n_quads * layout.per_tile
    products = ws.zeros("products", (layout.product_rows, labels.labels.shape[1]), torch.float32)
    starts, slots = layout.start.tolist(), layout.slots.tolist()
    for image, (start, count) in enumerate(zip(starts, slots, strict=True)):
        width = labels.widths[image]
        masks = canvas[start * layout.per_tile : (start + layout.n_quads * count) * layout.per_tile]
        indicator = labels.indicator(image, ws).view(blocks, chunk, width)
        out = products[start : start + layout.n_quads * count, :width]
        exact_products(masks.view(blocks, count, chunk), indicator, layout.per_tile, dtype,
                       out.view(layout.n_quads, count, width))
    return products


def quad_counts(maps: torch.Tensor, t32: torch.Tensor, rows: TallyRows, inputs: TallyInputs,
                grid: QuadGrid, sw: int, ws: Workspace) -> tuple[torch.Tensor, ImageLabels]:
    """Counts of every row on the quad grid: only the quads with a hot corner are computed."""
    device = maps.device
    n_quads, tile = grid.n_quads, grid.tile
    labels = image_labels(inputs, rows.first, rows.last, grid.position, n_quads * tile, ws)
    chunk, dtype = product_plan(tile, labels.largest)
    entry_pair, entry_quad = torch.nonzero(active_quads(maps, t32), as_tuple=True)
    entry_image = rows.image[rows.pairs][entry_pair]
    slot, slots = quad_slots(entry_image, entry_quad, rows.last - rows.first, n_quads)
    layout = QuadCanvas(slots, torch.cumsum(slots, 0) * n_quads - slots * n_quads, n_quads,
                        tile // chunk)
    canvas = ws.zeros("canvas", (layout.product_rows * layout.per_tile, chunk), torch.bfloat16)
    whole_image = rows.image[rows.whole]
    all_quads = torch.arange(n_quads, device=device)
    canvas.index_fill_(0, layout.rows(whole_image[:, None], all_quads, 0).view(-1), 1.0)
    at = layout.rows(entry_image, entry_quad, slot)
    tile_rows = grid.rows.tile
    for entries, values in quad_values(quad_rows(maps, sw, ws), entry_pair, entry_quad, grid, ws):
        mask = ws.empty("mask", (len(entries), grid.cols.tile, tile_rows), torch.bfloat16)
        mask[:, :, values.shape[2] :] = 0  # tile padding
        torch.gt(values, t32[entry_pair[entries], None, None], out=mask[:, :, : values.shape[2]])
        canvas.index_copy_(0, at[entries].view(-1), mask.view(-1, chunk))
    products = quad_products(canvas, layout, labels, dtype, ws)
    counts = torch.zeros((len(rows.image), products.shape[1]), dtype=torch.float32, device=device)
    counts.index_add_(0, rows.pairs[entry_pair],
                      products[layout.product_row(entry_image, entry_quad, slot)])
    whole_rows = layout.product_row(whole_image[:, None], all_quads, 0).view(-1)
    counts.index_add_(0, rows.whole.repeat_interleave(n_quads), products[whole_rows])
    return counts, labels


@dataclass
class BlockCounts:
    """The int64 counts of a block, accumulated chunk by chunk (SEMANTICS.md §4)."""

    intersection: torch.Tensor  # (K, L+1)
    label_area: torch.Tensor  # (L+1,)
    area: torch.Tensor  # (B, K) mask area of every (image, unit)
    carries: torch.Tensor  # (B, C+1) image carries a label of category c-1 (0: none)
    lite_area: torch.Tensor  # (K, C+1) lite union areas

    @staticmethod
    def zeros(b: int, k: int, n_labels: int, c: int, device: torch.device) -> BlockCounts:
        def z(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return BlockCounts(z(k, n_labels + 1), z(n_labels + 1), z(b, k),
                           z(b, c + 1, dtype=torch.bool), z(k, c + 1))

    def add(self, rows: TallyRows, unit: torch.Tensor, counts: torch.Tensor, labels: ImageLabels,
            category: torch.Tensor, lite: bool) -> None:
        """Counts (rows, W) of a chunk's rows: all-ones rows give label areas, unit rows
        intersections (column 0: mask area); ``category`` maps dense labels to category + 1."""
        k, width = self.intersection.shape
        columns = labels.labels.index_select(0, rows.image)  # dense label of every count
        self.label_area.index_add_(0, columns.index_select(0, rows.whole).view(-1),
                                   counts.index_select(0, rows.whole).view(-1))
        pair_counts = counts.index_select(0, rows.pairs)
        pair_columns = columns.index_select(0, rows.pairs)
        self.intersection.view(-1).index_add_(0, (unit[:, None] * width + pair_columns).view(-1),
                                              pair_counts.view(-1))
        image = rows.image.index_select(0, rows.pairs) + rows.first
        self.area.view(-1).index_add_(0, image * k + unit, pair_counts[:, 0])
        self.carries[rows.first : rows.last].scatter_(1, category[labels.labels], True)
        if lite:  # the mask meets a label of the category (image-level labels meet any mask)
            overlap = torch.zeros((len(unit), self.lite_area.shape[1]), dtype=torch.int64,
                                  device=unit.device)
            overlap.scatter_add_(1, category[pair_columns[:, 1:]], (pair_counts[:, 1:] > 0).long())
            self.lite_area.index_add_(0, unit, pair_counts[:, :1] * (overlap > 0))

    def result(self, union: str) -> dict[str, torch.Tensor]:
        self.intersection[:, 0] = 0
        self.label_area[0] = 0
        k, c = self.lite_area.shape[0], self.lite_area.shape[1] - 1
        if union == "global":
            unit_area = self.area.sum(dim=0, keepdim=True).T.expand(k, c).clone()
        elif union == "restricted":
            unit_area = torch.round(self.area.double().T @ self.carries[:, 1:].double())
            unit_area = unit_area.to(torch.int64)
        else:
            unit_area = self.lite_area[:, 1:].contiguous()
        return {"intersection": self.intersection, "unit_area": unit_area,
                "label_area": self.label_area}


def tally_plan(device: torch.device, shape: tuple[int, int, int, int], kernel: str = "auto"):
    """The compiled loop's plan when ``kernel`` and the device let it count (see
    :func:`tally_block`); None for the torch kernel.  GPUs always take the torch kernel."""
    if kernel not in ("auto", "compiled", "torch"):
        raise ValueError(f"unknown tally kernel {kernel!r}")
    plan = compiled_plan(*shape) if device.type == "cpu" and kernel != "torch" else None
    if kernel == "compiled" and plan is None:
        raise ValueError(f"the compiled tally is not exact for {shape} on {device}")
    return plan


def tally_block(
    acts: torch.Tensor,
    thresholds: torch.Tensor,
    inputs: TallyInputs,
    n_labels: int,
    seg_size: tuple[int, int],
    union: str,
    pair_chunk: int = 1024,
    kernel: str = "auto",
) -> dict[str, torch.Tensor]:
    """Exact int64 counts of one block of images for every unit and label.

    ``kernel``: "compiled" counts with the compiled CPU loop (:mod:`stages.tally.compiled`), "torch"
    with the batched torch kernel below, "auto" with the compiled loop on CPU where
    :func:`~stages.tally.compiled.compiled_plan` finds it exact for the shape, else torch.

    acts (B, K, h, w) raw activations; thresholds (K,) float64.  Only (image, unit) pairs
    whose raw maximum can reach the threshold are upsampled (:func:`skip_bound`): a bilinear
    value is a convex combination of raw cells, so the others have empty masks.  Each image
    contributes one all-ones row (its label areas) and one row per active unit; at most
    ``pair_chunk`` such rows are counted at once, on the quad grid where :func:`quads_exact`
    holds and on dense mask rows otherwise.
    Returns intersection (K, L+1), unit_area (K, C), label_area (L+1,).
    """
    if union not in ("restricted", "global", "lite"):
        raise ValueError(f"unknown union mode {union!r}")
    device = acts.device
    b, k, h, w = acts.shape
    sh, sw = seg_size
    t32 = float32_below(thresholds.to(device=device, dtype=torch.float64))
    totals = BlockCounts.zeros(b, k, n_labels, inputs.n_categories, device)
    plan = tally_plan(device, (h, w, sh, sw), kernel)
    if plan is not None:
        out = {name: getattr(totals, name).numpy()
               for name in ("intersection", "label_area", "area", "carries", "lite_area")}
        plan.tally(acts.float().numpy(), t32.numpy(), skip_bound(t32).numpy(),
                   inputs.stored_pixel.numpy(), inputs.stored_image.numpy(), inputs.lut.numpy(),
                   (inputs.label_category + 1).numpy(), inputs.planes == "multiset",
                   union == "lite", out)
        return totals.result(union)
    maps = acts.float().reshape(b * k, h, w)
    active = maps.amax(dim=(1, 2)).view(b, k) > skip_bound(t32)[None, :]
    whole = torch.ones((b, 1), dtype=torch.bool, device=device)
    row_image, row_column = torch.nonzero(torch.cat([whole, active], dim=1), as_tuple=True)
    row_unit = row_column - 1  # -1: the image's all-ones row
    grid = quad_grid(h, w, sh, sw, str(device)) if quads_exact(h, w, sh, sw, device.type) else None
    category = inputs.label_category + 1
    ws = Workspace(device)
    step = max(pair_chunk, 1)
    for start in range(0, len(row_image), step):
        stop = start + step
        rows = tally_rows(row_image[start:stop], row_unit[start:stop])
        image = rows.image.index_select(0, rows.pairs) + rows.first
        unit = rows.unit.index_select(0, rows.pairs)
        pair_maps, pair_t32 = maps.index_select(0, image * k + unit), t32.index_select(0, unit)
        if grid is None:
            counts, labels = dense_counts(pair_maps, pair_t32, rows, inputs, seg_size, ws)
        else:
            counts, labels = quad_counts(pair_maps, pair_t32, rows, inputs, grid, sw, ws)
        counts = whole_image_labels(counts, labels.image_level.index_select(0, rows.image),
                                    inputs.planes)
        totals.add(rows, unit, counts.long(), labels, category, union == "lite")
    return totals.result(union)
