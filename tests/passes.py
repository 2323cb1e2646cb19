"""Passes of one statistic, as the tests build them (the pipeline's stages assemble theirs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Pass
from stages.quantile import DEFAULT_CANDIDATE_BUDGET, threshold_pass
from stages.signatures.statistic import Signatures
from stages.tally.classes import pixel_classes
from stages.tally.counts import BlockCounts, block_counts
from stages.tally.labels import BlockLabels, LabelSpace
from stages.tally.statistic import Tally, TallyRule, mask_classes
from stages.thresholds.top_images import TopImagesStat


def exact_thresholds(blocks: LayerBlocks, q: float, scheduler: Any = None,
                     candidate_budget: int = DEFAULT_CANDIDATE_BUDGET) -> np.ndarray:
    """T_k = numpy.quantile(all values of unit k, 1 - q, method='linear'), exactly."""
    return threshold_pass(blocks, q, scheduler, candidate_budget)[0]


def tally_pass(blocks: LayerBlocks, concept_path: str, thresholds: np.ndarray,
               space: LabelSpace, rule: TallyRule | None = None,
               rows: np.ndarray | None = None) -> Pass:
    return Pass(ScoringBlocks(blocks, concept_path, rows), [Tally(thresholds, space, rule or TallyRule())])


def signature_pass(blocks: LayerBlocks, concept_path: str, thresholds: np.ndarray,
                   space: LabelSpace, rows: np.ndarray | None = None, kernel: str = "auto"
                   ) -> Pass:
    return Pass(ScoringBlocks(blocks, concept_path, rows), [Signatures(thresholds, space, kernel)])


def top_images_pass(blocks: LayerBlocks, top_n: int) -> Pass:
    return Pass(blocks, [TopImagesStat(top_n)])


def count_block(acts: torch.Tensor, thresholds: np.ndarray, labels: BlockLabels,
                lut: np.ndarray, label_category: np.ndarray, n_categories: int,
                seg_size: tuple[int, int], rule: TallyRule, kernel: str = "auto",
                pair_chunk: int = 1024) -> BlockCounts:
    """The §4 counts of one block of images for every unit and label (lut: stored number ->
    dense label; label_category: dense label -> primary category index, -1 for 0)."""
    classes = pixel_classes(labels, lut)
    found = mask_classes(acts, thresholds, classes, seg_size, kernel, pair_chunk)
    return block_counts(found, classes, acts.shape[1], label_category, n_categories,
                        rule.planes, rule.union)
