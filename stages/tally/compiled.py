"""The CPU tally as one compiled loop (numba): the counts of SEMANTICS.md §4 (and the
signatures of §6) with no tensors in between.

Why: the torch tally (:func:`stages.tally.kernels.tally_block`) is batched for any device, and on CPU
it pays for it in per-op overhead, per-image label indicators and mask canvases.  Here one
loop per block walks (image, active unit, hot quad, pixel) and counts each mask pixel into its
*pixel class*: the pixels of an image that carry the same label in every plane form one class,
so a mask's counts per label are its counts per class times each class's labels.  The same
classes give the formula signatures (``stages.explain``): one sorted label set per class, and
each unit's mask pixels per class.  The loops release the GIL, so Dask's threads run blocks
side by side.

Exactness: a mask pixel is ``bilinear(A) > T`` in torch's float32 arithmetic, so the loop
computes each value the way torch's CPU kernel does.  That kernel, as compiled, takes one of
two forms depending on the output shape (measured on torch 2.14: rows first, each step
``w0·a0 + w1·a1`` with one fused multiply-add; or four corner terms in one fused chain), so
:func:`compiled_plan` tries the forms, fused or not, and keeps the one that equals
``F.interpolate`` bit for bit on every output pixel of test maps.  Where none does (another
build or CPU), and on a GPU, the torch tally runs instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


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


@dataclass(frozen=True)
class Axis:
    """Torch's two source cells and weights of every output position along one axis, and the
    runs of positions that read the same cells (one side of a quad)."""

    first: np.ndarray  # (n_out,) int64
    second: np.ndarray  # (n_out,) int64, = first at the last cell
    w_first: np.ndarray  # (n_out,) float32
    w_second: np.ndarray  # (n_out,) float32
    run_start: np.ndarray  # (R,) int64 first position of each run
    run_stop: np.ndarray  # (R,) int64


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
def _upsample(maps, y0, y1, wy0, wy1, x0, x1, wx0, wx1, corner, four, fused):
    """(n, h, w) -> (n, sh, sw): every value, for the exactness check."""
    out = np.empty((maps.shape[0], y0.shape[0], x0.shape[0]), np.float32)
    for m in range(maps.shape[0]):
        a = maps[m]
        for y in range(y0.shape[0]):
            for x in range(x0.shape[0]):
                if four:
                    out[m, y, x] = _four_terms(corner[0, y, x], corner[1, y, x], corner[2, y, x],
                                               corner[3, y, x], a[y0[y], x0[x]], a[y0[y], x1[x]],
                                               a[y1[y], x0[x]], a[y1[y], x1[x]], fused)
                else:
                    r0 = _lerp(wx0[x], a[y0[y], x0[x]], wx1[x], a[y0[y], x1[x]], fused)
                    r1 = _lerp(wx0[x], a[y1[y], x0[x]], wx1[x], a[y1[y], x1[x]], fused)
                    out[m, y, x] = _lerp(wy0[y], r0, wy1[y], r1, fused)
    return out


@njit(nogil=True, cache=True)
def _pixel_classes(planes, cls, rep, slots):
    """Number the distinct label tuples of an image's pixels, planes (P, S) of stored label
    numbers: cls[s] = class of pixel s, rep[c] = a pixel of class c; returns the number of
    classes.  (Two stored numbers with one dense label - both unscored, say - make two classes
    with the same labels: the counts are the same, and no pixel needs a lookup.)"""
    n_planes, n_pixels = planes.shape
    mask = slots.shape[0] - 1
    slots[:] = -1
    n = 0
    for s in range(n_pixels):
        if s > 0:  # label regions are runs: most pixels repeat their left neighbour
            same = True
            for p in range(n_planes):
                if planes[p, s] != planes[p, s - 1]:
                    same = False
                    break
            if same:
                cls[s] = cls[s - 1]
                continue
        key = np.int64(-3750763034362895579)  # FNV-1a over the tuple
        for p in range(n_planes):
            key = (key ^ planes[p, s]) * np.int64(1099511628211)
        slot = (key ^ (key >> 29)) & mask
        while True:
            c = slots[slot]
            if c < 0:
                slots[slot] = n
                rep[n] = s
                cls[s] = n
                n += 1
                break
            same = True
            for p in range(n_planes):
                if planes[p, rep[c]] != planes[p, s]:
                    same = False
                    break
            if same:
                cls[s] = c
                break
            slot = (slot + 1) & mask
    return n


@njit(inline="always")
def _class_slots(n_pixels):
    """The open-addressing table of :func:`_pixel_classes`: a power of two, at most half full."""
    size = 1
    while size < 2 * n_pixels:
        size *= 2
    return np.empty(size, np.int64)


@njit(inline="always")
def _can_reach(a, bound):
    """Does a cell of map ``a`` exceed ``bound`` (:func:`stages.tally.kernels.skip_bound`)?  If not,
    no bilinear value can exceed the threshold: the mask is empty."""
    peak = a[0, 0]
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            peak = max(peak, a[i, j])
    return peak > bound


@njit(inline="always")
def _image_level(lut, stored):
    """The dense labels of one image's image-level label numbers, the unscored left out."""
    dense = np.empty(stored.shape[0], np.int64)
    for q in range(stored.shape[0]):
        dense[q] = _dense(lut, stored[q])
    return dense[dense > 0]


