"""What each report template is given: the index (layers, the dataset summary and the main
chart), a layer's page (its units, sortable and filterable) and the concept index (which
units of which layers detect each concept)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from stages.pages.model import Page, text

# Colours per category: the Broden categories get fixed ones, others the rest in turn.
PALETTE = ("#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#edc948", "#e15759", "#76b7b2",
           "#ff9da7", "#9c755f", "#bab0ac")
KNOWN_CATEGORIES = ("object", "scene", "part", "material", "texture", "color")
CHAR_WIDTH = 7.2  # px of a 12px system-ui character, generously: chart labels are never clipped


def fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def decimals_for(values: Sequence[float], digits: int = 4) -> int:
    """One number of decimals for a whole column, enough for ``digits`` significant digits
    of its smallest non-zero value (at most 8)."""
    finite = [abs(v) for v in values if v is not None and np.isfinite(v) and v != 0]
    if not finite:
        return digits
    return int(min(8, max(0, digits - 1 - math.floor(math.log10(min(finite))))))


def label_width(labels: Sequence[str], minimum: int = 90) -> int:
    """Room for the longest label left of a chart's bars."""
    return max(minimum, int(CHAR_WIDTH * max((len(s) for s in labels), default=0)) + 16)


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    ordered = list(KNOWN_CATEGORIES) + [c for c in categories if c not in KNOWN_CATEGORIES]
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(ordered)}


def bar_rows(counts: dict[str, int], intervals: dict[str, tuple[float, float]]) -> dict:
    """Geometry of a horizontal bar chart, one bar per category, with the bootstrap interval
    of each where there is one (for the template)."""
    vmax = math.ceil(max([1, *counts.values(), *(hi for _, hi in intervals.values())]))
    step = max(1, math.ceil(vmax / 5))
    return {"vmax": vmax, "ticks": list(range(0, vmax + 1, step)), "items": list(counts.items()),
            "intervals": {c: intervals[c] for c in counts if c in intervals},
            "label_w": label_width(list(counts))}


def evidence_of(row: Any, threshold: float, null_level: float | None) -> dict:
    """A unit's interval and the flags a reader should see (SEMANTICS.md §8)."""
    found: dict = {"ci": "", "flags": []}
    lo, hi = getattr(row, "iou_lo", None), getattr(row, "iou_hi", None)
    if lo is not None and pd.notna(lo):
        found["ci"] = f"[{lo:.4f}, {hi:.4f}]"
        if row.is_detector and lo <= threshold:
            found["flags"].append(f"interval reaches {threshold:g}")
    p = getattr(row, "p_value", None)
    if p is not None and pd.notna(p):
        found["ci"] += f" p={p:.3f}"
        if row.is_detector and pd.notna(null_level) and p > null_level:
            found["flags"].append("not beyond the null")
    return found


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def layer_context(page: Page, siblings: list[Page], colors: dict[str, str], top_n: int) -> dict:
    s = page.stats()
    units = page.units.assign(
        sort_det=page.units["is_detector"].astype(bool),
        sort_iou=page.units["iou"].fillna(-1.0),
    ).sort_values(["sort_det", "sort_iou", "unit"], ascending=[False, False, True], kind="stable")
    places = decimals_for(list(units["threshold"]))
    threshold = float(page.params.get("iou_threshold", 0.04))
    level = page.units["null_level"].iloc[0] if "null_level" in page.units else None
    rows = [{
        "unit": int(r.unit), "detector": bool(r.sort_det), "concept": text(r.concept),
        "category": text(r.category), "color": colors.get(text(r.category), "#888"),
        "iou": fmt(r.iou), "iou_value": float(r.sort_iou),
        "threshold": fmt(r.threshold, f".{places}f"), "strip": page.strips.get(int(r.unit)),
        **evidence_of(r, threshold, level),
    } for r in units.itertuples(index=False)]
    evidence = any(r["ci"] for r in rows)
    return {"page": page, "stats": s, "siblings": siblings, "colors": colors, "rows": rows,
            "top_n": top_n, "up": "../" * page.href.count("/"), "evidence": evidence,
            "bars": bar_rows(s["per_category"], page.intervals), "generated": now()}


def index_context(pages: list[Page], colors: dict[str, str], note: str,
                  datasets: Sequence[dict]) -> dict:
    categories: list[str] = []
    for p in pages:
        categories += [c for c in p.categories if c not in categories]
    stats = [p.stats() for p in pages]
    vmax = math.ceil(max([1, *(s["unique"] for s in stats),
                          *(p.intervals["all"][1] for p in pages if "all" in p.intervals)]))
    return {"pages": list(zip(pages, stats, strict=True)), "categories": categories,
            "colors": colors, "vmax": vmax,
            "ticks": list(range(0, vmax + 1, max(1, math.ceil(vmax / 6)))),
            "label_w": label_width([p.label() for p in pages], minimum=120),
            "datasets": list(datasets), "note": note, "generated": now()}


def concepts_context(pages: list[Page], colors: dict[str, str]) -> dict:
    """Per concept (and category), every detector unit of every page, best IoU first."""
    found: dict[tuple[str, str], list[dict]] = {}
    for page in pages:
        det = page.units[page.units["is_detector"]]
        for r in det.itertuples(index=False):
            found.setdefault((text(r.concept), text(r.category)), []).append({
                "page": page.label(), "href": f"{page.href}#unit-{int(r.unit)}",
                "unit": int(r.unit), "iou": float(r.iou)})
    rows = []
    for (concept, category), units in found.items():
        units.sort(key=lambda u: (-u["iou"], u["page"], u["unit"]))
        rows.append({"concept": concept, "category": category,
                     "color": colors.get(category, "#888"), "units": units,
                     "layers": len({u["page"] for u in units}), "best": units[0]["iou"]})
    rows.sort(key=lambda r: (-len(r["units"]), -r["best"], r["concept"]))
    return {"rows": rows, "pages": pages, "generated": now()}
