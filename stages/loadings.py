"""Per-concept principal axes of a layer (SEMANTICS.md §9): is a concept carried by one
unit or by a combination of units?

For each chosen concept, the layer's unit vectors at the feature-map cells where the concept
is (:func:`concept_cells`), standardised per unit by the layer's mean and standard deviation
over every cell of every image, and the principal axes of those vectors: the eigenvectors of
their second-moment matrix (what an SVD of the gathered standardised vectors gives).  One
read of every block gathers, exactly in float64, each concept's count, mean and scatter
(Chan et al.'s pairwise merge) and each unit's mean and scatter over all cells; the
standardised second moments follow at the end without forming any vector twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from stages.engine.blocks import Block, ScoringBlocks
from stages.engine.reduction import Partial, Pass, Statistic, reduce_blocks
from stages.tally.classes import pixel_classes
from stages.tally.labels import LabelSpace, block_labels
from stages.thresholds.kernels import unit_values


def cell_index(size: int, cells: int) -> np.ndarray:
    """(size,) the feature-map cell of each mask row (or column): floor(y · cells / size)."""
    return (np.arange(size) * cells) // size


def concept_cells(labels_present: np.ndarray, shape: tuple[int, int, int, int],
                  coverage: float) -> np.ndarray:
    """(B, C, h·w) bool: the feature-map cells where each concept is.  ``labels_present``
    (B, C, sh·sw) says which mask pixels carry the concept; mask pixel (y, x) lies in cell
    (floor(y·h/sh), floor(x·w/sw)), and the concept is at a cell when it carries at least
    ``coverage`` of the cell's pixels."""
    h, w, sh, sw = shape
    cell = (cell_index(sh, h)[:, None] * w + cell_index(sw, w)[None, :]).ravel()
    size = np.bincount(cell, minlength=h * w)
    b, c = labels_present.shape[:2]
    flat = labels_present.reshape(b * c, sh * sw)
    offsets = (np.arange(b * c) * (h * w))[:, None]
    covered = np.bincount((offsets + cell[None, :])[flat], minlength=b * c * h * w)
    return (covered.reshape(b, c, h * w) >= coverage * size[None, None, :]) & (size > 0)


def labels_present(block: Block, space: LabelSpace, dense: np.ndarray) -> np.ndarray:
    """(B, C, sh·sw) bool: whether each mask pixel carries each of the ``dense`` labels in a
    plane, or its image carries it as an image-level label (then every pixel does): read
    from the block's pixel classes, whose labels are exactly those (SEMANTICS.md §6)."""
    classes = pixel_classes(block_labels(block.labels, space), space.lut)
    carries = (classes.labels[:, :, None] == dense[None, None, :]).any(axis=1)  # (classes, C)
    return carries[classes.pixel_class].transpose(0, 2, 1)


@dataclass(frozen=True)
class ConceptScatter(Partial):
    count: np.ndarray  # (C,) int64 cells at each concept
    mean: np.ndarray  # (C, K) float64
    scatter: np.ndarray  # (C, K, K) float64 sum of (a - mean)(a - mean)^T
    cells: np.ndarray  # () int64 every cell of every image
    unit_mean: np.ndarray  # (K,) float64
    unit_scatter: np.ndarray  # (K,) float64 sum of (a - mean)^2


def _merge(n_a, mean_a, scatter_a, n_b, mean_b, scatter_b, outer):
    """Chan et al.'s pairwise merge of (count, mean, scatter), elementwise over the counts'
    axes (an empty side leaves the other exactly as it was)."""
    n_a, n_b = np.asarray(n_a), np.asarray(n_b)
    n = n_a + n_b
    safe = np.maximum(n, 1)
    delta = mean_b - mean_a
    weight = (n_a * n_b / safe).reshape(n.shape + (1,) * (scatter_a.ndim - n.ndim))
    return (n, mean_a + delta * (n_b / safe)[..., None],
            scatter_a + scatter_b + outer(delta) * weight)


@dataclass(frozen=True)
class ConceptMoments(Statistic):
    """The float64 moments of the unit vectors at each concept's cells and over all cells."""

    space: LabelSpace
    dense: np.ndarray  # (C,) the concepts' dense labels
    coverage: float
    partial_type = ConceptScatter

    def chunk(self, block: Block) -> ConceptScatter:
        b, k, h, w = block.acts.shape
        x = unit_values(block.acts).T.double().cpu().numpy()  # (B·h·w, K), image by image
        c = len(self.dense)
        if block.labels is None or b == 0:
            zero = np.zeros((c, k))
            return ConceptScatter(np.zeros(c, np.int64), zero, np.zeros((c, k, k)),
                                  np.array(0), np.zeros(k), np.zeros(k))
        cells = concept_cells(labels_present(block, self.space, self.dense),
                              (h, w, *block.seg_size), self.coverage)
        count, mean, scatter = np.zeros(c, np.int64), np.zeros((c, k)), np.zeros((c, k, k))
        for j in range(c):
            chosen = x[cells[:, j].reshape(-1)]
            if len(chosen):
                count[j], mean[j] = len(chosen), chosen.mean(axis=0)
                centred = chosen - mean[j]
                scatter[j] = centred.T @ centred
        unit_mean = x.mean(axis=0)
        return ConceptScatter(count, mean, scatter, np.array(len(x)), unit_mean,
                              ((x - unit_mean) ** 2).sum(axis=0))

    def combine(self, partials: Sequence[ConceptScatter]) -> ConceptScatter:
        acc = partials[0]
        for p in partials[1:]:
            count, mean, scatter = _merge(acc.count, acc.mean, acc.scatter, p.count, p.mean,
                                          p.scatter, lambda d: d[:, :, None] * d[:, None, :])
            cells, unit_mean, unit_scatter = _merge(acc.cells, acc.unit_mean, acc.unit_scatter,
                                                    p.cells, p.unit_mean, p.unit_scatter,
                                                    np.square)
            acc = ConceptScatter(count, mean, scatter, np.asarray(cells), unit_mean,
                                 unit_scatter)
        return acc


