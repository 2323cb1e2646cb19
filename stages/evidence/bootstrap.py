"""The bootstrap over probe images (SEMANTICS.md §8): how much a unit's IoU, its being a
detector and a layer's (unique) detector counts depend on which images were probed.

Replicate r weights image x by w(r, x) ~ Poisson(1), drawn by a counter-based generator
(Philox keyed by the seed, counter = the image's row in the activation cache), so every
weight is a function of (seed, replicate, row) alone: the same seed gives the same intervals
for any blocking, worker count or cluster.  A replicate is the dissection of the resampled
probe set, image x taken w(r, x) times: its thresholds are the §1 quantiles of that multiset
(:func:`replicate_thresholds`, from each unit's largest values with their image rows,
:class:`TopEntries`, gathered in the tally's pass), its counts the §4 sums of each image's
counts at those thresholds times w(r, x) (:class:`Bootstrap`, one more pass).  The
per-replicate search for a unit's best label runs over its ``M`` best labels by the point
IoU (its *candidates*), so the replicates cost K × M counts each, not K × L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from numba import njit

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic, summed
from stages.tally.counts import replicate_counts
from stages.tally.labels import LabelSpace
from stages.tally.statistic import TallyRule, band_needed, scored_block
from stages.thresholds.kernels import (
    float_keys,
    keys_to_floats,
    lerp,
    quantile_position,
    unit_values,
)
from stages.thresholds.statistics import TopList, TopValues

ROW_BITS = 31  # an entry key: the value's order-preserving key above the image row's bits


def image_weights(rows: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """(len(rows), R) int64: each image's Poisson(1) weight in every replicate."""
    out = np.empty((len(rows), replicates), np.int64)
    for i, row in enumerate(np.asarray(rows, np.int64)):
        generator = np.random.Generator(np.random.Philox(key=seed, counter=[int(row), 0, 0, 0]))
        out[i] = generator.poisson(1.0, replicates)
    return out


def entries_needed(n_images: int, positions: int, q: float) -> int:
    """How many of a unit's largest values a replicate threshold may need: twice the
    quantile's rank from the top, plus eight standard deviations of a replicate's weight on
    them were they all from whole images (the rank a replicate reaches is checked)."""
    rank = q * n_images * positions
    return min(n_images * positions,
               math.ceil(2 * rank + 8 * math.sqrt(2 * rank * positions) + positions))


@dataclass(frozen=True)
class TopEntryList(TopList):
    """``values`` are entry keys: (K, m) int64 float_keys(value) << ROW_BITS | (2^31 - 1 -
    row), unordered."""

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, m) float64 values from the largest, and the image row of each (ties: lower
        row first)."""
        keys = -np.sort(-self.values, axis=1)
        row_mask = (1 << ROW_BITS) - 1
        return (keys_to_floats(keys >> ROW_BITS).astype(np.float64),
                row_mask - (keys & row_mask))


@dataclass(frozen=True)
class TopEntries(TopValues):
    """Per unit, its ``need`` largest values with their image rows: one key per (value,
    row), so the merge keeps the same entries however the blocks are split."""

    partial_type = TopEntryList

    def ranked(self, block: Block) -> torch.Tensor:
        values = unit_values(block.acts)  # (K, B·h·w), image by image
        rows = torch.from_numpy(np.asarray(block.rows, np.int64)).to(values.device)
        rows = rows.repeat_interleave(values.shape[1] // max(len(block.rows), 1))
        return (float_keys(values) << ROW_BITS) | (((1 << ROW_BITS) - 1) - rows)[None, :]


@njit(nogil=True, cache=True)
def _weighted_ranks(rows, weights, below):
    """For each unit and replicate, the first entry (of ``rows``, from the largest value)
    where the replicate's running weight exceeds each rank in ``below`` (R, 2); -1 where the
    entries run out first."""
    n_units, n_entries = rows.shape
    n_rep = weights.shape[1]
    found = np.full((n_units, n_rep, 2), -1, np.int64)
    for k in range(n_units):
        for r in range(n_rep):
            total, side = 0, 0
            for e in range(n_entries):
                total += weights[rows[k, e], r]
                while side < 2 and total > below[r, side]:
                    found[k, r, side] = e
                    side += 1
                if side == 2:
                    break
    return found


def replicate_thresholds(top: TopEntryList, n_images: int, positions: int, q: float,
                         replicates: int, seed: int) -> np.ndarray:
    """(K, R) float64: each unit's §1 threshold in every replicate — numpy's 'linear'
    quantile 1 - q of the multiset where image x's ``positions`` values appear w(r, x) times,
    read from the unit's largest entries."""
    values, rows = top.entries()
    weights = image_weights(np.arange(n_images), replicates, seed)
    size = positions * weights.sum(axis=0)
    ranks = [quantile_position(int(n), q) for n in size]  # ascending (lo, hi, gamma)
    below = np.array([[n - 1 - hi, n - 1 - lo] for n, (lo, hi, _) in zip(size, ranks,
                                                                         strict=True)])
    found = _weighted_ranks(rows, weights, below)
    if (found < 0).any():
        raise RuntimeError("bootstrap: a replicate's threshold lies below the largest values "
                           "kept; raise stages.evidence.bootstrap.entries_needed")
    out = np.empty((len(values), replicates))
    for r, (_, _, gamma) in enumerate(ranks):
        hi = np.take_along_axis(values, found[:, r, :1], axis=1)[:, 0]
        lo = np.take_along_axis(values, found[:, r, 1:], axis=1)[:, 0]
        out[:, r] = lerp(lo, hi, gamma)
    return out


