"""The bootstrap over probe images (SEMANTICS.md §8): how much a unit's IoU, its being a
detector and a layer's (unique) detector counts depend on which images were probed.

Replicate r weights image x by w(r, x) ~ Poisson(1), drawn by a counter-based generator
(Philox keyed by the seed, counter = the image's row in the activation cache), so every
weight is a function of (seed, replicate, row) alone: the same seed gives the same intervals
for any blocking, worker count or cluster.  Thresholds stay those of the whole probe set;
what is resampled is the sum over images of the §4 counts.  The per-replicate search for a
unit's best label runs over its ``M`` best labels by the point IoU (its *candidates*), so
the replicates cost K × M counts each, not K × L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic, summed
from stages.tally.counts import replicate_counts
from stages.tally.labels import LabelSpace
from stages.tally.statistic import TallyRule, scored_block


def image_weights(rows: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """(len(rows), R) int64: each image's Poisson(1) weight in every replicate."""
    out = np.empty((len(rows), replicates), np.int64)
    for i, row in enumerate(np.asarray(rows, np.int64)):
        generator = np.random.Generator(np.random.Philox(key=seed, counter=[int(row), 0, 0, 0]))
        out[i] = generator.poisson(1.0, replicates)
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
    """The §4 counts of each unit's candidate labels under every replicate's weights."""

    thresholds: np.ndarray  # (K,) float64
    space: LabelSpace
    labels_of: np.ndarray  # (K, M) candidate dense labels
    replicates: int
    seed: int
    rule: TallyRule = TallyRule()
    kernel: str = "auto"
    partial_type = BootstrapCounts

    def chunk(self, block: Block) -> BootstrapCounts:
        k, (r, m) = block.acts.shape[1], (self.replicates, self.labels_of.shape[1])
        if block.labels is None:
            c = len(self.space.categories)
            return BootstrapCounts(np.zeros((r, k, m), np.int64), np.zeros((r, k, c), np.int64),
                                   np.zeros((r, self.space.n_labels + 1), np.int64))
        scored = scored_block(block, self.thresholds, self.space, self.kernel)
        found = replicate_counts(scored.masks, scored.classes, k, self.space.dense_category(),
                                 len(self.space.categories), self.rule.planes, self.rule.union,
                                 self.labels_of, image_weights(block.rows, r, self.seed))
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