@njit(inline="always")
def _dense(lut, number):
    """lut[number], refusing a number outside it (compiled code does not check bounds; the
    concept store admits only label.csv's numbers, so this means a damaged store)."""
    if number < 0 or number >= lut.shape[0]:
        raise IndexError("a stored label number is outside the concept store's label list")
    return lut[number]


@njit(nogil=True, cache=True)
def _class_labels(planes, lut, image_level, rep, n_classes, multiset, labels, n_labels):
    """Each class's dense labels - its planes', then the image-level ones (which cover every
    pixel) - once per label (set) or once per occurrence (multiset)."""
    n_planes = planes.shape[0]
    for c in range(n_classes):
        n = 0
        for j in range(n_planes + image_level.shape[0]):
            label = _dense(lut, planes[j, rep[c]]) if j < n_planes else image_level[j - n_planes]
            if label == 0:
                continue
            repeat = False
            if not multiset:
                for i in range(n):
                    repeat = repeat or labels[c, i] == label
            if not repeat:
                labels[c, n] = label
                n += 1
        n_labels[c] = n


@njit(nogil=True, cache=True)
def _mask_classes(a, t, bound, y0, y1, wy0, wy1, y_start, y_stop, x0, x1, wx0, wx1, x_start,
                  x_stop, corner, four, fused, cls, counts, touched, r0, r1):
    """Count the mask pixels of map ``a`` (h, w) per class into ``counts``, listing the classes
    touched in ``touched``; returns how many.  Only quads with a corner cell above ``bound``
    are computed.  (The counting is written out in both branches: an inlined helper that
    returned the counter measured 2.7x slower.)"""
    sw = x0.shape[0]
    n_touched = 0
    for ry in range(y_start.shape[0]):
        ya, yb = y_start[ry], y_stop[ry]
        ca, cb, two_rows = y0[ya], y1[ya], wy1[ya] != 0
        for rx in range(x_start.shape[0]):
            xa, xb = x_start[rx], x_stop[rx]
            da, db, two_cols = x0[xa], x1[xa], wx1[xa] != 0
            hot = a[ca, da] > bound
            if two_cols:
                hot = hot or a[ca, db] > bound
            if two_rows:
                hot = hot or a[cb, da] > bound
                if two_cols:
                    hot = hot or a[cb, db] > bound
            if not hot:
                continue  # no corner can reach T: no mask pixel in this quad
            if four:
                a00, a01, a10, a11 = a[ca, da], a[ca, db], a[cb, da], a[cb, db]
                for y in range(ya, yb):
                    for x in range(xa, xb):
                        if _four_terms(corner[0, y, x], corner[1, y, x], corner[2, y, x],
                                       corner[3, y, x], a00, a01, a10, a11, fused) > t:
                            c = cls[y * sw + x]
                            if counts[c] == 0:
                                touched[n_touched] = c
                                n_touched += 1
                            counts[c] += 1
                continue
            for x in range(xa, xb):
                r0[x] = _lerp(wx0[x], a[ca, x0[x]], wx1[x], a[ca, x1[x]], fused)
                r1[x] = _lerp(wx0[x], a[cb, x0[x]], wx1[x], a[cb, x1[x]], fused)
            for y in range(ya, yb):
                h0, h1, row = wy0[y], wy1[y], y * sw
                for x in range(xa, xb):
                    if _lerp(h0, r0[x], h1, r1[x], fused) > t:
                        c = cls[row + x]
                        if counts[c] == 0:
                            touched[n_touched] = c
                            n_touched += 1
                        counts[c] += 1
    return n_touched


