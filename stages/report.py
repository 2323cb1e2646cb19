"""Stage ``report``: a static HTML report of the dissection results.

Reads the ``units`` result table and writes, under ``<workdir>/report/``:

- ``index.html``: one row per (model, layer, parameter set) with units, detectors and unique
  concepts, a stacked bar chart of unique detectors per category per layer (the paper's main
  figure) and a link to each layer page;
- ``<model>/<layer>.html``: a header with the counts, an inline-SVG bar chart of unique
  detectors per category, and every unit (detectors first, the rest greyed) with its best
  concept, category, IoU, threshold and a strip of its top-N images with the unit's mask
  overlaid (the image is dimmed outside the mask and the mask outlined);
- ``<model>/<layer>/unit_<k>.jpg``: the image strips, referenced by relative paths.

A layer scored with more than one parameter set (another concept set, quantile, union mode,
...) gets one page per set: the probe dataset's own concept set keeps ``<layer>.html``, the
others are ``<layer>~<set>.html`` with strips under ``<layer>~<set>/``.  Rows of the
axis-alignment experiment (``transform`` other than ``none``) are left out: their units are
rotated mixtures whose images cannot be read off the unrotated activation cache.

Top images are found without touching the dataset: :class:`TopImagesReduction` is a block
reduction over the activation store (per unit, the ``top_n`` images with the highest maximum
activation over the unit's map, ties to the lower image index, carrying those maps along),
so only the winning images are read from disk, once each.  Masks follow SEMANTICS.md §2 at
the image's size: ``interpolate(mode='bilinear', align_corners=False) > threshold``.

The whole report is written into a temporary directory beside ``report/`` and swapped in at
the end, so a crashed run leaves the previous report (or none), never half an index.
"""

from __future__ import annotations

import html
import logging
import math
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from stages.blocks import LayerBlocks
from stages.kernels import upsample_masks
from stages.reduction import reduce_blocks
from storage.activations import ActivationStore
from storage.broden import index_fingerprint
from storage.errors import UserError
from storage.tables import safe_name

log = logging.getLogger("netdissect")

# Parameter columns that distinguish one scoring of a layer from another (one page each).
VARIANT_COLUMNS = ("dataset", "concept_set", "quantile", "union_mode", "planes", "categories",
                   "iou_threshold")
# Colours per category: the Broden categories get fixed ones, others the rest in turn.
PALETTE = ("#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#edc948", "#e15759", "#76b7b2",
           "#ff9da7", "#9c755f", "#bab0ac")
KNOWN_CATEGORIES = ("object", "scene", "part", "material", "texture", "color")
OUTLINE = np.array([255, 214, 0], dtype=np.uint8)  # mask outline (amber)
DIM = 0.28  # brightness kept outside the mask


@dataclass(frozen=True)
class ReportConfig:
    workdir: Path
    dataset_root: Path  # the Broden directory the activations were extracted from (images)
    top_n: int = 8
    progress: bool = True
    concept_set: str | None = None  # only rows of this concept set (default: all)
    thumb_size: int = 96  # pixels of the longer side of each image in a strip

    @property
    def report_dir(self) -> Path:
        return Path(self.workdir) / "report"


# ---------------------------------------------------------------- top-N block reduction
@dataclass(frozen=True)
class TopImages:
    """Per unit, the top images by maximum activation, best first."""

    index: np.ndarray  # (K, m) int64 image rows
    value: np.ndarray  # (K, m) float32 maximum activation of the unit on that image
    maps: np.ndarray  # (K, m, h, w) float32 the unit's raw map on that image


