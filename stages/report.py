"""Stage ``report``: a static HTML report of the dissection results.

From the ``units`` rows it is given (and, per page, the top images of each unit), it writes:

- ``index.html``: the dataset summary, one row per page with units, detectors and unique
  concepts, and a stacked bar chart of unique detectors per category (the paper's main figure);
- ``concepts.html``: the concept index — for each concept, the units of every layer that
  detect it, with their IoU, linked to their rows;
- ``<model-id>/<layer>[~<variant>].html``: a header with the counts and the parameters that
  produced them, a bar chart of unique detectors per category, and every unit (detectors
  first, the rest greyed; sortable by any column and filterable) with its best concept,
  category, IoU, threshold and a strip of its top-N images with the unit's mask (the image
  dimmed outside the mask, the mask outlined), each image linked to its file;
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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import pandas as pd
from tqdm.auto import tqdm

from stages.network.perturb import Perturbation
from stages.pages.contexts import category_colors, concepts_context, index_context, layer_context
from stages.pages.model import Page, attach_intervals, ordered, plan_pages
from stages.pages.strips import ImageCache, render_tile, strip_image
from storage.artifacts import atomic_dir
from storage.broden_images import dataset_file
from storage.errors import UserError

if TYPE_CHECKING:  # torch loads when strips are drawn, not when a report is planned
    from stages.thresholds.top_images import TopImages

log = logging.getLogger("netdissect")

STRIP_GAP = 3  # white pixels between the tiles of a strip
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
    datasets: tuple[dict, ...] = ()  # the index's dataset summary: name, images, sizes, labels


@dataclass(frozen=True)
class PageImages:
    """Where one page's strips come from: the units' top images and the dataset's images;
    ``note`` says why a page has no strips."""

    top: TopImages | None = None
    images_dir: Path | None = None
    image_paths: tuple[str, ...] = ()
    note: str = ""
    perturbation: Perturbation | None = None  # what the model saw: shown as it saw it


# ---------------------------------------------------------------- strips
def render_strips(pages: list[Page], images: Callable[[Page], PageImages], out: Path,
                  cfg: ReportConfig) -> None:
    """One strip per unit and page: its top images with the unit's mask."""
    from stages.tally.torch_masks import unit_mask

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
            tiles, areas, x = [], [], 0
            for j in range(min(cfg.top_n, top.index.shape[1])):
                image = load(int(top.index[k, j]))
                mask = unit_mask(top.maps[k, j], float(row.threshold), image.shape[:2])
                tiles.append(render_tile(image, mask, cfg.thumb_size))
                image_row = int(top.index[k, j])
                target = dataset_file(source.images_dir, source.image_paths[image_row])
                areas.append({"coords": f"{x},0,{x + tiles[-1].shape[1]},{tiles[-1].shape[0]}",
                              "href": os.path.relpath(target, (out / page.href).parent),
                              "title": f"{source.image_paths[image_row]} (max {top.value[k, j]:.3g})"})
                x += tiles[-1].shape[1] + STRIP_GAP
            strip = strip_image(tiles, STRIP_GAP)
            name = f"unit_{k:04d}.jpg"
            strip.save(strip_dir / name, quality=88, subsampling=0)
            title = "; ".join(f"{source.image_paths[int(i)]} (max {v:.3g})"
                              for i, v in zip(top.index[k][: len(tiles)], top.value[k], strict=False))
            page.strips[k] = {"src": f"{Path(page.strips_dir).name}/{name}", "areas": areas,
                              "width": strip.width, "height": strip.height, "title": title}


def build_report(cfg: ReportConfig, units: pd.DataFrame, images: Callable[[Page], PageImages],
                 layer_order: Callable[[Page], int] = lambda page: 0,
                 layers: pd.DataFrame | None = None) -> Path:
    """Write the report for ``units`` (the rows of the units table to show) into
    ``cfg.report_dir``; ``images`` gives each page its top images; ``layer_order`` ranks a
    page's layer within its model; ``layers`` rows give the charts their intervals.  Returns
    the path of ``index.html``."""
    if units.empty:
        raise UserError("report: no units rows to report on; run stage=iou first")
    pages = ordered(plan_pages(units), layer_order)
    attach_intervals(pages, pd.DataFrame() if layers is None else layers)
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
        (tmp / "index.html").write_text(TEMPLATES.get_template("index.html.j2").render(
            index_context(pages, colors, cfg.title_note, cfg.datasets)), encoding="utf-8")
        (tmp / "concepts.html").write_text(TEMPLATES.get_template("concepts.html.j2").render(
            concepts_context(pages, colors)), encoding="utf-8")
    index = cfg.report_dir / "index.html"
    log.info("report: %d layer page(s) -> %s", len(pages), index)
    return index
