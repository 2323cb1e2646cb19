"""Passes of one statistic, as the tests build them (the pipeline's stages assemble theirs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Pass
from stages.quantile import DEFAULT_CANDIDATE_BUDGET, threshold_pass
from stages.signatures.statistic import Signatures
from stages.tally.labels import LabelSpace
from stages.tally.statistic import Tally, TallyRule
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
