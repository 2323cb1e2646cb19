"""Pixel classes: the pixels of a block grouped by the labels they carry (SEMANTICS.md §3).

Every count of §4 and every signature of §6 is a sum over pixels of something that depends
only on the labels a pixel carries.  The pixels of an image that hold the same stored label
number in every plane form one *class*; a block has a few dozen classes per image where it
has thousands of pixels, so the labels are looked up, deduplicated (``set``) or counted
(``multiset``) once per class instead of once per pixel.  Mask producers then count each
unit's mask pixels per class (:mod:`stages.tally.masks`, :mod:`stages.tally.compiled`), and
:mod:`stages.tally.counts` and :mod:`stages.signatures.statistic` read those counts out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from stages.tally.labels import BlockLabels


class PixelClasses(NamedTuple):
    """A block's pixel classes, numbered across the block (the classes of image b come
    before those of image b + 1)."""

    pixel_class: np.ndarray  # (B, S) int64 class of every pixel
    first: np.ndarray  # (B + 1,) int64 first class of each image; first[B] = classes
    size: np.ndarray  # (C,) int64 pixels in each class
    labels: np.ndarray  # (C, W) int64 each class's distinct dense labels, ascending, zeros first
    occurrences: np.ndarray  # (C, W) int64 planes + image-level entries carrying each label

    @property
    def n_classes(self) -> int:
        return len(self.size)

    def image(self) -> np.ndarray:
        """(C,) the image of every class."""
        return np.repeat(np.arange(len(self.first) - 1), np.diff(self.first))


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
def _dense(lut, number):
    """lut[number], refusing a number outside it (compiled code does not check bounds; the
    concept store admits only label.csv's numbers, so this means a damaged store)."""
    if number < 0 or number >= lut.shape[0]:
        raise IndexError("a stored label number is outside the concept store's label list")
    return lut[number]


@njit(nogil=True, cache=True)
def _classes(pixel, image, lut):
    n_images, n_planes, n_pixels = pixel.shape
    width = max(n_planes + image.shape[1], 1)
    size = 1
    while size < 2 * n_pixels:  # the open-addressing table, at most half full
        size *= 2
    slots = np.empty(size, np.int64)
    cls = np.empty((n_images, n_pixels), np.int64)
    rep = np.empty((n_images, n_pixels), np.int64)
    first = np.zeros(n_images + 1, np.int64)
    for b in range(n_images):
        first[b + 1] = first[b] + _pixel_classes(pixel[b], cls[b], rep[b], slots)
    n_classes = first[n_images]
    sizes = np.zeros(n_classes, np.int64)
    labels = np.zeros((n_classes, width), np.int64)
    occurrences = np.zeros((n_classes, width), np.int64)
    found = np.empty(width, np.int64)
    for b in range(n_images):
        for s in range(n_pixels):
            sizes[first[b] + cls[b, s]] += 1
        for c in range(first[b + 1] - first[b]):
            n = 0  # every label entry of the class: its planes', then the image-level ones
            for j in range(n_planes + image.shape[1]):
                number = pixel[b, j, rep[b, c]] if j < n_planes else image[b, j - n_planes]
                label = _dense(lut, number)
                if label > 0:
                    found[n] = label
                    n += 1
            entries = np.sort(found[:n])
            row = first[b] + c
            at = width
            for i in range(n - 1, -1, -1):  # distinct labels right-aligned, with counts
                if at < width and labels[row, at] == entries[i]:
                    occurrences[row, at] += 1
                else:
                    at -= 1
                    labels[row, at] = entries[i]
                    occurrences[row, at] = 1
        cls[b] += first[b]
    return cls, first, sizes, labels, occurrences


def pixel_classes(labels: BlockLabels, lut: np.ndarray) -> PixelClasses:
    """The pixel classes of a block's labels; ``lut`` maps stored label numbers to dense
    labels (0: not scored, left out of every class's labels)."""
    return PixelClasses(*_classes(np.ascontiguousarray(labels.pixel, np.int32),
                                  np.ascontiguousarray(labels.image, np.int32),
                                  np.ascontiguousarray(lut, np.int64)))
