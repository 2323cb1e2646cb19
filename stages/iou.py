"""Stage ``iou``: exact intersection/union tallies (SEMANTICS.md §2–5) and result tables.

The tally is a statistic (:class:`Tally`, a pure reduction): per block of images, the active
(image, unit) pairs are upsampled and thresholded on the block's device, labels counted into
int64 partials, and partials summed in a Dask tree.  The finish step turns the counts into
the ``iou``, ``units`` and ``layers`` tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from stages.engine.blocks import Block, LayerBlocks, ScoringBlocks
from stages.engine.reduction import Arrays, Pass, summed
from stages.tally.kernels import tally_block
from stages.tally.labels import (  # noqa: F401 - label_space re-exported
    LabelSpace,
    label_space,
    tally_inputs,
)
from storage.errors import UserError

UNION_MODES = ("restricted", "global", "lite")
PLANE_MODES = ("set", "multiset")


@dataclass(frozen=True)
class ScoringConfig:
    quantile: float = 0.005
    union: str = "restricted"
    planes: str = "set"
    categories: tuple[str, ...] | None = None
    iou_threshold: float = 0.04

    def validate(self) -> None:
        if self.union not in UNION_MODES:
            raise UserError(f"scoring.union={self.union!r}: choose one of {', '.join(UNION_MODES)}")
        if self.planes not in PLANE_MODES:
            raise UserError(f"scoring.planes={self.planes!r}: choose one of {', '.join(PLANE_MODES)}")
        if not 0.0 < self.quantile < 1.0:
            raise UserError(f"scoring.quantile={self.quantile}: must lie in (0, 1)")


@dataclass(frozen=True)
class TallyCounts(Arrays):
    intersection: np.ndarray  # (K, L + 1) int64
    unit_area: np.ndarray  # (K, C) int64
    label_area: np.ndarray  # (L + 1,) int64
    images: np.ndarray  # () int64 images counted


@dataclass(frozen=True)
class Tally:
    """The exact int64 counts of SEMANTICS.md §4 over the blocks it sees (labels required)."""

    thresholds: np.ndarray  # (K,) float
    space: LabelSpace
    scoring: ScoringConfig
    partial_type = TallyCounts

    def _zero(self, k: int) -> TallyCounts:
        width = self.space.n_labels + 1
        c = len(self.space.categories)
        return TallyCounts(np.zeros((k, width), np.int64), np.zeros((k, c), np.int64),
                           np.zeros(width, np.int64), np.zeros((), np.int64))

    def chunk(self, block: Block) -> TallyCounts:
        if block.labels is None:
            return self._zero(block.acts.shape[1])
        inputs = tally_inputs(block.labels, self.space, self.scoring.planes, str(block.acts.device))
        counts = tally_block(
            block.acts,
            torch.from_numpy(np.asarray(self.thresholds, dtype=np.float64)),
            inputs,
            self.space.n_labels,
            block.seg_size,
            self.scoring.union,
        )
        return TallyCounts(counts["intersection"].cpu().numpy(), counts["unit_area"].cpu().numpy(),
                           counts["label_area"].cpu().numpy(),
                           np.array(block.acts.shape[0], dtype=np.int64))

    def combine(self, partials) -> TallyCounts:
        return TallyCounts(*(summed([getattr(p, f) for p in partials])
                             for f in ("intersection", "unit_area", "label_area", "images")))

    def finish(self, partial: TallyCounts) -> dict[str, np.ndarray]:
        return partial.state_dict()


class TallyReduction(Pass):
    """The tally of one layer against one concept store, as a pass of its own."""

    def __init__(self, blocks: LayerBlocks, concept_path: str, thresholds: np.ndarray,
                 space: LabelSpace, scoring: ScoringConfig, rows: np.ndarray | None = None):
        super().__init__(ScoringBlocks(blocks, concept_path, rows),
                         (Tally(thresholds, space, scoring),), single=True)


def iou_frame(counts: dict[str, np.ndarray], space: LabelSpace, meta: dict) -> pd.DataFrame:
    """Every (unit, label) pair with its counts and IoU (SEMANTICS.md §4)."""
    inter = counts["intersection"][:, 1:]
    k, n_labels = inter.shape
    label_area = np.broadcast_to(counts["label_area"][1:], (k, n_labels))
    unit_area = counts["unit_area"][:, space.primary]
    union_area = unit_area + label_area - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union_area > 0, inter / np.maximum(union_area, 1), 0.0)
    frame = pd.DataFrame(
        {
            "unit": np.repeat(np.arange(k), n_labels),
            "label": np.tile(space.numbers, k),
            "concept": np.tile(np.array(space.names, dtype=object), k),
            "category": np.tile(np.array(space.categories, dtype=object)[space.primary], k),
            "intersection": inter.reshape(-1),
            "label_area": label_area.reshape(-1),
            "unit_area": unit_area.reshape(-1),
            "union_area": union_area.reshape(-1),
            "iou": iou.reshape(-1),
        }
    )
    for key, value in meta.items():
        frame.insert(0, key, value)
    return frame


def units_frame(iou: pd.DataFrame, thresholds: np.ndarray, iou_threshold: float) -> pd.DataFrame:
    """Best concept per unit (highest IoU, ties to the lowest label number) and detectors."""
    order = iou.sort_values(["unit", "iou", "label"], ascending=[True, False, True], kind="stable")
    best = order.drop_duplicates("unit", keep="first").set_index("unit")
    units = best.reindex(np.arange(len(thresholds))).reset_index()
    units["threshold"] = thresholds
    units["is_detector"] = units["iou"] > iou_threshold
    units["iou_threshold"] = iou_threshold
    return units


def layers_frame(units: pd.DataFrame, categories: tuple[str, ...], meta: dict) -> pd.DataFrame:
    """Detectors and unique detected concepts, overall ('all') and per category."""
    det = units[units["is_detector"]]
    rows = [
        {"category": "all", "units": len(units), "detectors": len(det),
         "unique_concepts": det["label"].nunique()}
    ]
    for cat in categories:
        sub = det[det["category"] == cat]
        rows.append({"category": cat, "units": len(units), "detectors": len(sub),
                     "unique_concepts": sub["label"].nunique()})
    frame = pd.DataFrame(rows)
    for key, value in meta.items():
        frame.insert(0, key, value)
    return frame
