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
            columns, n_columns, weights, need):
    """The counts of §4, each image weighted by ``weights`` (images, R) per replicate, a mask
    entry counted in replicate r iff its band >= ``need[r, unit]`` (:class:`MaskClasses`);
    ``columns`` (K, L + 1) gives each (unit, label) its output column (-1: not kept), or is
    empty for every label in its own column."""
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
    unit_area = np.zeros((n_rep, n_units, n_categories), np.int64)
    area = np.zeros(n_rep, np.int64)  # |M_k(x)| of the (image, unit) being read
    meets = np.zeros((n_rep, n_categories + 1), np.bool_)
    seen = np.zeros((n_images, n_units), np.bool_)
    m = 0
    while m < unit.shape[0]:  # one (image, unit) at a time: its entries are contiguous
        k, b = unit[m], image[klass[m]]
        if seen[b, k]:
            raise ValueError("mask entries of one (image, unit) are not contiguous")
        seen[b, k] = True
        area[:] = 0
        meets[:] = False
        while m < unit.shape[0] and unit[m] == k and image[klass[m]] == b:
            c, n = klass[m], pixels[m]
            for r in range(n_rep):
                if band[m] >= need[r, k]:
                    area[r] += n
            for j in range(width):
                label = labels[c, j]
                if lite:
                    for r in range(n_rep):
                        if band[m] >= need[r, k]:
                            meets[r, category[label]] = True
                column = label if every else columns[k, label]
                if column < 0:
                    continue
                count = n * (occurrences[c, j] if multiset else 1)
                for r in range(n_rep):
                    if band[m] >= need[r, k]:
                        intersection[r, k, column] += weights[b, r] * count
            m += 1
        for r in range(n_rep):
            if area[r] == 0:
                continue
            for cat in range(n_categories):
                if union == 0:
                    counted = carries[b, cat + 1]
                elif union == 1:
                    counted = True
                else:
                    counted = meets[r, cat + 1]
                if counted:
                    unit_area[r, k, cat] += weights[b, r] * area[r]
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
        n_labels + 1, once, np.zeros((1, n_units), np.int64))
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
    return Replicates(*_counts(
        found, classes, np.asarray(label_category, np.int64) + 1, n_units, n_labels,
        n_categories, planes == "multiset", UNIONS.index(union), columns, labels_of.shape[1],
        np.ascontiguousarray(weights, np.int64), np.ascontiguousarray(need, np.int64)))
