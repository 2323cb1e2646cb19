"""The report's pages: one per (model identity, layer, parameter set), labelled by what tells
it apart from its siblings, in a natural order (layers in the model's order, numbers as
numbers: ``block2`` before ``block10``, ``alpha=0`` before ``alpha=0.5``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from storage.tables import safe_name

# Parameter columns that distinguish one scoring of a layer from another (one page each).
VARIANT_COLUMNS = ("model_id", "weights", "perturbation", "dataset", "concept_set", "basis",
                   "threshold_quantile", "union_mode", "planes", "categories", "iou_threshold")
SHOWN_PARAMS = ("weights", "perturbation", "dataset", "concept_set", "basis", "threshold_quantile",
                "union_mode", "planes", "iou_threshold")


def natural_key(value: Any) -> list:
    """Sort key comparing runs of digits as numbers (``layer10`` after ``layer2``, ``0.5``
    after ``0``)."""
    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
            for t in re.split(r"(\d+(?:\.\d+)?)", str(value)) if t]


def text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return str(value)


@dataclass
class Page:
    model: str
    layer: str
    params: dict
    units: pd.DataFrame
    href: str = ""  # relative to report/
    strips_dir: str = ""  # relative to report/
    note: str = ""
    strips: dict[int, dict] = field(default_factory=dict)
    variant: str = ""  # what sets this page apart from its layer's first page
    identity: str = ""  # the model as the page names it: with its weights when a name has several
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # unique concepts'
    # bootstrap interval per category ('all' too), when the layers rows have one

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(dataset, model id, layer, basis): which activations the page shows."""
        p = self.params
        return (str(p.get("dataset")), str(p.get("model_id", self.model)), self.layer,
                str(p.get("basis", "none")))

    @property
    def categories(self) -> list[str]:
        listed = [c for c in str(self.params.get("categories") or "").split(",") if c]
        seen = [c for c in self.units["category"].dropna().unique() if c not in listed]
        return listed + sorted(seen)

    def stats(self) -> dict:
        det = self.units[self.units["is_detector"]]
        return {
            "units": len(self.units),
            "detectors": len(det),
            "unique": int(det["label"].nunique()),
            "per_category": {c: int(det.loc[det["category"] == c, "label"].nunique())
                             for c in self.categories},
        }

    def label(self) -> str:
        return (f"{self.identity or self.model} · {self.layer}"
                + (f" ({self.variant})" if self.variant else ""))

    def shown_params(self) -> list[tuple[str, str]]:
        return [(k, text(self.params[k])) for k in SHOWN_PARAMS if k in self.params]


def plan_pages(frame: pd.DataFrame) -> list[Page]:
    """One page per (model identity, layer, parameter set), with its file names."""
    variant_cols = [c for c in VARIANT_COLUMNS if c in frame.columns]
    pages: list[Page] = []
    used: set[str] = set()
    model_ids = frame["model_id"] if "model_id" in frame.columns else frame["model"]
    identities = frame.assign(_mid=model_ids).groupby("model")["_mid"].nunique()
    for (model, model_id, layer), sub in frame.assign(_mid=model_ids).groupby(
            ["model", "_mid", "layer"], sort=True, observed=True):
        weights = str(sub["weights"].iloc[0]) if "weights" in sub.columns else str(model_id)
        identity = f"{model} [{weights}]" if identities[model] > 1 else str(model)
        groups = [
            (dict(zip(variant_cols, key, strict=True)), rows)
            for key, rows in sub.groupby(variant_cols, sort=True, dropna=False)
        ]
        # the probe dataset's own labels, untransformed, first: it gets the plain <layer>.html
        groups.sort(key=lambda g: (g[0].get("concept_set") != g[0].get("dataset"),
                                   str(g[0].get("basis", "none")) != "none",
                                   natural_key(g[0].get("basis", "none"))))
        first = groups[0][0]
        for params, rows in groups:
            differs = [f"{k} {text(params[k])}" for k in ("concept_set", "threshold_quantile",
                                                          "union_mode", "planes", "categories")
                       if k in params and params[k] != first.get(k)]
            differs += [f"{k} {text(params[k])}" for k in ("perturbation", "basis")
                        if str(params.get(k, "none")) != "none"]
            stem = f"{safe_name(str(model_id))}/{safe_name(str(layer))}"
            if differs:
                stem += "~" + safe_name("_".join(differs))
            base, n = stem, 2
            while stem in used:
                stem, n = f"{base}-{n}", n + 1
            used.add(stem)
            units = rows.sort_values("unit").drop_duplicates("unit").reset_index(drop=True)
            pages.append(Page(str(model), str(layer), params, units, f"{stem}.html", stem,
                              variant=", ".join(differs), identity=identity))
    return pages


def attach_intervals(pages: Sequence[Page], layers: pd.DataFrame) -> None:
    """Give each page the bootstrap intervals of unique detected concepts of its layers rows
    (those with the page's parameters), when they have them (SEMANTICS.md §8)."""
    if layers.empty or "unique_concepts_lo" not in layers.columns:
        return
    for page in pages:
        rows = layers[layers["layer"].astype(str) == page.layer]
        for key, value in page.params.items():
            if key in rows.columns:
                rows = rows[rows[key].isna()] if pd.isna(value) else rows[rows[key] == value]
        page.intervals = {str(r.category): (float(r.unique_concepts_lo), float(r.unique_concepts_hi))
                          for r in rows.itertuples() if pd.notna(r.unique_concepts_lo)}


def ordered(pages: Sequence[Page], layer_order: Callable[[Page], int]) -> list[Page]:
    """Models by name, identities by weights, layers in the model's order, variants in
    natural order (each comparison by :func:`natural_key`)."""
    return sorted(pages, key=lambda p: (p.model, natural_key(p.identity), p.key[1],
                                        layer_order(p), natural_key(p.layer),
                                        p.variant != "", natural_key(p.variant)))