@njit(nogil=True, cache=True)
def _tally(acts, t32, bound, stored_pixel, stored_image, lut, category, multiset, lite,
           y0, y1, wy0, wy1, y_start, y_stop, x0, x1, wx0, wx1, x_start, x_stop, corner, four,
           fused, intersection, label_area, area, carries, lite_area):
    """Add one block's counts to the output arrays (see :meth:`Plan.tally`)."""
    n_images, n_units = acts.shape[:2]
    n_planes, n_pixels = stored_pixel.shape[1], stored_pixel.shape[2]
    slots = _class_slots(n_pixels)
    cls = np.empty(n_pixels, np.int64)
    rep = np.empty(n_pixels, np.int64)
    size = np.zeros(n_pixels, np.int64)
    labels = np.zeros((n_pixels, n_planes + stored_image.shape[1]), np.int64)
    n_labels = np.zeros(n_pixels, np.int64)
    counts = np.zeros(n_pixels, np.int64)
    touched = np.empty(n_pixels, np.int64)
    r0 = np.empty(x0.shape[0], np.float32)
    r1 = np.empty(x0.shape[0], np.float32)
    met = np.full(lite_area.shape[1], -1, np.int64)  # last pair that met each category
    for b in range(n_images):
        n_classes = _pixel_classes(stored_pixel[b], cls, rep, slots)
        size[:n_classes] = 0
        for s in range(n_pixels):
            size[cls[s]] += 1
        _class_labels(stored_pixel[b], lut, _image_level(lut, stored_image[b]), rep, n_classes,
                      multiset, labels, n_labels)
        carries[b, 0] = True
        for c in range(n_classes):
            for i in range(n_labels[c]):
                label_area[labels[c, i]] += size[c]
                carries[b, category[labels[c, i]]] = True
        for k in range(n_units):
            a = acts[b, k]
            if not _can_reach(a, bound[k]):
                continue
            n_touched = _mask_classes(a, t32[k], bound[k], y0, y1, wy0, wy1, y_start, y_stop,
                                      x0, x1, wx0, wx1, x_start, x_stop, corner, four, fused,
                                      cls, counts, touched, r0, r1)
            total = 0
            for i in range(n_touched):
                c = touched[i]
                total += counts[c]
                for j in range(n_labels[c]):
                    intersection[k, labels[c, j]] += counts[c]
            area[b, k] = total
            if lite and total > 0:  # the mask meets a label of the category
                pair = b * n_units + k
                for i in range(n_touched):
                    c = touched[i]
                    for j in range(n_labels[c]):
                        cat = category[labels[c, j]]
                        if met[cat] != pair:
                            met[cat] = pair
                            lite_area[k, cat] += total
            for i in range(n_touched):
                counts[touched[i]] = 0


