"""Stage ``report``: a static HTML report of the dissection results.

From the ``units`` rows it is given (and, per page, the top images of each unit), it writes:

- ``index.html``: one row per page with units, detectors and unique concepts, and a stacked
  bar chart of unique detectors per category (the paper's main figure);
- ``<model-id>/<layer>[~<variant>].html``: a header with the counts and the parameters that
  produced them, a bar chart of unique detectors per category, and every unit (detectors
  first, the rest greyed) with its best concept, category, IoU, threshold and a strip of its
  top-N images with the unit's mask (the image dimmed outside the mask, the mask outlined);
- ``<model-id>/<layer>[~<variant>]/unit_<k>.jpg``: the strips, referenced by relative paths.

One page per (model identity, layer, parameter set): another concept set, basis,
threshold quantile or union mode gets its own page, labelled with what differs.  Pages are rendered
from jinja2 templates with autoescaping, so every label name and path is shown as text.
Masks follow SEMANTICS.md §2 at the image's size: ``interpolate(bilinear) > threshold``.
The whole report is written into a temporary directory and swapped in at the end
(``storage.artifacts.atomic_dir``): a crash leaves the previous report, never half an index.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from stages.network.perturb import Perturbation
from stages.tally.masks import unit_mask
from stages.thresholds.top_images import TopImages
from storage.artifacts import atomic_dir
from storage.broden_images import dataset_file
from storage.errors import UserError
from storage.tables import safe_name

log = logging.getLogger("netdissect")

# Parameter columns that distinguish one scoring of a layer from another (one page each).
VARIANT_COLUMNS = ("model_id", "weights", "perturbation", "dataset", "concept_set", "basis",
                   "threshold_quantile", "union_mode", "planes", "categories", "iou_threshold")
SHOWN_PARAMS = ("weights", "perturbation", "dataset", "concept_set", "basis", "threshold_quantile",
                "union_mode", "planes", "iou_threshold")
# Colours per category: the Broden categories get fixed ones, others the rest in turn.
PALETTE = ("#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#edc948", "#e15759", "#76b7b2",
           "#ff9da7", "#9c755f", "#bab0ac")
KNOWN_CATEGORIES = ("object", "scene", "part", "material", "texture", "color")
OUTLINE = np.array([255, 214, 0], dtype=np.uint8)  # mask outline (amber)
DIM = 0.28  # brightness kept outside the mask
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("stages", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)


@dataclass(frozen=True)
class ReportConfig:
    report_dir: Path
    top_n: int = 8
    progress: bool = True
    thumb_size: int = 96  # pixels of the longer side of each image in a strip
    title_note: str = ""  # shown under the index heading (e.g. the workdir)


@dataclass(frozen=True)
class PageImages:
    """Where one page's strips come from: the units' top images and the dataset's images;
    ``note`` says why a page has no strips."""

    top: TopImages | None = None
    images_dir: Path | None = None
    image_paths: tuple[str, ...] = ()
    note: str = ""
    perturbation: Perturbation | None = None  # what the model saw: shown as it saw it


# ---------------------------------------------------------------- image tiles
def render_tile(image: np.ndarray, mask: np.ndarray, thumb: int) -> np.ndarray:
    """The image scaled to fit ``thumb`` px, dimmed outside the mask, the mask outlined."""
    h, w = image.shape[:2]
    scale = thumb / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    m = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    ) >= 128
    out = np.where(m[..., None], small, (small * DIM).astype(np.uint8))
    padded = np.pad(m, 1, mode="edge")
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = m & ~interior
    out[edge] = OUTLINE
    return out


def strip_image(tiles: list[np.ndarray], gap: int = 3) -> Image.Image:
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        canvas[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    return Image.fromarray(canvas)


class ImageCache:
    """Decoded RGB images by row (perturbed as the model saw them), least recently used
    dropped past ``size`` entries."""

    def __init__(self, images_dir: Path, paths: Sequence[str], size: int = 256,
                 perturbation: Perturbation | None = None):
        self.images_dir, self.paths, self.size = images_dir, paths, size
        self.perturbation = perturbation
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, row: int) -> np.ndarray:
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        path = dataset_file(self.images_dir, self.paths[row])
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read image for the report ({exc})") from None
        if self.perturbation is not None and self.perturbation.kind != "none":
            array = self.perturbation.images(array[None], np.array([row]))[0].astype(np.uint8)
        self.cache[row] = array
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return array


# ---------------------------------------------------------------- pages
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
        return f"{self.model} · {self.layer}" + (f" ({self.variant})" if self.variant else "")

    def shown_params(self) -> list[tuple[str, str]]:
        return [(k, text(self.params[k])) for k in SHOWN_PARAMS if k in self.params]


def plan_pages(frame: pd.DataFrame) -> list[Page]:
    """One page per (model identity, layer, parameter set), with its file names."""
    variant_cols = [c for c in VARIANT_COLUMNS if c in frame.columns]
    pages: list[Page] = []
    used: set[str] = set()
    model_ids = frame["model_id"] if "model_id" in frame.columns else frame["model"]
    for (model, model_id, layer), sub in frame.assign(_mid=model_ids).groupby(
            ["model", "_mid", "layer"], sort=True, observed=True):
        groups = [
            (dict(zip(variant_cols, key, strict=True)), rows)
            for key, rows in sub.groupby(variant_cols, sort=True, dropna=False)
        ]
        # the probe dataset's own labels, untransformed, first: it gets the plain <layer>.html
        groups.sort(key=lambda g: (g[0].get("concept_set") != g[0].get("dataset"),
                                   str(g[0].get("basis", "none")) != "none"))
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
                              variant=", ".join(differs)))
    return pages


def fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return str(value)


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    ordered = list(KNOWN_CATEGORIES) + [c for c in categories if c not in KNOWN_CATEGORIES]
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(ordered)}


# ---------------------------------------------------------------- strips
def render_strips(pages: list[Page], images: Callable[[Page], PageImages], out: Path,
                  cfg: ReportConfig) -> None:
    """One strip per unit and page: its top images with the unit's mask."""
    caches: dict[tuple, ImageCache] = {}
    for page in pages:
        source = images(page)
        if source.top is None or source.images_dir is None:
            page.note = source.note
            continue
        cache_key = (source.images_dir, str(source.perturbation))
        if cache_key not in caches:
            caches[cache_key] = ImageCache(source.images_dir, source.image_paths,
                                           perturbation=source.perturbation)
        load, top = caches[cache_key], source.top
        strip_dir = out / page.strips_dir
        strip_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(page.units.itertuples(index=False), total=len(page.units),
                   desc=f"report {page.model} {page.layer}", unit="unit", leave=False,
                   disable=None if cfg.progress else True)
        for row in bar:
            k = int(row.unit)
            if k >= top.index.shape[0]:
                continue
            tiles = []
            for j in range(min(cfg.top_n, top.index.shape[1])):
                image = load(int(top.index[k, j]))
                mask = unit_mask(top.maps[k, j], float(row.threshold), image.shape[:2])
                tiles.append(render_tile(image, mask, cfg.thumb_size))
            strip = strip_image(tiles)
            name = f"unit_{k:04d}.jpg"
            strip.save(strip_dir / name, quality=88, subsampling=0)
            title = "; ".join(f"{source.image_paths[int(i)]} (max {v:.3g})"
                              for i, v in zip(top.index[k][: len(tiles)], top.value[k], strict=False))
            page.strips[k] = {"src": f"{Path(page.strips_dir).name}/{name}",
                              "width": strip.width, "height": strip.height, "title": title}


