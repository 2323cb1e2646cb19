"""Discrimination of a layer (SEMANTICS.md §10): a linear classifier on each image's
spatially pooled activations, cross-validated, as the paper sets interpretability against.

One read of every block pools each unit's map per image (mean or max) and takes the image's
target class from the concept store (its one image-level label of a category) or from a
table mapping images to classes; scikit-learn's ``LinearSVC`` then runs on stratified,
seeded folds.  Mean pooling commutes with a linear basis change and an L2-regularised linear
SVM on unstandardised features is rotation-invariant, so a rotated basis must classify as
well as the units do: the paper's "identical discriminative power", on the user's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic

NO_CLASS = -1


@dataclass(frozen=True)
class PooledRows(Partial):
    rows: np.ndarray  # (n,) int64 cache rows, ascending
    features: np.ndarray  # (n, K) float64 pooled activations
    targets: np.ndarray  # (n,) int64 class (a label number), NO_CLASS: none or several


def image_classes(image_labels: np.ndarray, image_category: np.ndarray, category: int
                  ) -> np.ndarray:
    """(B,) each image's one image-level label of ``category``, NO_CLASS where it has none
    or several distinct ones."""
    mine = np.where(image_category == category, image_labels, 0)
    top, low = mine.max(axis=1, initial=0), np.where(mine > 0, mine, np.iinfo(mine.dtype).max)
    low = low.min(axis=1, initial=np.iinfo(mine.dtype).max)
    return np.where((top > 0) & (top == low), top, NO_CLASS).astype(np.int64)


@dataclass(frozen=True)
class PooledFeatures(Statistic):
    """Per image its pooled unit activations and its class: from the image-level labels of
    category index ``category`` (a block with labels), or from ``classes`` by cache row."""

    pool: str  # mean | max
    category: int = -1
    classes: np.ndarray | None = None  # (n_images,) class by cache row, NO_CLASS: left out
    partial_type = PooledRows

    def chunk(self, block: Block) -> PooledRows:
        acts = block.acts.double()
        pooled = acts.mean(dim=(2, 3)) if self.pool == "mean" else acts.amax(dim=(2, 3))
        rows = np.asarray(block.rows, np.int64)
        if self.classes is not None:
            targets = self.classes[rows]
        elif block.labels is None:
            targets = np.full(len(rows), NO_CLASS, np.int64)
        else:
            targets = image_classes(block.labels.image_labels,
                                    block.labels.image_label_category, self.category)
        return PooledRows(rows, pooled.cpu().numpy(), targets)

    def combine(self, partials: Sequence[PooledRows]) -> PooledRows:
        rows = np.concatenate([p.rows for p in partials])
        order = np.argsort(rows, kind="stable")
        return PooledRows(rows[order], np.concatenate([p.features for p in partials])[order],
                          np.concatenate([p.targets for p in partials])[order])


@dataclass(frozen=True)
class ProbeResult:
    fold_accuracy: np.ndarray  # (folds,)
    n_images: int
    n_classes: int
    chance: float  # the largest class's share: a constant guess's accuracy


def probe_images(found: PooledRows, folds: int) -> np.ndarray:
    """Indices of the images scored: those with a class held by at least ``folds`` images
    (every fold must be able to hold each class)."""
    has = found.targets != NO_CLASS
    classes, counts = np.unique(found.targets[has], return_counts=True)
    kept = classes[counts >= folds]
    return np.flatnonzero(np.isin(found.targets, kept))


def cross_validated(found: PooledRows, c: float, folds: int, seed: int, max_iter: int
                    ) -> ProbeResult:
    """Accuracy of ``LinearSVC(C=c)`` on each of ``folds`` stratified folds, shuffled by
    ``seed``."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    chosen = probe_images(found, folds)
    x, y = found.features[chosen], found.targets[chosen]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"{len(classes)} class(es) with at least {folds} images")
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accuracy = []
    for train, test in split.split(x, y):
        model = LinearSVC(C=c, max_iter=max_iter, random_state=seed).fit(x[train], y[train])
        accuracy.append(float((model.predict(x[test]) == y[test]).mean()))
    return ProbeResult(np.array(accuracy), len(y), len(classes), float(counts.max() / len(y)))


def probe_frame(result: ProbeResult, keys: dict) -> pd.DataFrame:
    """One row: the folds' accuracies, their mean and spread, and what they compare to."""
    return pd.DataFrame([{**keys, "images": result.n_images, "classes": result.n_classes,
                          "chance": result.chance,
                          "accuracy": float(result.fold_accuracy.mean()),
                          "accuracy_std": float(result.fold_accuracy.std(ddof=1)) if len(
                              result.fold_accuracy) > 1 else 0.0,
                          "fold_accuracy": result.fold_accuracy.tolist()}])
