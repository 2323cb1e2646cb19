"""The CPU mask producer as one compiled loop (numba): every unit's mask pixels per pixel
class (:mod:`stages.tally.classes`), with no tensors in between.

Why: a mask is ``bilinear(A) > T`` (SEMANTICS.md §2, :mod:`stages.tally.masks`), and only the
pixels next to a cell above the skip bound can be in it.  One loop per block walks (image,
active unit, hot quad, pixel) and counts each mask pixel into its class, so no mask is ever
materialised; :mod:`stages.tally.counts` and the signatures turn the counts per class into
counts per label.  The loops release the GIL, so Dask's threads run blocks side by side.

Exactness: the loop computes each value the way torch's CPU kernel does.  That kernel, as
compiled, takes one of two forms depending on the output shape (measured on torch 2.14: rows
first, each step ``w0·a0 + w1·a1`` with one fused multiply-add; or four corner terms in one
fused chain), so :func:`compiled_masks` tries the forms, fused or not, and keeps the one that
equals ``F.interpolate`` bit for bit on every output pixel of test maps.  Where none does
(another build or CPU), and on a GPU, the torch producer runs instead.  The check needs torch;
its answer depends only on the machine (:func:`machine_identity`), so a run records it
(:class:`VerifiedForm`) and later runs on the same machine tally without importing torch.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from stages.tally.classes import PixelClasses
from stages.tally.masks import MaskClasses
from storage.artifacts import digest


@intrinsic
def _fma32(typingctx, a, b, c):  # noqa: ARG001 - numba's intrinsic signature
    """a·b + c in float32 with one rounding (LLVM's fma: exact on any CPU)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3))
        return builder.call(fma, args)

    return sig, codegen


@njit(inline="always")
def _lerp(w0, a0, w1, a1, fused):
    """w0·a0 + w1·a1 as torch's CPU kernel rounds it (fused: w1·a1 rounded, then one fma)."""
    if fused:
        return _fma32(w0, a0, w1 * a1)
    return w0 * a0 + w1 * a1


@njit(inline="always")
def _four_terms(w00, w01, w10, w11, a00, a01, a10, a11, fused):
    """The other form torch's CPU kernel takes for some shapes: the four corner weights
    (products of the axis weights) applied in one chain, starting from w01·a01."""
    if fused:
        return _fma32(w11, a11, _fma32(w10, a10, _fma32(w00, a00, w01 * a01)))
    return w01 * a01 + w00 * a00 + w10 * a10 + w11 * a11


@njit(nogil=True, cache=True)
def _source_index(scale, n_out, fused):
    """scale·(i + 0.5) - 0.5 per output position, clamped at 0 (align_corners=False)."""
    out = np.empty(n_out, np.float32)
    for i in range(n_out):
        centre = np.float32(i) + np.float32(0.5)
        if fused:
            src = _fma32(scale, centre, np.float32(-0.5))
        else:
            src = scale * centre - np.float32(0.5)
        out[i] = max(src, np.float32(0.0))
    return out


class Axis(NamedTuple):
    """Torch's two source cells and weights of every output position along one axis, and the
    runs of positions that read the same cells (one side of a quad)."""

    first: np.ndarray  # (n_out,) int64
    second: np.ndarray  # (n_out,) int64, = first at the last cell
    w_first: np.ndarray  # (n_out,) float32
    w_second: np.ndarray  # (n_out,) float32
    run_start: np.ndarray  # (R,) int64 first position of each run
    run_stop: np.ndarray  # (R,) int64


class Form(NamedTuple):
    """Which arithmetic reproduces torch's: two 1-D steps, or four corner terms (``four``,
    with ``corner`` (4, sh, sw) the rounded corner weights), fused multiply-adds or not."""

    corner: np.ndarray
    four: bool
    fused: bool


def torch_axis(n_in: int, n_out: int, fused: bool) -> Axis:
    """Source cells and weights as torch computes them for ``n_in -> n_out``."""
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    src = _source_index(scale, n_out, fused)
    first = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w_second = np.clip(src - first.astype(np.float32), 0, 1).astype(np.float32)
    second = first + (first < n_in - 1)
    w_first = (np.float32(1) - w_second).astype(np.float32)
    key = np.stack([first, second, w_second == 0], axis=1)
    starts = np.flatnonzero(np.concatenate([[True], (key[1:] != key[:-1]).any(axis=1)]))
    return Axis(first, second, w_first, w_second, starts.astype(np.int64),
                np.append(starts[1:], n_out).astype(np.int64))


@njit(nogil=True, cache=True)
def _upsample(maps, rows, cols, form):
    """(n, h, w) -> (n, sh, sw): every value, for the exactness check."""
    out = np.empty((maps.shape[0], rows.first.shape[0], cols.first.shape[0]), np.float32)
    corner = form.corner
    for m in range(maps.shape[0]):
        a = maps[m]
        for y in range(rows.first.shape[0]):
            y0, y1 = rows.first[y], rows.second[y]
            for x in range(cols.first.shape[0]):
                x0, x1 = cols.first[x], cols.second[x]
                if form.four:
                    out[m, y, x] = _four_terms(corner[0, y, x], corner[1, y, x], corner[2, y, x],
                                               corner[3, y, x], a[y0, x0], a[y0, x1], a[y1, x0],
                                               a[y1, x1], form.fused)
                else:
                    r0 = _lerp(cols.w_first[x], a[y0, x0], cols.w_second[x], a[y0, x1],
                               form.fused)
                    r1 = _lerp(cols.w_first[x], a[y1, x0], cols.w_second[x], a[y1, x1],
                               form.fused)
                    out[m, y, x] = _lerp(rows.w_first[y], r0, rows.w_second[y], r1, form.fused)
    return out


@njit(inline="always")
def _can_reach(a, bound):
    """Does a cell of map ``a`` exceed ``bound`` (:func:`stages.tally.masks.skip_bound`)?  If
    not, no bilinear value can exceed the threshold: the mask is empty."""
    peak = a[0, 0]
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            peak = max(peak, a[i, j])
    return peak > bound


@njit(inline="always")
def _band(bands, value):
    """How many of the ascending ``bands`` lie below ``value`` (binary search)."""
    lo, hi = 0, bands.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if bands[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(nogil=True, cache=True)
def _mask_classes(a, t, bound, rows, cols, form, cls, counts, touched, r0, r1, bands):
    """Count the mask pixels of map ``a`` (h, w) per class into ``counts``, listing the keys
    touched in ``touched``; returns how many.  The key is the class, or with ``bands``
    (ascending thresholds, ``t`` the first) class·(len + 1) + the pixel's band.  Only quads
    with a corner cell above ``bound`` are computed.  (The counting is written out in both
    branches: an inlined helper that returned the counter measured 2.7x slower.)"""
    sw = cols.first.shape[0]
    corner, fused = form.corner, form.fused
    stride = bands.shape[0] + 1
    n_touched = 0
    for ry in range(rows.run_start.shape[0]):
        ya, yb = rows.run_start[ry], rows.run_stop[ry]
        ca, cb, two_rows = rows.first[ya], rows.second[ya], rows.w_second[ya] != 0
        for rx in range(cols.run_start.shape[0]):
            xa, xb = cols.run_start[rx], cols.run_stop[rx]
            da, db, two_cols = cols.first[xa], cols.second[xa], cols.w_second[xa] != 0
            hot = a[ca, da] > bound
            if two_cols:
                hot = hot or a[ca, db] > bound
            if two_rows:
                hot = hot or a[cb, da] > bound
                if two_cols:
                    hot = hot or a[cb, db] > bound
            if not hot:
                continue  # no corner can reach T: no mask pixel in this quad
            if form.four:
                a00, a01, a10, a11 = a[ca, da], a[ca, db], a[cb, da], a[cb, db]
                for y in range(ya, yb):
                    for x in range(xa, xb):
                        v = _four_terms(corner[0, y, x], corner[1, y, x], corner[2, y, x],
                                        corner[3, y, x], a00, a01, a10, a11, fused)
                        if v > t:
                            c = cls[y * sw + x]
                            if stride > 1:
                                c = c * stride + _band(bands, v)
                            if counts[c] == 0:
                                touched[n_touched] = c
                                n_touched += 1
                            counts[c] += 1
                continue
            for x in range(xa, xb):
                r0[x] = _lerp(cols.w_first[x], a[ca, cols.first[x]], cols.w_second[x],
                              a[ca, cols.second[x]], fused)
                r1[x] = _lerp(cols.w_first[x], a[cb, cols.first[x]], cols.w_second[x],
                              a[cb, cols.second[x]], fused)
            for y in range(ya, yb):
                h0, h1, row = rows.w_first[y], rows.w_second[y], y * sw
                for x in range(xa, xb):
                    v = _lerp(h0, r0[x], h1, r1[x], fused)
                    if v > t:
                        c = cls[row + x]
                        if stride > 1:
                            c = c * stride + _band(bands, v)
                        if counts[c] == 0:
                            touched[n_touched] = c
                            n_touched += 1
                        counts[c] += 1
    return n_touched


@njit(nogil=True, cache=True)
def _unit_class_counts(acts, t32, bound, classes, rows, cols, form, bands):
    """(unit, class, pixels, band) for every class (and band) a unit's mask meets (see
    :meth:`CompiledMasks.mask_classes`); the entries of one (image, unit) are contiguous."""
    n_images, n_units = acts.shape[:2]
    cls, first = classes.pixel_class, classes.first
    stride = bands.shape[1] + 1
    active = np.zeros((n_images, n_units), np.bool_)
    capacity = 0
    for b in range(n_images):
        for k in range(n_units):
            active[b, k] = _can_reach(acts[b, k], bound[k])
            if active[b, k]:  # a mask meets at most every class of its image
                capacity += first[b + 1] - first[b]
    unit = np.empty(capacity, np.int64)
    klass = np.empty(capacity, np.int64)
    pixels = np.empty(capacity, np.int64)
    band = np.zeros(capacity, np.int64)
    counts = np.zeros(first[n_images] * stride, np.int64)
    touched = np.empty(first[n_images] * stride, np.int64)
    r0 = np.empty(cols.first.shape[0], np.float32)
    r1 = np.empty(cols.first.shape[0], np.float32)
    n = 0
    for b in range(n_images):
        for k in range(n_units):
            if not active[b, k]:
                continue
            n_touched = _mask_classes(acts[b, k], t32[k], bound[k], rows, cols, form, cls[b],
                                      counts, touched, r0, r1, bands[k])
            if n + n_touched > unit.shape[0]:  # bands: an entry per (class, band) met
                grow = max(2 * unit.shape[0], n + n_touched)
                unit, klass = _grown(unit, grow), _grown(klass, grow)
                pixels, band = _grown(pixels, grow), _grown(band, grow)
            for i in range(n_touched):
                key = touched[i]
                unit[n], klass[n], band[n], pixels[n] = k, key // stride, key % stride, counts[key]
                counts[key] = 0
                n += 1
    return unit[:n], klass[:n], pixels[:n], band[:n]


@njit(inline="always")
def _grown(array, size):
    out = np.zeros(size, array.dtype)
    out[: array.shape[0]] = array
    return out


@dataclass(frozen=True)
class CompiledMasks:
    """How the compiled loop reproduces torch's upsampling for one (h, w) -> (sh, sw): the
    axes' cells and weights, and the form of the sum."""

    rows: Axis
    cols: Axis
    form: Form

    @staticmethod
    def of(rows: Axis, cols: Axis, four: bool, fused: bool) -> CompiledMasks:
        h = np.stack([rows.w_first, rows.w_second])[:, None, :, None]
        w = np.stack([cols.w_first, cols.w_second])[None, :, None, :]
        corner = np.ascontiguousarray((h * w).reshape(4, len(rows.first), len(cols.first)))
        return CompiledMasks(rows, cols, Form(corner, four, fused))

    def describe(self) -> str:
        form = "four corner terms" if self.form.four else "rows first"
        return f"{form}, {'fused' if self.form.fused else 'unfused'} multiply-adds"

    def upsample(self, maps: np.ndarray) -> np.ndarray:
        return _upsample(np.ascontiguousarray(maps, np.float32), self.rows, self.cols, self.form)

    def mask_classes(self, acts: np.ndarray, t32: np.ndarray, bound: np.ndarray,
                     classes: PixelClasses, bands: np.ndarray | None = None) -> MaskClasses:
        """Every unit's mask pixels per class over the images acts (B, K, h, w): t32 (K,) the
        thresholds of :func:`~stages.tally.masks.float32_below`, bound (K,) their
        :func:`~stages.tally.masks.skip_bound`; with ``bands`` (K, R) ascending float32
        thresholds (t32 their first column), per class and band (:class:`MaskClasses`)."""
        k = acts.shape[1]
        bands = np.zeros((k, 0), np.float32) if bands is None else bands
        return MaskClasses(*_unit_class_counts(
            np.ascontiguousarray(acts, np.float32), t32.astype(np.float32),
            bound.astype(np.float32), classes, self.rows, self.cols, self.form,
            np.ascontiguousarray(bands, np.float32)))


# the forms tried, in this order: (fused source index, four corner terms, fused sum)
VARIANTS = tuple((fused_source, four, fused) for fused_source in (True, False)
                 for four in (False, True) for fused in (True, False))
Shape = tuple[int, int, int, int]  # (h, w) -> (sh, sw)


class VerifiedForm(NamedTuple):
    """Which of :data:`VARIANTS` equals torch's CPU upsampling for ``shape`` on the machine
    whose :func:`machine_digest` is ``machine`` (-1: none does), as checked there."""

    machine: str
    shape: Shape
    variant: int


@lru_cache(maxsize=1)
def machine_identity() -> dict:
    """What torch's CPU kernel and this loop's arithmetic depend on, read without importing
    torch: the torch and numba builds, the CPU and its features, torch's capability override."""
    from importlib.metadata import version

    import numba
    from llvmlite import binding

    return {"torch": version("torch"), "numba": numba.__version__,
            "machine": platform.machine(), "cpu": binding.get_host_cpu_name(),
            "features": binding.get_host_cpu_features().flatten(),
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY")}


@lru_cache(maxsize=1)
def machine_digest() -> str:
    return digest(machine_identity())


@lru_cache(maxsize=64)
def form_of(shape: Shape, variant: int) -> CompiledMasks | None:
    """The compiled producer of one variant for ``shape`` (None for -1)."""
    if variant < 0:
        return None
    h, w, sh, sw = shape
    fused_source, four, fused = VARIANTS[variant]
    return CompiledMasks.of(torch_axis(h, sh, fused_source), torch_axis(w, sw, fused_source),
                            four, fused)


@lru_cache(maxsize=64)
def verified_variant(h: int, w: int, sh: int, sw: int) -> int:
    """The first variant whose values equal ``F.interpolate`` on every pixel of maps of mixed
    magnitude, sign and plateaus, on this machine; -1 if none does (imports torch)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(12345)
    scale = torch.tensor([1e-30, 1e-3, 1, 1, 10, 1e3, 1e5, 1e30, -1, 1]).view(10, 1, 1)
    maps = torch.randn((10, h, w), generator=gen) * scale
    maps[3] = maps[3].round()
    maps[9] = maps[9].abs().round()
    full = F.interpolate(maps[:, None], size=(sh, sw), mode="bilinear", align_corners=False)
    full = full[:, 0].numpy()
    for variant in range(len(VARIANTS)):
        if np.array_equal(form_of((h, w, sh, sw), variant).upsample(maps.numpy()), full):
            return variant
    return -1


def compiled_masks(h: int, w: int, sh: int, sw: int) -> CompiledMasks | None:
    """The variant of torch's CPU arithmetic that this build uses for (h, w) -> (sh, sw),
    checked here; None if none is exact."""
    return form_of((h, w, sh, sw), verified_variant(h, w, sh, sw))


def recorded_variant(shape: Shape, verified: tuple[VerifiedForm, ...]) -> int | None:
    """This machine's recorded variant for ``shape`` among ``verified``; None if not there."""
    mine = machine_digest() if verified else None
    return next((form.variant for form in verified
                 if form.machine == mine and tuple(form.shape) == tuple(shape)), None)