# ---------------------------------------------------------------- HTML
def layer_context(page: Page, siblings: list[Page], colors: dict[str, str], top_n: int) -> dict:
    s = page.stats()
    units = page.units.assign(
        sort_det=page.units["is_detector"].astype(bool),
        sort_iou=page.units["iou"].fillna(-1.0),
    ).sort_values(["sort_det", "sort_iou", "unit"], ascending=[False, False, True], kind="stable")
    rows = [{
        "unit": int(r.unit), "detector": bool(r.sort_det), "concept": text(r.concept),
        "category": text(r.category), "color": colors.get(text(r.category), "#888"),
        "iou": fmt(r.iou), "threshold": fmt(r.threshold, ".4g"), "strip": page.strips.get(int(r.unit)),
    } for r in units.itertuples(index=False)]
    return {"page": page, "stats": s, "siblings": siblings, "colors": colors, "rows": rows,
            "top_n": top_n, "up": "../" * page.href.count("/"),
            "bars": bar_rows(s["per_category"]), "generated": now()}


def bar_rows(counts: dict[str, int]) -> dict:
    """Geometry of a horizontal bar chart, one bar per category (for the template)."""
    vmax = max([1, *counts.values()])
    step = max(1, math.ceil(vmax / 5))
    return {"vmax": vmax, "ticks": list(range(0, vmax + 1, step)), "items": list(counts.items())}


def index_context(pages: list[Page], colors: dict[str, str], cfg: ReportConfig) -> dict:
    categories: list[str] = []
    for p in pages:
        categories += [c for c in p.categories if c not in categories]
    stats = [p.stats() for p in pages]
    vmax = max([1, *(s["unique"] for s in stats)])
    return {"pages": list(zip(pages, stats, strict=True)), "categories": categories,
            "colors": colors, "vmax": vmax,
            "ticks": list(range(0, vmax + 1, max(1, math.ceil(vmax / 6)))),
            "note": cfg.title_note, "generated": now()}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def build_report(cfg: ReportConfig, units: pd.DataFrame, images: Callable[[Page], PageImages],
                 layer_order: Callable[[Page], int] = lambda page: 0) -> Path:
    """Write the report for ``units`` (the rows of the units table to show) into
    ``cfg.report_dir``; ``images`` gives each page its top images; ``layer_order`` ranks a
    page's layer within its model.  Returns the path of ``index.html``."""
    if units.empty:
        raise UserError("report: no units rows to report on; run stage=iou first")
    pages = sorted(plan_pages(units),
                   key=lambda p: (p.model, p.key[1], layer_order(p), p.layer, p.href))
    categories: list[str] = []
    for p in pages:
        categories += [c for c in p.categories if c not in categories]
    colors = category_colors(categories)
    with atomic_dir(cfg.report_dir) as tmp:
        render_strips(pages, images, tmp, cfg)
        layer_template = TEMPLATES.get_template("layer.html.j2")
        for p in pages:
            siblings = [o for o in pages if o.key[1] == p.key[1]]
            target = tmp / p.href
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(layer_template.render(layer_context(p, siblings, colors, cfg.top_n)),
                              encoding="utf-8")
        (tmp / "index.html").write_text(
            TEMPLATES.get_template("index.html.j2").render(index_context(pages, colors, cfg)),
            encoding="utf-8")
    index = cfg.report_dir / "index.html"
    log.info("report: %d layer page(s) -> %s", len(pages), index)
    return index