@dataclass(frozen=True)
class ConceptAxes:
    """Each concept's principal axes in the standardised unit space."""

    count: np.ndarray  # (C,) cells
    variance_ratio: np.ndarray  # (C, K) explained-variance ratio of each axis, descending
    axes: np.ndarray  # (C, K, K) axes[c, i] = the i-th axis (unit norm, largest |loading| > 0)

    @staticmethod
    def of(found: ConceptScatter) -> ConceptAxes:
        """Eigen-decompose, per concept, the standardised second moments
        D⁻¹ (scatter + n (m - μ)(m - μ)ᵀ) D⁻¹ with D = diag(unit std) over all cells."""
        std = np.sqrt(found.unit_scatter / max(int(found.cells), 1))
        scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
        shift = found.mean - found.unit_mean[None, :]
        second = found.scatter + found.count[:, None, None] * (
            shift[:, :, None] * shift[:, None, :])
        second = second * scale[None, :, None] * scale[None, None, :]
        values, vectors = np.linalg.eigh(second)
        values, vectors = values[:, ::-1].clip(min=0), vectors[:, :, ::-1].transpose(0, 2, 1)
        peak = np.take_along_axis(vectors, np.abs(vectors).argmax(axis=2)[:, :, None], 2)
        vectors = vectors * np.where(peak < 0, -1.0, 1.0)
        total = values.sum(axis=1, keepdims=True)
        ratio = np.divide(values, total, out=np.zeros_like(values), where=total > 0)
        return ConceptAxes(found.count, ratio, vectors)

    @cached_property
    def dominant_unit(self) -> np.ndarray:
        """(C,) the unit with the largest share of each concept's first axis."""
        return np.abs(self.axes[:, 0, :]).argmax(axis=1)

    @cached_property
    def dominance(self) -> np.ndarray:
        """(C,) that unit's share of the first axis: its squared loading (squares sum to 1)."""
        first = self.axes[:, 0, :]
        return np.take_along_axis(first ** 2, self.dominant_unit[:, None], 1)[:, 0]


def concept_axes(source: ScoringBlocks, space: LabelSpace, dense: np.ndarray, coverage: float,
                 scheduler=None, desc: str = "loadings", progress: bool = False,
                 checkpoint=None) -> ConceptAxes:
    """One read of every block: the principal axes of every chosen concept."""
    (found,) = reduce_blocks(Pass(source, [ConceptMoments(space, dense, coverage)]),
                             source.n_blocks(), scheduler, desc, progress, checkpoint=checkpoint)
    return ConceptAxes.of(found)


def loadings_frame(axes: ConceptAxes, space: LabelSpace, dense: np.ndarray, components: int,
                   keys: dict) -> pd.DataFrame:
    """Long rows: concept, component, its explained-variance ratio, unit and loading."""
    c, k = len(dense), axes.axes.shape[2]
    m = min(components, k)
    concept = np.repeat(np.arange(c), m * k)
    component = np.tile(np.repeat(np.arange(m), k), c)
    unit = np.tile(np.arange(k), c * m)
    return pd.DataFrame({
        **{key: [value] * (c * m * k) for key, value in keys.items()},
        "concept": np.array(space.names, dtype=object)[dense - 1][concept],
        "component": component,
        "explained_variance_ratio": axes.variance_ratio[concept, component],
        "unit": unit, "loading": axes.axes[:, :m, :].reshape(-1)})


def dominance_frame(axes: ConceptAxes, space: LabelSpace, dense: np.ndarray,
                    iou: np.ndarray, keys: dict) -> pd.DataFrame:
    """Per concept: its cells, the first axis's dominant unit and share, that unit's best
    label by IoU (``iou`` (K, L), ties to the lower label, as in ``units``) and its IoU with
    this concept."""
    names = np.array(space.names, dtype=object)
    unit = axes.dominant_unit
    best = np.argmax(iou, axis=1)[unit]
    return pd.DataFrame({
        **{key: [value] * len(dense) for key, value in keys.items()},
        "concept": names[dense - 1], "cells": axes.count,
        "first_axis_variance_ratio": axes.variance_ratio[:, 0],
        "dominant_unit": unit, "dominance": axes.dominance,
        "dominant_unit_best_concept": names[best],
        "dominant_unit_is_labelled": best == dense - 1,
        "dominant_unit_iou": iou[unit, dense - 1]})


def most_frequent(label_area: np.ndarray, top: int) -> np.ndarray:
    """(C,) the dense labels of the ``top`` largest label areas (ties to the lower label),
    ascending; labels with no pixel are never chosen."""
    order = np.lexsort((np.arange(len(label_area)), -label_area))
    chosen = [i for i in order[:top] if label_area[i] > 0]
    return np.sort(np.array(chosen, np.int64)) + 1