def select_top(
    index: np.ndarray, value: np.ndarray, maps: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's ``n`` largest values, ties to the lower image index, best first."""
    order = np.lexsort((index, -value), axis=1)[:, :n]
    return (
        np.take_along_axis(index, order, axis=1),
        np.take_along_axis(value, order, axis=1),
        np.take_along_axis(maps, order[:, :, None, None], axis=1),
    )


@dataclass(frozen=True)
class TopImagesReduction:
    """Block reduction: partial = per unit the block's top-n (image, max, map); combine keeps
    the top-n of the union; ties go to the lower image index whatever the blocking."""

    blocks: LayerBlocks
    top_n: int

    def chunk(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, _ = self.blocks.store().block_range(block)
        acts = self.blocks.load(block).cpu()  # (B, K, h, w), NaN-checked
        b, k = acts.shape[:2]
        maps = acts.transpose(0, 1).numpy()  # (K, B, h, w)
        value = acts.amax(dim=(2, 3)).T.contiguous().numpy()  # (K, B)
        index = np.broadcast_to(np.arange(start, start + b, dtype=np.int64), (k, b))
        return select_top(np.ascontiguousarray(index), value, maps, self.top_n)

    def combine(self, partials: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        index = np.concatenate([p[0] for p in partials], axis=1)
        value = np.concatenate([p[1] for p in partials], axis=1)
        maps = np.concatenate([p[2] for p in partials], axis=1)
        return select_top(index, value, maps, self.top_n)

    def finish(self, partial) -> TopImages:
        index, value, maps = partial
        return TopImages(index.copy(), value.copy(), maps.copy())


def top_images(
    store_path: Path, layer: str, top_n: int, scheduler: Any = None, progress: bool = False
) -> TopImages:
    """The top-``top_n`` images of every unit of ``layer``, one pass over the activations."""
    if top_n <= 0:
        raise UserError(f"report.top_n={top_n}: must be positive")
    reduction = TopImagesReduction(LayerBlocks(str(store_path), layer, None, "cpu"), top_n)
    n_blocks = ActivationStore(store_path).n_blocks()
    return reduce_blocks(reduction, n_blocks, scheduler, f"top images {layer}", progress)


# ---------------------------------------------------------------- image tiles
def unit_mask(act_map: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """SEMANTICS.md §2 mask of one raw map at ``size`` (h, w): bilinear upsample > T."""
    acts = torch.from_numpy(np.ascontiguousarray(act_map, dtype=np.float32))[None]
    thr = torch.tensor([threshold], dtype=torch.float32)
    return upsample_masks(acts, size, thr)[0].numpy()


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
    """Decoded RGB images by row, least recently used dropped past ``size`` entries."""

    def __init__(self, images_dir: Path, paths: list[str], size: int = 256):
        self.images_dir, self.paths, self.size = images_dir, paths, size
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, row: int) -> np.ndarray:
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        path = self.images_dir / self.paths[row]
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read image for the report ({exc})") from None
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
    strips: dict[int, tuple[str, int, int, str]] = field(default_factory=dict)

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


def read_units(cfg: ReportConfig) -> tuple[pd.DataFrame, int]:
    """The units table restricted to unrotated rows (and the concept set); rows left out."""
    path = Path(cfg.workdir) / "results" / "units"
    if not path.is_dir() or not any(path.rglob("*.parquet")):
        raise UserError(f"{path}: no units table to report on; run stage=iou first")
    frame = pd.read_parquet(path)
    for col in ("model", "layer"):
        frame[col] = frame[col].astype(str)
    if "transform" in frame.columns:
        rotated = int((frame["transform"] != "none").sum())
        frame = frame[frame["transform"] == "none"]
    else:
        rotated = 0
    if cfg.concept_set is not None:
        known = sorted(frame["concept_set"].unique())
        frame = frame[frame["concept_set"] == cfg.concept_set]
        if frame.empty:
            raise UserError(
                f"report.concept_set={cfg.concept_set!r}: no units rows; the table has "
                f"{', '.join(known) or 'none'}"
            )
    if frame.empty:
        raise UserError(f"{path}: no unrotated units rows to report on; run stage=iou first")
    return frame.reset_index(drop=True), rotated


def plan_pages(frame: pd.DataFrame) -> list[Page]:
    """One page per (model, layer, parameter set), with its file names."""
    variant_cols = [c for c in VARIANT_COLUMNS if c in frame.columns]
    pages: list[Page] = []
    used: set[str] = set()
    for (model, layer), sub in frame.groupby(["model", "layer"], sort=True, observed=True):
        groups = [
            (dict(zip(variant_cols, key, strict=True)), rows)
            for key, rows in sub.groupby(variant_cols, sort=True, dropna=False)
        ]
        # the probe dataset's own concept set first: it gets the plain <layer>.html
        groups.sort(key=lambda g: g[0].get("concept_set") != g[0].get("dataset"))
        for i, (params, rows) in enumerate(groups):
            stem = f"{safe_name(model)}/{safe_name(layer)}"
            if i > 0:
                stem += "~" + safe_name(params.get("concept_set", "set"))
            base, n = stem, 2
            while stem in used:
                stem, n = f"{base}-{n}", n + 1
            used.add(stem)
            units = rows.sort_values("unit").drop_duplicates("unit").reset_index(drop=True)
            pages.append(Page(str(model), str(layer), params, units, f"{stem}.html", stem))
    return pages


def layer_order(pages: list[Page], workdir: Path) -> list[Page]:
    """Models alphabetically; layers in the activation store's order where it is known."""
    orders: dict[tuple[str, str], list[str]] = {}

    def rank(page: Page) -> tuple:
        key = (str(page.params.get("dataset")), page.model)
        if key not in orders:
            try:
                orders[key] = ActivationStore(store_path(workdir, *key)).layers
            except UserError:
                orders[key] = []
        layers = orders[key]
        pos = layers.index(page.layer) if page.layer in layers else len(layers)
        return (page.model, pos, page.layer, page.href)

    return sorted(pages, key=rank)


def store_path(workdir: Path, dataset: str, model: str) -> Path:
    return Path(workdir) / "activations" / dataset / f"{model}.zarr"


def fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return str(value)


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    ordered = [c for c in KNOWN_CATEGORIES] + [c for c in categories if c not in KNOWN_CATEGORIES]
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(ordered)}


# ---------------------------------------------------------------- strips
def render_strips(
    pages: list[Page], cfg: ReportConfig, out: Path, scheduler: Any
) -> None:
    """Find every layer's top images once and write one strip per unit and page."""
    root = Path(cfg.dataset_root)
    expected_index = index_fingerprint(root) if (root / "index.csv").is_file() else None
    tops: dict[tuple[str, str, str], TopImages] = {}
    caches: dict[tuple[str, str], ImageCache] = {}
    for page in pages:
        dataset = str(page.params.get("dataset"))
        spath = store_path(cfg.workdir, dataset, page.model)
        try:
            store = ActivationStore(spath)
        except UserError as exc:
            page.note = f"No image strips: {exc}"
            log.warning("report: %s %s: %s", page.model, page.layer, exc)
            continue
        if page.layer not in store.layers:
            page.note = f"No image strips: layer {page.layer} is not cached in {spath}."
            continue
        if expected_index is None or store.fingerprint.get("dataset_index") != expected_index:
            page.note = (f"No image strips: {root} is not the dataset the activations in {spath} "
                         "were extracted from.")
            log.warning("report: %s", page.note)
            continue
        key = (dataset, page.model, page.layer)
        if key not in tops:
            tops[key] = top_images(spath, page.layer, cfg.top_n, scheduler, cfg.progress)
        top = tops[key]
        if (dataset, page.model) not in caches:
            caches[(dataset, page.model)] = ImageCache(root / "images", store.image_paths())
        load = caches[(dataset, page.model)]
        paths = load.paths
        strip_dir = out / page.strips_dir
        strip_dir.mkdir(parents=True, exist_ok=True)
        rows = page.units.itertuples(index=False)
        bar = tqdm(rows, total=len(page.units), desc=f"report {page.model} {page.layer}",
                   unit="unit", leave=False, disable=None if cfg.progress else True)
        for row in bar:
            k = int(row.unit)
            if k >= top.index.shape[0]:
                continue
            threshold = float(row.threshold)
            tiles = []
            for j in range(top.index.shape[1]):
                image = load(int(top.index[k, j]))
                mask = unit_mask(top.maps[k, j], threshold, image.shape[:2])
                tiles.append(render_tile(image, mask, cfg.thumb_size))
            strip = strip_image(tiles)
            name = f"unit_{k:04d}.jpg"
            strip.save(strip_dir / name, quality=88, subsampling=0)
            title = "; ".join(
                f"{paths[int(i)]} (max {v:.3g})" for i, v in zip(top.index[k], top.value[k],
                                                                  strict=True)
            )
            page.strips[k] = (f"{Path(page.strips_dir).name}/{name}", strip.width, strip.height,
                              title)


# ---------------------------------------------------------------- HTML
CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#ffffff; --soft:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 20px 28px 40px; max-width: 1280px; }
h1 { font-size: 22px; margin: 4px 0 2px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
nav { font-size: 13px; color: var(--muted); }
nav a { margin-right: 10px; }
.params { color: var(--muted); font-size: 13px; margin: 2px 0 14px; }
.params code { background: var(--soft); padding: 1px 5px; border-radius: 4px; }
.stats { display: flex; gap: 12px; margin: 10px 0 6px; flex-wrap: wrap; }
.stat { border: 1px solid var(--line); border-radius: 8px; padding: 8px 16px; min-width: 130px;
        background: var(--soft); }
.stat b { display: block; font-size: 24px; line-height: 1.2; }
.stat span { color: var(--muted); font-size: 12px; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
svg.chart text { font: 12px system-ui, sans-serif; fill: var(--fg); }
svg.chart .axis { stroke: #8c959f; stroke-width: 1; }
svg.chart .grid { stroke: #eaeef2; stroke-width: 1; }
table { border-collapse: collapse; width: 100%; }
table#units { table-layout: fixed; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: middle; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
     background: var(--soft); position: sticky; top: 0; z-index: 1; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
th.num { text-align: right; }
td.concept { font-weight: 600; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
          margin-right: 6px; vertical-align: baseline; }
tr.detector td.unit { font-weight: 600; }
tr.other { color: #8c959f; }
tr.other td.concept { font-weight: 400; }
tr.other img { filter: grayscale(100%); opacity: .55; }
tr.sep td { background: var(--soft); color: var(--muted); font-size: 12px;
            text-transform: uppercase; letter-spacing: .04em; padding: 6px 8px; }
td.strip img { display: block; border-radius: 3px; max-width: 100%; height: auto; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
"""


def page_html(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def bar_chart(counts: dict[str, int], colors: dict[str, str], title: str) -> str:
    """Horizontal bars, one per category, with the count at the end of each bar."""
    label_w, bar_w, row_h, top = 90, 420, 24, 26
    vmax = max([1, *counts.values()])
    height = top + row_h * max(len(counts), 1) + 26
    width = label_w + bar_w + 50
    parts = [f'<svg class="chart" id="category-chart" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="0" y="15" style="font-weight:600">{html.escape(title)}</text>']
    step = max(1, math.ceil(vmax / 5))
    for tick in range(0, vmax + 1, step):
        x = label_w + bar_w * tick / vmax
        y1, y2 = top - 4, top + row_h * len(counts)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y2}"/>')
        parts.append(f'<text x="{x:.1f}" y="{y2 + 16}" text-anchor="middle" '
                     f'fill="#656d76">{tick}</text>')
    for i, (cat, value) in enumerate(counts.items()):
        y = top + i * row_h
        w = bar_w * value / vmax
        parts.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" '
                     f'text-anchor="end">{html.escape(cat)}</text>')
        parts.append(f'<rect class="bar" data-category="{html.escape(cat)}" data-value="{value}" '
                     f'x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" rx="2" '
                     f'fill="{colors.get(cat, "#888")}"><title>{html.escape(cat)}: {value}'
                     f'</title></rect>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + row_h / 2 + 4:.1f}">{value}</text>')
    parts.append(f'<line class="axis" x1="{label_w}" y1="{top - 4}" x2="{label_w}" '
                 f'y2="{top + row_h * len(counts)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def stacked_chart(pages: list[Page], colors: dict[str, str]) -> str:
    """Index figure: per layer page, unique detectors stacked by category."""
    cats: list[str] = []
    for p in pages:
        cats += [c for c in p.categories if c not in cats]
    stats = [p.stats() for p in pages]
    label_w, bar_w, row_h, top = 230, 520, 26, 50
    vmax = max([1, *(s["unique"] for s in stats)])
    height = top + row_h * len(pages) + 28
    width = label_w + bar_w + 60
    parts = [f'<svg class="chart" id="layers-chart" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="Unique detectors per category and layer">',
             '<text x="0" y="15" style="font-weight:600">Unique detectors per category</text>']
    x = label_w
    for cat in cats:  # legend
        parts.append(f'<rect x="{x}" y="26" width="10" height="10" rx="2" '
                     f'fill="{colors.get(cat, "#888")}"/>')
        parts.append(f'<text x="{x + 14}" y="35">{html.escape(cat)}</text>')
        x += 24 + 7 * len(cat)
    step = max(1, math.ceil(vmax / 6))
    for tick in range(0, vmax + 1, step):
        gx = label_w + bar_w * tick / vmax
        y2 = top + row_h * len(pages)
        parts.append(f'<line class="grid" x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{y2}"/>')
        parts.append(f'<text x="{gx:.1f}" y="{y2 + 16}" text-anchor="middle" '
                     f'fill="#656d76">{tick}</text>')
    for i, (page, s) in enumerate(zip(pages, stats, strict=True)):
        y = top + i * row_h
        name = f"{page.model} · {page.layer}"
        if page.params.get("concept_set") != page.params.get("dataset"):
            name += f" ({page.params.get('concept_set')})"
        parts.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">'
                     f'{html.escape(name)}</text>')
        x = float(label_w)
        for cat in cats:
            value = s["per_category"].get(cat, 0)
            if value == 0:
                continue
            w = bar_w * value / vmax
            parts.append(f'<rect class="bar" data-category="{html.escape(cat)}" '
                         f'data-value="{value}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" '
                         f'height="{row_h - 6}" fill="{colors.get(cat, "#888")}"><title>'
                         f'{html.escape(name)} {html.escape(cat)}: {value}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + row_h / 2 + 4:.1f}">{s["unique"]}</text>')
    parts.append(f'<line class="axis" x1="{label_w}" y1="{top - 4}" x2="{label_w}" '
                 f'y2="{top + row_h * len(pages)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def params_line(params: dict) -> str:
    shown = [(k, params[k]) for k in ("dataset", "concept_set", "quantile", "union_mode", "planes",
                                      "iou_threshold") if k in params]
    return " ".join(f"{html.escape(k)} <code>{html.escape(text(v))}</code>" for k, v in shown)


def stat_boxes(s: dict, iou_threshold: Any) -> str:
    return (
        '<div class="stats">'
        f'<div class="stat" id="n-units"><b>{s["units"]}</b><span>units</span></div>'
        f'<div class="stat" id="n-detectors"><b>{s["detectors"]}</b><span>detectors '
        f'(best IoU &gt; {html.escape(text(iou_threshold))})</span></div>'
        f'<div class="stat" id="n-unique"><b>{s["unique"]}</b><span>unique concepts</span></div>'
        "</div>"
    )


def layer_page(page: Page, siblings: list[Page], colors: dict[str, str], top_n: int) -> str:
    s = page.stats()
    up = "../" * page.href.count("/")
    nav = [f'<a href="{up}index.html">← all layers</a>']
    for other in siblings:
        label = html.escape(f"{other.model}/{other.layer}")
        if other is page:
            nav.append(f"<b>{label}</b>")
        else:
            nav.append(f'<a href="{up}{html.escape(other.href)}">{label}</a>')
    units = page.units.assign(
        sort_det=page.units["is_detector"].astype(bool),
        sort_iou=page.units["iou"].fillna(-1.0),
    ).sort_values(["sort_det", "sort_iou", "unit"], ascending=[False, False, True], kind="stable")
    rows = []
    shown_sep = False
    for row in units.itertuples(index=False):
        det = bool(row.sort_det)
        if not det and not shown_sep:
            rows.append('<tr class="sep"><td colspan="6">Not detectors (best IoU ≤ '
                        f'{html.escape(text(page.params.get("iou_threshold")))})</td></tr>')
            shown_sep = True
        k = int(row.unit)
        cat = text(row.category)
        swatch = (f'<span class="swatch" style="background:{colors.get(cat, "#888")}"></span>'
                  if cat != "—" else "")
        strip = page.strips.get(k)
        img = ""
        if strip:
            src, w, h, title = strip
            img = (f'<img src="{html.escape(src)}" width="{w}" height="{h}" '
                   f'alt="top {top_n} images of unit {k}" title="{html.escape(title)}">')
        cls = "detector" if det else "other"
        rows.append(
            f'<tr class="unit {cls}" data-unit="{k}" data-detector="{int(det)}">'
            f'<td class="unit num">{k}</td>'
            f'<td class="concept">{html.escape(text(row.concept))}</td>'
            f"<td>{swatch}{html.escape(cat)}</td>"
            f'<td class="num">{fmt(row.iou)}</td>'
            f'<td class="num">{fmt(row.threshold, ".4g")}</td>'
            f'<td class="strip">{img}</td></tr>'
        )
    note = f'<p class="note">{html.escape(page.note)}</p>' if page.note else ""
    body = f"""<nav>{' '.join(nav)}</nav>
<h1>{html.escape(page.model)} · {html.escape(page.layer)}</h1>
<div class="params">{params_line(page.params)}</div>
{stat_boxes(s, page.params.get("iou_threshold"))}
{bar_chart(s["per_category"], colors, "Unique detectors per category")}
{note}
<h2>Units <small style="font-weight:400;color:#656d76">— detectors first, by IoU; each strip:
the top {top_n} images by maximum activation, dimmed outside the unit's mask</small></h2>
<table id="units">
<colgroup><col style="width:60px"><col style="width:140px"><col style="width:115px">
<col style="width:72px"><col style="width:104px"><col></colgroup>
<thead><tr><th class="num">unit</th><th>concept</th><th>category</th><th class="num">IoU</th>
<th class="num">threshold</th><th>top images</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<footer>Network Dissection report · generated {now()}</footer>"""
    return page_html(f"{page.model} {page.layer} — Network Dissection", body)


def index_page(pages: list[Page], colors: dict[str, str], rotated: int, workdir: Path) -> str:
    rows = []
    for page in pages:
        s = page.stats()
        per_cat = ", ".join(f"{c} {v}" for c, v in s["per_category"].items() if v)
        rows.append(
            f'<tr class="layer" data-model="{html.escape(page.model)}" '
            f'data-layer="{html.escape(page.layer)}">'
            f"<td>{html.escape(page.model)}</td>"
            f'<td><a href="{html.escape(page.href)}">{html.escape(page.layer)}</a></td>'
            f"<td>{html.escape(text(page.params.get('concept_set')))}</td>"
            f'<td class="num">{s["units"]}</td><td class="num">{s["detectors"]}</td>'
            f'<td class="num">{s["unique"]}</td><td>{html.escape(per_cat) or "—"}</td>'
            f'<td style="font-size:12px;color:#656d76">{params_line(page.params)}</td></tr>'
        )
    note = ""
    if rotated:
        note = (f'<p class="note">{rotated} rows of the axis-alignment experiment (transform '
                "rotate(…)) are not shown here; see notebooks/analysis.ipynb.</p>")
    body = f"""<h1>Network Dissection report</h1>
<div class="params">workdir <code>{html.escape(str(workdir))}</code></div>
{stacked_chart(pages, colors)}
{note}
<h2>Layers</h2>
<table id="layers">
<thead><tr><th>model</th><th>layer</th><th>concept set</th><th class="num">units</th>
<th class="num">detectors</th><th class="num">unique</th><th>unique per category</th>
<th>parameters</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<footer>Network Dissection report · generated {now()}</footer>"""
    return page_html("Network Dissection report", body)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------- entry point
def build_report(cfg: ReportConfig, scheduler: Any = None) -> Path:
    """Write ``<workdir>/report/`` (index, one page per layer, image strips); return the path
    of ``index.html``.  ``scheduler=None`` runs the top-image reduction in-process."""
    if cfg.top_n <= 0:
        raise UserError(f"report.top_n={cfg.top_n}: must be positive")
    workdir = Path(cfg.workdir).expanduser().resolve()
    cfg = ReportConfig(workdir, Path(cfg.dataset_root).expanduser().resolve(), cfg.top_n,
                       cfg.progress, cfg.concept_set, cfg.thumb_size)
    frame, rotated = read_units(cfg)
    pages = layer_order(plan_pages(frame), workdir)
    all_categories: list[str] = []
    for p in pages:
        all_categories += [c for c in p.categories if c not in all_categories]
    colors = category_colors(all_categories)

    final = cfg.report_dir
    tmp = workdir / f".report.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        render_strips(pages, cfg, tmp, scheduler)
        by_model: dict[str, list[Page]] = {}
        for p in pages:
            by_model.setdefault(p.model, []).append(p)
        for p in pages:
            target = tmp / p.href
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(layer_page(p, by_model[p.model], colors, cfg.top_n),
                              encoding="utf-8")
        (tmp / "index.html").write_text(index_page(pages, colors, rotated, workdir),
                                        encoding="utf-8")
        swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    index = final / "index.html"
    log.info("report: %d layer page(s) -> %s", len(pages), index)
    return index


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``tmp`` directory (two renames on one filesystem)."""
    old = None
    if final.exists():
        old = final.parent / f".report.old-{uuid.uuid4().hex}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
