"""Stage ``iou``: score every unit of a layer against every label (SEMANTICS.md §2–6).

One pass reads every block of activations and labels (:class:`ScoringBlocks`) and feeds the
tally (:class:`~stages.tally.statistic.Tally`) and, when formula concepts are scored, the
signature counts (:class:`~stages.signatures.statistic.Signatures`) — both read out of the
same per-block product.  The counts become the ``iou``, ``units`` and ``layers`` tables (§4,
§5), formula concepts rows of the ``iou`` table (§6); when asked, a bootstrap over the images
and a null model give every unit and layer its uncertainty (§8).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from stages.engine.blocks import ScoringBlocks
from stages.engine.reduction import Pass, reduce_blocks
from stages.evidence.null import p_values
from stages.signatures.formulas import Formula
from stages.tally.compiled import VerifiedForm
from stages.tally.labels import LabelSpace
from stages.tally.statistic import Tally, TallyCounts, TallyRule
from storage.tables import with_row_keys

if TYPE_CHECKING:  # written in torch: imported where asked for, so a bare tally needs no torch
    from stages.evidence.bootstrap import BootstrapCounts, TopEntryList
    from stages.signatures.statistic import SignatureCounts, SignaturePartial


class LayerPass(NamedTuple):
    """What one read of a layer's blocks gave: the tally, the signature counts, and each
    unit's largest entries for the bootstrap's thresholds (each None unless asked)."""

    counts: TallyCounts | None
    signatures: SignaturePartial | None
    tops: TopEntryList | None = None


def scoring_pass(source: ScoringBlocks, thresholds: np.ndarray, space: LabelSpace,
                 rule: TallyRule | None, signatures: bool, scheduler: Any = None,
                 desc: str = "iou", progress: bool = False, checkpoint: Path | None = None,
                 tops: int = 0, verified: tuple[VerifiedForm, ...] = ()) -> LayerPass:
    """One read of every block of a layer: the tally (when ``rule`` is given), the signature
    counts (when ``signatures``) and each unit's ``tops`` largest (value, row) entries
    (``verified``: the compiled tally forms recorded per machine)."""
    statistics: list = ([Tally(thresholds, space, rule, verified=verified)]
                        if rule is not None else [])
    if signatures:
        from stages.signatures.statistic import Signatures

        statistics.append(Signatures(thresholds, space))
    if tops:
        from stages.evidence.bootstrap import TopEntries

        statistics.append(TopEntries(tops))
    found = list(reduce_blocks(Pass(source, statistics), source.n_blocks(), scheduler, desc,
                               progress, checkpoint=checkpoint))
    return LayerPass(found.pop(0) if rule is not None else None,
                     found.pop(0) if signatures else None, found.pop(0) if tops else None)


def iou_frame(counts: TallyCounts, space: LabelSpace, keys: dict) -> pd.DataFrame:
    """Every (unit, label) pair with its counts and IoU (SEMANTICS.md §4)."""
    inter = counts.intersection[:, 1:]
    k, n_labels = inter.shape
    return with_row_keys(pd.DataFrame({
        "unit": np.repeat(np.arange(k), n_labels),
        "label": np.tile(space.numbers, k),
        "concept": np.tile(np.array(space.names, dtype=object), k),
        "category": np.tile(np.array(space.categories, dtype=object)[space.primary], k),
        "intersection": inter.reshape(-1),
        "label_area": np.broadcast_to(counts.label_area[1:], (k, n_labels)).reshape(-1),
        "unit_area": counts.unit_area[:, space.primary].reshape(-1),
        "union_area": counts.union_area(space).reshape(-1),
        "iou": counts.iou(space).reshape(-1),
    }), keys)


def units_frame(iou: pd.DataFrame, thresholds: np.ndarray, iou_threshold: float) -> pd.DataFrame:
    """Best concept per unit (highest IoU, ties to the lowest label number) and detectors."""
    order = iou.sort_values(["unit", "iou", "label"], ascending=[True, False, True], kind="stable")
    best = order.drop_duplicates("unit", keep="first").set_index("unit")
    units = best.reindex(np.arange(len(thresholds))).reset_index()
    units["threshold"] = thresholds
    units["is_detector"] = units["iou"] > iou_threshold
    units["iou_threshold"] = iou_threshold
    return units


def layers_frame(units: pd.DataFrame, categories: tuple[str, ...], keys: dict) -> pd.DataFrame:
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
    return with_row_keys(pd.DataFrame(rows), keys)


def score_tables(counts: TallyCounts, space: LabelSpace, thresholds: np.ndarray,
                 iou_threshold: float, keys: dict) -> dict[str, pd.DataFrame]:
    """The ``iou``, ``units`` and ``layers`` rows of one layer; ``keys`` are their key and
    parameter columns (the units and layers rows add the detector threshold)."""
    iou = iou_frame(counts, space, keys)
    units = units_frame(iou, thresholds, iou_threshold)
    layers = layers_frame(units, space.categories, {**keys, "iou_threshold": iou_threshold})
    return {"iou": iou, "units": units, "layers": layers}


def formula_frame(sc: SignatureCounts, formulas: dict[str, Formula],
                  index: dict[str, list[int]], keys: dict) -> pd.DataFrame:
    """Rows for formula concepts in the iou table's schema (category 'formula', label -1,
    -2, ... in the order given); ``index`` maps label names to their dense labels."""
    frames = []
    for i, (name, formula) in enumerate(formulas.items()):
        r = sc.score(sc.truth(formula, index))
        frames.append(pd.DataFrame({
            "unit": np.arange(len(r["iou"])), "label": -(i + 1), "concept": name,
            "category": "formula", "intersection": r["intersection"],
            "label_area": np.int64(r["label_area"]), "unit_area": r["unit_area"],
            "union_area": r["union_area"], "iou": r["iou"],
        }))
    return with_row_keys(pd.concat(frames, ignore_index=True), keys)


def label_index(space: LabelSpace) -> dict[str, list[int]]:
    """Label name -> its dense labels (a name may be listed under several numbers)."""
    index: dict[str, list[int]] = {}
    for i, name in enumerate(space.names):
        index.setdefault(name, []).append(i + 1)
    return index


# ---------------------------------------------------------------- evidence (SEMANTICS.md §8)
def bootstrap_pass(source: ScoringBlocks, thresholds: np.ndarray, space: LabelSpace,
                   rule: TallyRule, labels_of: np.ndarray, seed: int, scheduler: Any = None,
                   desc: str = "bootstrap", progress: bool = False,
                   checkpoint: Path | None = None) -> BootstrapCounts:
    """One more read of every block: the candidates' counts under every replicate, at the
    replicate thresholds ``thresholds`` (K, R) of :func:`replicate_thresholds`."""
    from stages.evidence.bootstrap import Bootstrap

    statistic = Bootstrap(thresholds, space, labels_of, seed, rule)
    (found,) = reduce_blocks(Pass(source, [statistic]), source.n_blocks(), scheduler, desc,
                             progress, checkpoint=checkpoint)
    return found


def null_best_iou(sources: Sequence[ScoringBlocks], thresholds: np.ndarray, space: LabelSpace,
                  rule: TallyRule, scheduler: Any = None, desc: str = "null",
                  progress: bool = False) -> np.ndarray:
    """(D, K) each unit's best IoU over all labels when scored against the labels of other
    images: one tally per draw, ``sources`` reading each draw's pairing."""
    best = []
    for draw, source in enumerate(sources):
        counts = scoring_pass(source, thresholds, space, rule, False, scheduler,
                              f"{desc} {draw + 1}/{len(sources)}", progress).counts
        best.append(counts.iou(space).max(axis=1, initial=0.0))
    return np.array(best)