@njit(nogil=True, cache=True)
def _class_signatures(stored_pixel, stored_image, lut):
    """(B, S) class of every pixel, numbered across the block, and (classes, P + Q) each
    class's signature: its distinct dense labels ascending, zeros first."""
    n_images, n_planes, n_pixels = stored_pixel.shape
    width = n_planes + stored_image.shape[1]
    slots = _class_slots(n_pixels)
    cls = np.empty((n_images, n_pixels), np.int64)
    rep = np.empty((n_images, n_pixels), np.int64)
    first = np.zeros(n_images + 1, np.int64)  # first block-wide class of each image
    for b in range(n_images):
        first[b + 1] = first[b] + _pixel_classes(stored_pixel[b], cls[b], rep[b], slots)
        cls[b] += first[b]
    rows = np.zeros((first[n_images], width), np.int64)
    labels = np.zeros((n_pixels, width), np.int64)
    n_labels = np.zeros(n_pixels, np.int64)
    for b in range(n_images):
        n_classes = first[b + 1] - first[b]
        _class_labels(stored_pixel[b], lut, _image_level(lut, stored_image[b]), rep[b],
                      n_classes, False, labels, n_labels)
        for c in range(n_classes):
            n = n_labels[c]
            rows[first[b] + c, width - n :] = np.sort(labels[c, :n])
    return cls, rows


@njit(nogil=True, cache=True)
def _unit_class_counts(acts, t32, bound, cls, y0, y1, wy0, wy1, y_start, y_stop, x0, x1, wx0,
                       wx1, x_start, x_stop, corner, four, fused):
    """(unit, class, pixels) for every class a unit's mask meets, cls (B, S) numbered across
    the block (see :func:`_class_signatures`)."""
    n_images, n_units = acts.shape[:2]
    n_classes = cls.max() + 1 if cls.size else 0
    active = np.zeros((n_images, n_units), np.bool_)
    capacity = 0
    for b in range(n_images):
        for k in range(n_units):
            active[b, k] = _can_reach(acts[b, k], bound[k])
            if active[b, k]:  # a mask meets at most every class of its image
                capacity += cls[b].max() - cls[b].min() + 1
    unit = np.empty(capacity, np.int64)
    klass = np.empty(capacity, np.int64)
    pixels = np.empty(capacity, np.int64)
    counts = np.zeros(n_classes, np.int64)
    touched = np.empty(n_classes, np.int64)
    r0 = np.empty(x0.shape[0], np.float32)
    r1 = np.empty(x0.shape[0], np.float32)
    n = 0
    for b in range(n_images):
        for k in range(n_units):
            if not active[b, k]:
                continue
            n_touched = _mask_classes(acts[b, k], t32[k], bound[k], y0, y1, wy0, wy1, y_start,
                                      y_stop, x0, x1, wx0, wx1, x_start, x_stop, corner, four,
                                      fused, cls[b], counts, touched, r0, r1)
            for i in range(n_touched):
                c = touched[i]
                unit[n], klass[n], pixels[n] = k, c, counts[c]
                counts[c] = 0
                n += 1
    return unit[:n], klass[:n], pixels[:n]


