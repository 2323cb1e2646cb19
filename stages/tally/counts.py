"""The counts of SEMANTICS.md §4 from mask pixels per pixel class: the one place the
``planes`` (set, multiset) and ``union`` (restricted, global, lite) rules are written.

A class's pixels all carry the same labels (:mod:`stages.tally.classes`), so for every unit
k, label l and category c of a block:

- label_area[l] = Σ_classes size · w(class, l);
- intersection[k, l] = Σ_(k, class) mask pixels · w(class, l);
- area[image, k] = Σ_(k, class of the image) mask pixels, the |M_k(x)| of §4;

with w = 1 where the class carries l (``set``) or the number of its planes and image-level
entries that do (``multiset``).  The unit area of each union mode then sums |M_k(x)| over the
images it names: all of them (``global``), those carrying a label of category c
(``restricted``), or those where the mask meets a class with a label of category c
(``lite``; image-level labels are in every class of their image, so any mask meets them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from stages.tally.classes import PixelClasses
from stages.tally.masks import MaskClasses

UNIONS = ("restricted", "global", "lite")


class BlockCounts(NamedTuple):
    """The int64 counts of one block (dense labels 1..L; column and entry 0 stay 0)."""

    intersection: np.ndarray  # (K, L + 1)
    unit_area: np.ndarray  # (K, C)
    label_area: np.ndarray  # (L + 1,)


class Replicates(NamedTuple):
    """The counts of a block under R weightings of its images (the bootstrap of
    :mod:`stages.evidence.bootstrap`): each image counts ``weights[image, r]`` times in
    replicate r, and only the (unit, label) pairs ``columns`` names are kept."""

    intersection: np.ndarray  # (R, K, M): column m of unit k is label labels_of[k, m]
    unit_area: np.ndarray  # (R, K, C)
    label_area: np.ndarray  # (R, L + 1)


@njit(nogil=True, cache=True)
def _counts(found, classes, category, n_units, n_labels, n_categories, multiset, union,
            columns, n_columns, weights, need, n_bands):
    """The counts of §4, each image weighted by ``weights`` (images, R) per replicate, a mask
    entry counted in replicate r iff its band >= ``need[r, unit]`` (:class:`MaskClasses`,
    bands < ``n_bands``); ``columns`` (K, L + 1) gives each (unit, label) its output column
    (-1: not kept), or is empty for every label in its own column.

    Banded entries are summed per (column, band) over one (image, unit), then summed from
    the top band down, so replicate r reads its count at band need[r, unit]: the cost is
    per entry plus per touched column and replicate, not per entry and replicate."""
    unit, klass, pixels, band = found.unit, found.klass, found.pixels, found.band
    first, size, labels = classes.first, classes.size, classes.labels
    occurrences = classes.occurrences
    n_images = first.shape[0] - 1
    n_classes, width = labels.shape
    n_rep = weights.shape[1]
    every = columns.shape[0] == 0
    image = np.empty(n_classes, np.int64)
    for b in range(n_images):
        image[first[b] : first[b + 1]] = b
    intersection = np.zeros((n_rep, n_units, n_columns), np.int64)
    label_area = np.zeros((n_rep, n_labels + 1), np.int64)
    carries = np.zeros((n_images, n_categories + 1), np.bool_)  # column 0: no label
    for c in range(n_classes):
        for j in range(width):
            label = labels[c, j]
            area = size[c] * (occurrences[c, j] if multiset else 1)
            for r in range(n_rep):
                label_area[r, label] += weights[image[c], r] * area
            carries[image[c], category[label]] = True
    lite = union == 2
    banded = n_bands > 1
    unit_area = np.zeros((n_rep, n_units, n_categories), np.int64)
    area = np.zeros(n_bands, np.int64)  # |M_k(x)| of the (image, unit) being read, per band
    meets = np.zeros((n_categories + 1, n_bands), np.bool_)
    acc = np.zeros((n_columns if banded else 0, n_bands), np.int64)
    used = np.zeros(n_columns if banded else 0, np.bool_)
    touched = np.empty(n_columns if banded else 0, np.int64)
    seen = np.zeros((n_images, n_units), np.bool_)
    m = 0
    while m < unit.shape[0]:  # one (image, unit) at a time: its entries are contiguous
        k, b = unit[m], image[klass[m]]
        if seen[b, k]:
            raise ValueError("mask entries of one (image, unit) are not contiguous")
        seen[b, k] = True
        area[:] = 0
        meets[:] = False
        n_touched = 0
        while m < unit.shape[0] and unit[m] == k and image[klass[m]] == b:
            c, n, e = klass[m], pixels[m], band[m]
            area[e] += n
            for j in range(width):
                label = labels[c, j]
                if lite:
                    meets[category[label], e] = True
                column = label if every else columns[k, label]
                if column < 0:
                    continue
                count = n * (occurrences[c, j] if multiset else 1)
                if not banded:
                    for r in range(n_rep):
                        intersection[r, k, column] += weights[b, r] * count
                    continue
                if not used[column]:
                    used[column] = True
                    touched[n_touched] = column
                    n_touched += 1
                acc[column, e] += count
            m += 1
        for e in range(n_bands - 2, -1, -1):  # from the top band down: at or above band e
            area[e] += area[e + 1]
            for cat in range(n_categories + 1):
                meets[cat, e] = meets[cat, e] or meets[cat, e + 1]
        for t in range(n_touched):
            column = touched[t]
            for e in range(n_bands - 2, -1, -1):
                acc[column, e] += acc[column, e + 1]
            for r in range(n_rep):
                intersection[r, k, column] += weights[b, r] * acc[column, need[r, k]]
            acc[column, :] = 0
            used[column] = False
        for r in range(n_rep):
            e = need[r, k]
            if area[e] == 0:
                continue
            for cat in range(n_categories):
                if union == 0:
                    counted = carries[b, cat + 1]
                elif union == 1:
                    counted = True
                else:
                    counted = meets[cat + 1, e]
                if counted:
                    unit_area[r, k, cat] += weights[b, r] * area[e]
    if every:
        intersection[:, :, 0] = 0
    label_area[:, 0] = 0
    return intersection, unit_area, label_area


def _check_rules(planes: str, union: str) -> None:
    if union not in UNIONS:
        raise ValueError(f"unknown union mode {union!r}")
    if planes not in ("set", "multiset"):
        raise ValueError(f"unknown planes mode {planes!r}")


def block_counts(found: MaskClasses, classes: PixelClasses, n_units: int,
                 label_category: np.ndarray, n_categories: int, planes: str, union: str
                 ) -> BlockCounts:
    """The counts of one block: ``found`` the units' mask pixels per class of ``classes``,
    ``label_category`` (L + 1,) the primary category index of each dense label (-1 for 0)."""
    _check_rules(planes, union)
    n_labels = len(label_category) - 1
    once = np.ones((len(classes.first) - 1, 1), np.int64)
    inter, unit_area, label_area = _counts(
        found, classes, np.asarray(label_category, np.int64) + 1, n_units, n_labels,
        n_categories, planes == "multiset", UNIONS.index(union), np.zeros((0, 0), np.int64),
        n_labels + 1, once, np.zeros((1, n_units), np.int64), 1)
    return BlockCounts(inter[0], unit_area[0], label_area[0])


def replicate_counts(found: MaskClasses, classes: PixelClasses, n_units: int,
                     label_category: np.ndarray, n_categories: int, planes: str, union: str,
                     labels_of: np.ndarray, weights: np.ndarray, need: np.ndarray | None = None
                     ) -> Replicates:
    """The counts of one block under each weighting of its images (``weights`` (images, R)
    int64), for each unit's labels ``labels_of`` (K, M) only; with banded ``found``, replicate
    r's masks are the entries whose band is >= ``need[r, unit]`` (R, K)."""
    _check_rules(planes, union)
    n_labels = len(label_category) - 1
    columns = np.full((n_units, n_labels + 1), -1, np.int64)
    columns[np.arange(n_units)[:, None], labels_of] = np.arange(labels_of.shape[1])[None, :]
    need = np.zeros((weights.shape[1], n_units), np.int64) if need is None else need
    n_bands = 1 + max(int(found.band.max(initial=0)), int(need.max(initial=0)))
    return Replicates(*_counts(
        found, classes, np.asarray(label_category, np.int64) + 1, n_units, n_labels,
        n_categories, planes == "multiset", UNIONS.index(union), columns, labels_of.shape[1],
        np.ascontiguousarray(weights, np.int64), np.ascontiguousarray(need, np.int64),
        n_bands))