def with_bootstrap(units: pd.DataFrame, layers: pd.DataFrame, counts: BootstrapCounts,
                   space: LabelSpace, labels_of: np.ndarray, level: float
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The units and layers rows with the bootstrap's intervals and probabilities."""
    from stages.evidence.bootstrap import BootstrapSummary

    point = space.lut[units["label"].to_numpy(np.int64)]
    summary = BootstrapSummary.of(counts, space, labels_of, point)
    threshold = float(units["iou_threshold"].iloc[0])
    units = pd.concat([units, summary.units(threshold, level)], axis=1)
    per_category = summary.layer(threshold, level, space.categories)
    return units, layers.merge(per_category, on="category", how="left", validate="1:1")


UNITS_EVIDENCE = {"iou_lo": "float64", "iou_hi": "float64", "p_detector": "float64",
                  "label_stability": "float64", "p_value": "float64"}
LAYERS_EVIDENCE = {"detectors_lo": "float64", "detectors_hi": "float64",
                   "unique_concepts_lo": "float64", "unique_concepts_hi": "float64",
                   "null_detectors": "Int64"}
SETTINGS = {"bootstrap_replicates": "int64", "bootstrap_ci": "float64",
            "bootstrap_candidates": "Int64", "null_model": "str", "null_draws": "Int64",
            "null_level": "float64", "evidence_seed": "Int64"}


def evidence_columns(units: pd.DataFrame, layers: pd.DataFrame, settings: dict
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The units and layers rows with every evidence column, in one order, null where not
    computed, then the evidence ``settings``: every row set has one schema, so readers that
    take a dataset's schema from one file (pandas, polars, duckdb) see every column."""
    def complete(frame: pd.DataFrame, columns: dict) -> pd.DataFrame:
        found = {c: frame[c].astype(dtype) if c in frame else
                 pd.Series(index=frame.index, dtype=dtype) for c, dtype in columns.items()}
        found |= {c: pd.Series([settings[c]] * len(frame), index=frame.index, dtype=dtype)
                  for c, dtype in SETTINGS.items()}
        return frame.drop(columns=[c for c in columns if c in frame]).assign(**found)

    return complete(units, UNITS_EVIDENCE), complete(layers, LAYERS_EVIDENCE)


def with_null(units: pd.DataFrame, layers: pd.DataFrame, null_best: np.ndarray, level: float
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The units rows with each unit's p-value, the layers rows with the detectors that beat
    the null at ``level``."""
    units = units.assign(p_value=p_values(units["iou"].to_numpy(np.float64), null_best))
    beats = units[units["is_detector"] & (units["p_value"] <= level)]
    counted = {"all": len(beats), **beats["category"].value_counts().to_dict()}
    return units, layers.assign(
        null_detectors=[int(counted.get(c, 0)) for c in layers["category"]])