def class_signatures(stored_pixel: np.ndarray, stored_image: np.ndarray, lut: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel signatures (SEMANTICS.md §6) by pixel class: ``cls`` (B, S) numbers the classes
    across the block and ``rows`` (classes, P + Q) holds each class's signature - its distinct
    dense labels ascending, zeros first - so pixel s of image b has ``rows[cls[b, s]]``.  A
    block has a few classes per image where it has thousands of pixels, so the signatures
    are sorted once per class instead of once per pixel.  stored_pixel (B, P, S) and
    stored_image (B, Q) hold stored label numbers; ``lut`` maps them to dense labels."""
    return _class_signatures(np.ascontiguousarray(stored_pixel, np.int32),
                             np.ascontiguousarray(stored_image, np.int32), lut.astype(np.int64))


@dataclass(frozen=True)
class Plan:
    """How the compiled tally reproduces torch's upsampling for one (h, w) -> (sh, sw): the
    axes' cells and weights, and the form of the sum - two 1-D steps (rows first), or four
    corner terms (``four``) - each fused or not."""

    rows: Axis
    cols: Axis
    four: bool
    fused: bool

    @cached_property
    def corner(self) -> np.ndarray:
        """(4, sh, sw) float32 corner weights h0·w0, h0·w1, h1·w0, h1·w1 (each rounded)."""
        h = np.stack([self.rows.w_first, self.rows.w_second])[:, None, :, None]
        w = np.stack([self.cols.w_first, self.cols.w_second])[None, :, None, :]
        return np.ascontiguousarray((h * w).reshape(4, len(self.rows.first), len(self.cols.first)))

    def axes(self) -> tuple:
        r, c = self.rows, self.cols
        return (r.first, r.second, r.w_first, r.w_second, r.run_start, r.run_stop,
                c.first, c.second, c.w_first, c.w_second, c.run_start, c.run_stop, self.corner,
                self.four, self.fused)

    def upsample(self, maps: np.ndarray) -> np.ndarray:
        r, c = self.rows, self.cols
        return _upsample(maps, r.first, r.second, r.w_first, r.w_second, c.first, c.second,
                         c.w_first, c.w_second, self.corner, self.four, self.fused)

    def unit_class_counts(self, acts: np.ndarray, t32: np.ndarray, bound: np.ndarray,
                          cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, class, pixels): how many pixels of each class every unit's masks over the
        images acts (B, K, h, w) cover, for the block-wide pixel classes ``cls`` (B, sh·sw)
        of :func:`class_signatures`; thresholds as in :meth:`tally`."""
        return _unit_class_counts(np.ascontiguousarray(acts, np.float32),
                                  t32.astype(np.float32), bound.astype(np.float32),
                                  np.ascontiguousarray(cls, np.int64), *self.axes())

    def tally(self, acts: np.ndarray, t32: np.ndarray, bound: np.ndarray,
              stored_pixel: np.ndarray, stored_image: np.ndarray, lut: np.ndarray,
              category: np.ndarray, multiset: bool, lite: bool, out: dict[str, np.ndarray]
              ) -> None:
        """Add the counts of images acts (B, K, h, w) float32 to ``out`` (int64 intersection
        (K, L+1), label_area (L+1,), area (B, K), lite_area (K, C+1); bool carries (B, C+1)).

        t32 (K,): the float32 thresholds of :func:`stages.tally.kernels.float32_below`; bound (K,):
        their :func:`stages.tally.kernels.skip_bound`.  stored_pixel (B, P, sh·sw) and stored_image
        (B, Q) hold stored label numbers, ``lut`` maps them to dense labels (0: not scored) and
        ``category`` dense labels to primary category + 1.
        """
        _tally(np.ascontiguousarray(acts, np.float32), t32.astype(np.float32),
               bound.astype(np.float32), np.ascontiguousarray(stored_pixel, np.int32),
               np.ascontiguousarray(stored_image, np.int32), lut.astype(np.int64),
               category.astype(np.int64), multiset, lite, *self.axes(), out["intersection"],
               out["label_area"], out["area"], out["carries"], out["lite_area"])


@lru_cache(maxsize=64)
def compiled_plan(h: int, w: int, sh: int, sw: int) -> Plan | None:
    """The variant of torch's CPU arithmetic that this build uses for (h, w) -> (sh, sw):
    the first whose values equal ``F.interpolate`` on every pixel of maps of mixed magnitude,
    sign and plateaus; None if none does."""
    gen = torch.Generator().manual_seed(12345)
    scale = torch.tensor([1e-30, 1e-3, 1, 1, 10, 1e3, 1e5, 1e30, -1, 1]).view(10, 1, 1)
    maps = torch.randn((10, h, w), generator=gen) * scale
    maps[3] = maps[3].round()
    maps[9] = maps[9].abs().round()
    full = F.interpolate(maps[:, None], size=(sh, sw), mode="bilinear", align_corners=False)
    full = full[:, 0].numpy()
    for fused_source in (True, False):
        rows, cols = torch_axis(h, sh, fused_source), torch_axis(w, sw, fused_source)
        for four in (False, True):
            for fused in (True, False):
                plan = Plan(rows, cols, four, fused)
                if np.array_equal(plan.upsample(maps.numpy()), full):
                    return plan
    return None