def candidate_labels(iou: np.ndarray, m: int) -> np.ndarray:
    """(K, M) dense labels: each unit's ``m`` best labels by IoU (ties to the lower label),
    in ascending label order, so that a maximum found first is the lowest label's."""
    m = min(m, iou.shape[1])
    order = np.lexsort((np.arange(iou.shape[1])[None, :].repeat(len(iou), 0), -iou), axis=1)
    return np.sort(order[:, :m], axis=1) + 1


@dataclass(frozen=True)
class BootstrapCounts(Partial):
    intersection: np.ndarray  # (R, K, M) int64, column m = the unit's m-th candidate
    unit_area: np.ndarray  # (R, K, C) int64
    label_area: np.ndarray  # (R, L + 1) int64

    def iou(self, space: LabelSpace, labels_of: np.ndarray) -> np.ndarray:
        """(R, K, M) IoU of every unit with each of its candidates, in every replicate."""
        area = np.take_along_axis(self.unit_area, space.primary[labels_of - 1][None], axis=2)
        union = area + self.label_area[:, labels_of] - self.intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.intersection / np.maximum(union, 1), 0.0)


@dataclass(frozen=True)
class Bootstrap(Statistic):
    """The §4 counts of each unit's candidate labels under every replicate: image x weighted
    w(r, x), masks at the replicate's thresholds."""

    thresholds: np.ndarray  # (K, R) float64 each unit's threshold in every replicate
    space: LabelSpace
    labels_of: np.ndarray  # (K, M) candidate dense labels
    seed: int
    rule: TallyRule = TallyRule()
    kernel: str = "auto"
    partial_type = BootstrapCounts

    @property
    def replicates(self) -> int:
        return self.thresholds.shape[1]

    @cached_property
    def need(self) -> np.ndarray:
        return band_needed(self.thresholds)

    def chunk(self, block: Block) -> BootstrapCounts:
        k, (r, m) = block.acts.shape[1], (self.replicates, self.labels_of.shape[1])
        if block.labels is None:
            c = len(self.space.categories)
            return BootstrapCounts(np.zeros((r, k, m), np.int64), np.zeros((r, k, c), np.int64),
                                   np.zeros((r, self.space.n_labels + 1), np.int64))
        scored = scored_block(block, self.thresholds, self.space, self.kernel)
        found = replicate_counts(scored.masks, scored.classes, k, self.space.dense_category(),
                                 len(self.space.categories), self.rule.planes, self.rule.union,
                                 self.labels_of, image_weights(block.rows, r, self.seed),
                                 self.need)
        return BootstrapCounts(*found)

    def combine(self, partials: Sequence[BootstrapCounts]) -> BootstrapCounts:
        return BootstrapCounts(*(summed([getattr(p, f) for p in partials])
                                 for f in ("intersection", "unit_area", "label_area")))


def interval(values: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of ``level`` over replicates (numpy's 'linear' quantiles)."""
    tail = (1.0 - level) / 2
    return (np.quantile(values, tail, axis=axis, method="linear"),
            np.quantile(values, 1.0 - tail, axis=axis, method="linear"))


@dataclass(frozen=True)
class BootstrapSummary:
    """What the replicates say about every unit (its point best label given) and layer."""

    iou: np.ndarray  # (R, K) IoU of the unit's point best label in each replicate
    best_iou: np.ndarray  # (R, K) the unit's best IoU over its candidates
    best_label: np.ndarray  # (R, K) dense label of that best
    point_label: np.ndarray  # (K,) dense best label of the whole probe set
    category: np.ndarray  # (R, K) category index of the replicate's best label

    @staticmethod
    def of(counts: BootstrapCounts, space: LabelSpace, labels_of: np.ndarray,
           point_label: np.ndarray) -> BootstrapSummary:
        iou = counts.iou(space, labels_of)
        at = np.argmax(iou, axis=2)  # the first maximum: candidates ascend by label
        best_label = labels_of[np.arange(labels_of.shape[0])[None, :], at]
        point_column = np.argmax(labels_of == point_label[:, None], axis=1)
        return BootstrapSummary(iou[:, np.arange(len(point_label)), point_column],
                                np.take_along_axis(iou, at[:, :, None], 2)[:, :, 0], best_label,
                                point_label, space.primary[best_label - 1])

    def units(self, threshold: float, level: float) -> pd.DataFrame:
        """Per unit: iou_lo, iou_hi, p_detector and label_stability."""
        lo, hi = interval(self.iou, level)
        return pd.DataFrame({"iou_lo": lo, "iou_hi": hi,
                             "p_detector": (self.best_iou > threshold).mean(axis=0),
                             "label_stability": (self.best_label == self.point_label).mean(axis=0)})

    def layer(self, threshold: float, level: float, categories: Sequence[str]) -> pd.DataFrame:
        """Per category ('all' first): intervals of detectors and unique detected concepts."""
        detector = self.best_iou > threshold
        rows = []
        for c, name in [(-1, "all"), *enumerate(categories)]:
            chosen = detector if c < 0 else detector & (self.category == c)
            unique = [len(set(self.best_label[r, chosen[r]])) for r in range(len(chosen))]
            (d_lo, d_hi), (u_lo, u_hi) = (interval(chosen.sum(axis=1), level),
                                          interval(np.array(unique), level))
            rows.append({"category": name, "detectors_lo": float(d_lo),
                         "detectors_hi": float(d_hi), "unique_concepts_lo": float(u_lo),
                         "unique_concepts_hi": float(u_hi)})
        return pd.DataFrame(rows)
