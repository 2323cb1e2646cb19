"""stages/report.py: HTML structure, the top-N block reduction, masks, atomic writes, and the
pages in a real headless browser (Debian chromium; skipped with a reason when absent)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import stages.report as report_mod
from pipeline.run import compose_config, run
from stages.engine.blocks import LayerBlocks
from stages.engine.reduction import reduce_with_dask
from stages.pages.strips import OUTLINE, render_tile
from stages.tally.torch_masks import unit_mask
from stages.thresholds.top_images import top_images
from storage.activations import ActivationStore, create_store, mark_complete, write_block
from storage.errors import UserError
from tests.passes import top_images_pass
from tests.test_notebook import tiny_workdir

TOP_N = 5
THUMB = 64


# ---------------------------------------------------------------- fixtures and helpers
def report(workdir: Path, *extra: str) -> Path:
    """``stage=report`` through the pipeline; returns the path of index.html."""
    run(compose_config([f"workdir={workdir}", "stage=report", "cluster=none", "progress=false",
                        f"report.top_n={TOP_N}", f"report.thumb_size={THUMB}", *extra]))
    return workdir / "report" / "index.html"


def store_of(workdir: Path) -> Path:
    """The tiny run's activation store (demo model on its synthetic dataset)."""
    (path,) = (workdir / "activations").glob("synthetic-*/demo-*.zarr")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, index.html) of the report of the shared tiny run."""
    wd = tiny_workdir(tmp_path_factory)
    return wd, report(wd)


@pytest.fixture(scope="module")
def units(built) -> pd.DataFrame:
    frame = pd.read_parquet(built[0] / "results" / "units")
    frame[["model", "layer"]] = frame[["model", "layer"]].astype(str)
    return frame


@pytest.fixture(scope="module")
def model_id(units) -> str:
    (mid,) = units["model_id"].unique()
    return str(mid)


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, path: Path):
        super().__init__()
        self.links: list[str] = []
        self.rows: list[dict] = []  # unit rows: attrs, cells text, img attrs
        self.stats: dict[str, str] = {}
        self.bars: list[dict] = []
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self._stat: str | None = None
        self._in_b = False
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.links.append(a["href"])
        elif tag == "tr" and "unit" in a.get("class", "").split():
            self._row = {"attrs": a, "cells": [], "imgs": []}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img" and self._row is not None:
            self._row["imgs"].append(a)
        elif tag == "div" and a.get("class") == "stat":
            self._stat = a["id"]
        elif tag == "b" and self._stat:
            self._in_b = True
        elif tag == "rect" and "bar" in a.get("class", "").split():
            self.bars.append(a)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "b":
            self._in_b = False
        elif tag == "div":
            self._stat = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_b and self._stat:
            self.stats[self._stat] = self.stats.get(self._stat, "") + data


def make_store(path: Path, acts: np.ndarray, block_size: int) -> Path:
    """An activation store holding ``acts`` (N, K, h, w) as layer 'L', chunked by blocks."""
    n = acts.shape[0]
    create_store(path, [f"img{i}.png" for i in range(n)], {"L": acts.shape[1:]}, block_size,
                 "float32", {"model": "test"})
    for b, start in enumerate(range(0, n, block_size)):
        write_block(path, b, start, {"L": acts[start : start + block_size]})
    mark_complete(path)
    return path


def brute_force_top(acts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, argsort of per-image maxima, descending, ties to the lower image index."""
    maxima = acts.astype(np.float32).max(axis=(2, 3)).T  # (K, N)
    order = np.argsort(-maxima, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(maxima, order, axis=1)


def check_top(store: Path, acts: np.ndarray, n: int, scheduler=None) -> None:
    if scheduler is None:
        top = top_images(store, "L", n)
    else:
        reduction = top_images_pass(LayerBlocks(str(store), "L"), n)
        blocks = list(range(ActivationStore(store).n_blocks()))
        (top,) = reduce_with_dask(reduction, blocks, scheduler, split_every=2, progress=False)
    index, value = brute_force_top(acts, n)
    np.testing.assert_array_equal(top.index, index)
    np.testing.assert_array_equal(top.value, value)
    k = np.arange(acts.shape[1])[:, None]
    np.testing.assert_array_equal(top.maps, acts[index, k])


# ---------------------------------------------------------------- HTML structure
def test_index_links_every_layer(built, units):
    wd, index = built
    assert index == wd / "report" / "index.html"
    page = Page(index)
    expected = {f"{m}/{lay}.html" for m, lay in units[["model_id", "layer"]].drop_duplicates()
                .itertuples(index=False)}
    assert expected <= set(page.links)
    for href in page.links:
        assert (index.parent / href).is_file(), href
    # the stacked chart has a bar per (layer, category) with unique detectors
    det = units[units["is_detector"]]
    assert len(page.bars) == det.groupby(["model", "layer", "category"]).ngroups


@pytest.mark.parametrize("layer", ["block3", "block4"])
def test_layer_page_lists_every_unit_detectors_first(built, units, model_id, layer):
    wd, index = built
    path = index.parent / model_id / f"{layer}.html"
    page = Page(path)
    table = units[(units["model"] == "demo") & (units["layer"] == layer)].set_index("unit")
    assert sorted(int(r["attrs"]["data-unit"]) for r in page.rows) == sorted(table.index)
    flags = [int(r["attrs"]["data-detector"]) for r in page.rows]
    assert flags == sorted(flags, reverse=True), "detectors first"
    assert 0 < sum(flags) < len(flags)
    for row in page.rows:
        unit = table.loc[int(row["attrs"]["data-unit"])]
        assert bool(int(row["attrs"]["data-detector"])) == bool(unit["is_detector"])
        assert ("detector" if unit["is_detector"] else "other") in row["attrs"]["class"]
        number, concept, category, iou, threshold, _ = row["cells"]
        assert (number, unescape(concept), category) == (
            str(row["attrs"]["data-unit"]), unit["concept"], unit["category"])
        assert float(iou) == pytest.approx(unit["iou"], abs=5e-5)
        assert float(threshold) == pytest.approx(unit["threshold"], rel=1e-3)
        (img,) = row["imgs"]
        strip = path.parent / img["src"]
        assert strip.is_file() and img["src"].startswith(f"{layer}/")
        with Image.open(strip) as im:
            assert im.size == (int(img["width"]), int(img["height"]))
            assert im.size == (TOP_N * THUMB + 3 * (TOP_N - 1), THUMB)
    ious = [float(r["cells"][3]) for r in page.rows if r["attrs"]["data-detector"] == "1"]
    assert ious == sorted(ious, reverse=True)
    det = table[table["is_detector"]]
    assert page.stats == {"n-units": str(len(table)), "n-detectors": str(len(det)),
                          "n-unique": str(det["label"].nunique())}
    bars = {b["data-category"]: int(b["data-value"]) for b in page.bars}
    assert bars == {c: int(det.loc[det["category"] == c, "label"].nunique())
                    for c in table["categories"].iloc[0].split(",")}


def test_strips_show_the_top_images_with_their_masks(built, units, model_id):
    """First tile of a detector's strip = its top image by max activation, masked at T_k."""
    wd, index = built
    store = ActivationStore(store_of(wd))
    acts = store.array("block4")[:]
    row = units[(units["layer"] == "block4") & units["is_detector"]].sort_values("iou").iloc[-1]
    k = int(row["unit"])
    order, _ = brute_force_top(acts, TOP_N)
    with Image.open(index.parent / model_id / "block4" / f"unit_{k:04d}.jpg") as im:
        strip = np.asarray(im.convert("RGB")).astype(int)
    root = Path(store.attrs["dataset_root"]) / "images"
    paths = store.image_paths()
    for j in (0, TOP_N - 1):
        with Image.open(root / paths[order[k, j]]) as im:
            image = np.asarray(im.convert("RGB"))
        up = F.interpolate(torch.from_numpy(acts[order[k, j], k])[None, None], size=image.shape[:2],
                           mode="bilinear", align_corners=False)[0, 0]
        mask = (up > torch.tensor(row["threshold"], dtype=torch.float32)).numpy()
        np.testing.assert_array_equal(mask, unit_mask(acts[order[k, j], k], row["threshold"],
                                                      image.shape[:2]))
        expected = render_tile(image, mask, THUMB).astype(int)
        tile = strip[:, j * (THUMB + 3) : j * (THUMB + 3) + THUMB]
        assert np.abs(tile - expected).mean() < 6  # JPEG noise only


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
def test_outline_pixels_are_the_counted_mask_where_t_rounds_up(kernel):
    """T is no float32, and rounding it to the nearest float32 gives exactly the value of a
    plateau of upsampled pixels: those pixels exceed T, so they are in the counted mask,
    and the report's mask (what it outlines) has them too."""
    from stages.tally.classes import pixel_classes
    from stages.tally.labels import BlockLabels
    from stages.tally.reference import reference_mask
    from stages.tally.statistic import mask_classes

    plateau = np.float32(1.0)
    threshold = 1.0 - 2.0**-30  # between the float32 below 1.0 and 1.0 itself
    assert float(np.float32(threshold)) == float(plateau) and threshold < float(plateau)
    act = np.full((7, 7), np.float32(0.25), dtype=np.float32)
    act[1:5, 2:6] = plateau  # a plateau: its inner upsampled values are exactly 1.0
    size = (56, 56)
    outline = unit_mask(act, threshold, size)
    counted = reference_mask(act, threshold, size)
    assert (outline == counted).all()
    flat = F.interpolate(torch.from_numpy(act)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    assert (flat[counted] == plateau).sum() > 100  # the case the test is about
    # the tally's producers count exactly those pixels (one pixel class per pixel)
    labels = BlockLabels(np.arange(1, 56 * 56 + 1, dtype=np.int32)[None, None], np.zeros((1, 1),
                                                                                          np.int32))
    classes = pixel_classes(labels, np.arange(56 * 56 + 1))
    found = mask_classes(torch.from_numpy(act)[None, None], np.array([threshold]), classes,
                         size, kernel)
    assert sorted(found.klass.tolist()) == np.flatnonzero(outline.ravel()).tolist()
    assert (found.pixels == 1).all()


def test_render_tile_dims_outside_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 255, size=(40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    tile = render_tile(image, mask, 40)
    assert tile.shape == (40, 40, 3)
    np.testing.assert_array_equal(tile[12:28, 12:28], image[12:28, 12:28])  # inside: untouched
    assert (tile[:8, :8] < image[:8, :8]).all()  # outside: dimmed
    assert (tile[10, 15] == OUTLINE).all()  # edge: outlined


# ---------------------------------------------------------------- top-N reduction
@pytest.mark.parametrize("block_size", [1, 5, 16, 48])
def test_top_images_equal_brute_force_on_real_activations(built, tmp_path, block_size):
    wd, _ = built
    acts = ActivationStore(store_of(wd)).array("block3")[:]
    store = make_store(tmp_path / f"b{block_size}.zarr", acts, block_size)
    check_top(store, acts, TOP_N)
    check_top(store, acts, TOP_N, scheduler="sync")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_images=st.integers(1, 13),
    units=st.integers(1, 4),
    block_size=st.integers(1, 14),
    top_n=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    scheduler=st.sampled_from([None, "sync"]),
)
def test_top_images_ties_and_any_blocking(n_images, units, block_size, top_n, seed, scheduler):
    """Values from a 3-value set force ties; the lower image index must win them."""
    rng = np.random.default_rng(seed)
    acts = rng.choice(np.float32([-1.0, 0.0, 2.5]), size=(n_images, units, 2, 3))
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s.zarr", acts, block_size)
        check_top(store, acts, top_n, scheduler)


# ---------------------------------------------------------------- errors and atomicity
def test_missing_units_table_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run stage=iou first"):
        report(tmp_path)


def test_unknown_concept_set_is_a_user_error(built):
    wd, _ = built
    with pytest.raises(UserError, match="concept_set='nope'.*synthetic"):
        report(wd, "report.concept_set=nope")


def _copy(src: Path, dest: Path, parts=("results", "activations")) -> Path:
    for part in parts:
        shutil.copytree(src / part, dest / part)
    for manifest in src.glob(".*.artifact.json"):
        shutil.copy(manifest, dest)
    return dest


def test_rebuild_is_atomic_and_skipped_when_current(built, tmp_path, monkeypatch):
    """A crash keeps the old report whole; a rebuild replaces it and leaves no temp dirs; a
    current report is not rewritten."""
    wd = _copy(built[0], tmp_path / "wd")
    index = report(wd, "report.top_n=2")
    before = index.read_text()
    (index.parent / "stale.txt").write_text("x")
    mtimes = {p: p.stat().st_mtime_ns for p in index.parent.rglob("*")}
    assert report(wd, "report.top_n=2") == index  # current: skipped
    assert {p: p.stat().st_mtime_ns for p in index.parent.rglob("*")} == mtimes

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "index_context", crash)
    with pytest.raises(RuntimeError):
        report(wd, "report.top_n=3")
    assert index.read_text() == before and (index.parent / "stale.txt").exists()
    monkeypatch.undo()
    assert report(wd, "report.top_n=3") == index
    assert not (index.parent / "stale.txt").exists()
    visible = sorted(p.name for p in wd.iterdir() if not p.name.startswith("."))
    assert visible == ["activations", "report", "results", "thresholds"]
    assert not [p for p in wd.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_pages_without_cache_or_images_have_no_strips(built, model_id, tmp_path):
    only_tables = _copy(built[0], tmp_path / "tables", parts=("results",))
    page = report(only_tables).parent / model_id / "block3.html"
    assert "No image strips: no activation cache" in page.read_text()
    assert not any(r["imgs"] for r in Page(page).rows)
    moved = _copy(built[0], tmp_path / "moved")
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "index.csv").write_text("image,split,ih,iw,sh,sw\n")
    import zarr

    zarr.open_group(str(store_of(moved)), mode="r+", use_consolidated=False).attrs[
        "dataset_root"] = str(other)
    page = report(moved).parent / model_id / "block3.html"
    assert f"no longer at {other}" in page.read_text()
    assert not any(r["imgs"] for r in Page(page).rows)


# ---------------------------------------------------------------- real browser
CHECK_JS = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bars = Array.from(document.querySelectorAll('svg rect.bar')).map(r => {
    const b = r.getBBox(); return {value: +r.dataset.value, w: b.width, h: b.height};
  });
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    bars: bars,
    svgs: document.querySelectorAll('svg').length,
    rows: document.querySelectorAll('tr.unit').length,
    scripts: document.scripts.length,
    text: document.body.innerText,
  });
  document.body.appendChild(out);
});
</script>"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served(directory: Path):
    """A static HTTP server on 127.0.0.1 for ``directory``; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def browser_check(chromium: str, url: str, profile: Path) -> dict:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.find('<pre id="check">')
    assert start >= 0, f"the check script did not run on {url}: {proc.stdout[-500:]}"
    end = proc.stdout.find("</pre>", start)
    return json.loads(unescape(proc.stdout[start + len('<pre id="check">') : end]))


def test_pages_render_in_a_real_browser(built, units, model_id, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (.ci/run installs Debian's chromium package)")
    wd, index = built
    site = tmp_path / "site"
    shutil.copytree(index.parent, site)
    pages = {"index.html": None, f"{model_id}/block3.html": "block3",
             f"{model_id}/block4.html": "block4"}
    for rel in pages:
        path = site / rel
        path.with_suffix(".check.html").write_text(
            path.read_text(encoding="utf-8").replace("</body>", CHECK_JS + "</body>"),
            encoding="utf-8")
    with served(site) as base:
        for rel, layer in pages.items():
            url = base + rel.replace(".html", ".check.html")
            result = browser_check(chromium, url, tmp_path / "profile")
            assert result["broken"] == [], result["broken"][:3]
            assert result["svgs"] == 1
            nonzero = [b for b in result["bars"] if b["value"] > 0]
            assert nonzero and all(b["w"] > 0 and b["h"] > 0 for b in nonzero), result["bars"]
            if layer is not None:
                n_units = int(((units["layer"] == layer) & (units["model"] == "demo")).sum())
                assert result["rows"] == result["images"] == n_units


def test_label_names_and_paths_are_escaped_in_the_report(tmp_path):
    """A label named <script>alert(1)</script> is shown as text: in the HTML (autoescaped
    templates) and, where chromium exists, in a real browser (no script of its own runs)."""
    from tests.broden_factory import BrodenBuilder, save_rgb

    hostile = "<script>alert(1)</script>"
    odd = 'x"&<b>'  # in every image path: shown in the strips' titles
    b = BrodenBuilder(tmp_path / "data", ["object"], ih=32, iw=32, sh=16, sw=16)
    b.label(1, hostile, object=0.5)
    for i in range(8):
        plane = np.zeros((16, 16), dtype=np.int64)
        plane[2 + i : 9 + i, 3:12] = 1
        b.image(name=f"img/{i}{odd}.png", planes={"object": [plane]})
    root = b.write()
    for i in range(8):
        save_rgb(root / "images" / f"img/{i}{odd}.png", 32, 32, seed=i)
    wd = tmp_path / "wd"
    run(compose_config([f"workdir={wd}", f"dataset.path={root}", "stage=all", "cluster=none",
                        "progress=false", "model=custom", "model.weights=none",
                        "model.factory=tests.tiny_models:tiny_cnn", "model.layers=[conv1]",
                        "scoring.quantile=0.2"]))
    pages = list((wd / "report").rglob("*.html"))
    html = "".join(p.read_text() for p in pages)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x&#34;&amp;&lt;b&gt;.png" in html  # the image paths in the strips' titles
    assert "<script>alert" not in html and odd not in html
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (.ci/run installs Debian's chromium package)")
    (page,) = [p for p in pages if p.name == "conv1.html"]
    page.with_suffix(".check.html").write_text(page.read_text().replace("</body>",
                                                                        CHECK_JS + "</body>"))
    with served(wd / "report") as base:
        url = base + str(page.relative_to(wd / "report").with_suffix(".check.html"))
        result = browser_check(chromium, url, tmp_path / "profile")
    assert result["scripts"] == 2  # the report's own and the check script: the label's never ran
    assert hostile in result["text"]


# ---------------------------------------------------------------- exploring, in a real browser
EXPLORE_JS = """<script>
window.addEventListener('load', () => {
  const out = {clipped: []};
  document.querySelectorAll('svg').forEach(svg => {
    const width = svg.viewBox.baseVal.width;
    svg.querySelectorAll('text').forEach(t => {
      const b = t.getBBox();
      if (b.x < 0 || b.x + b.width > width + 0.5) out.clipped.push(t.textContent);
    });
  });
  const rows = id => Array.from(document.getElementById(id).tBodies[0].rows);
  const shown = id => rows(id).filter(r => !r.hidden && !r.classList.contains('sep'));
  const type = (id, words) => {
    const input = document.querySelector(`[data-filter="${id}"]`);
    input.value = words; input.dispatchEvent(new Event('input'));
  };
  if (document.getElementById('units')) {
    const iou = document.getElementById('units').tHead.rows[0].cells[3];
    iou.click();
    out.ascending = rows('units').map(r => +r.cells[3].dataset.sort);
    iou.click();
    out.descending = rows('units').map(r => +r.cells[3].dataset.sort);
    type('units', WORD);
    out.filtered = shown('units').map(r => r.dataset.search);
    out.count = +document.querySelector('[data-count="units"]').textContent;
    type('units', '');
    const only = document.querySelector('[data-detectors-only="units"]');
    only.checked = true; only.dispatchEvent(new Event('change'));
    out.detectors = shown('units').map(r => r.dataset.detector);
  }
  if (document.getElementById('concepts')) {
    out.concepts = rows('concepts').map(r => ({concept: r.dataset.concept,
      links: Array.from(r.querySelectorAll('a')).map(a => a.getAttribute('href'))}));
    type('concepts', WORD);
    out.concepts_filtered = shown('concepts').map(r => r.dataset.concept);
  }
  const pre = document.createElement('pre');
  pre.id = 'check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_the_report_sorts_filters_indexes_concepts_and_clips_no_label(built, units, model_id,
                                                                      tmp_path):
    """Clicking a column sorts the units, typing filters them, "detectors only" keeps the
    detectors, the concept index links every detector to its unit's row, and no chart
    label is cut off - checked on the pages as a browser lays them out."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (.ci/run installs Debian's chromium package)")
    wd, index = built
    site = tmp_path / "site"
    shutil.copytree(index.parent, site)
    layer3 = units[(units["layer"] == "block3")]
    word = str(layer3.loc[layer3["is_detector"], "concept"].value_counts().index[0])
    pages = ["index.html", "concepts.html", f"{model_id}/block3.html", f"{model_id}/block4.html"]
    for rel in pages:
        path = site / rel
        script = EXPLORE_JS.replace("WORD", json.dumps(word))
        path.with_suffix(".check.html").write_text(
            path.read_text(encoding="utf-8").replace("</body>", script + "</body>"),
            encoding="utf-8")
    with served(site) as base:
        found = {rel: browser_check(chromium, base + rel.replace(".html", ".check.html"),
                                    tmp_path / "profile") for rel in pages}
    for rel, result in found.items():
        assert result["clipped"] == [], (rel, result["clipped"])
    layer = found[f"{model_id}/block3.html"]
    assert layer["ascending"] == sorted(layer["ascending"]) and len(layer["ascending"]) == 128
    assert layer["descending"] == sorted(layer["descending"], reverse=True)
    assert layer["filtered"] and all(word.lower() in s.lower() for s in layer["filtered"])
    assert layer["count"] == len(layer["filtered"])
    assert layer["detectors"] == ["1"] * int(layer3["is_detector"].sum())
    concepts = found["concepts.html"]
    detected = units[units["is_detector"]]
    assert {c["concept"] for c in concepts["concepts"]} == set(detected["concept"])
    for row in concepts["concepts"]:
        assert len(row["links"]) == int((detected["concept"] == row["concept"]).sum())
        for link in row["links"]:
            href, anchor = link.split("#")
            unit = int(anchor.removeprefix("unit-"))
            page_rows = {r["attrs"]["id"]: r for r in Page(site / href).rows}
            assert unescape(page_rows[anchor]["cells"][1]) == row["concept"], link
            assert int(page_rows[anchor]["attrs"]["data-unit"]) == unit
    assert word in concepts["concepts_filtered"]


def _units_rows(layer: str, basis: str, model_id: str = "m-1", weights: str = "A.pt#11111111"
                ) -> pd.DataFrame:
    return pd.DataFrame({
        "model": "resnet18", "model_id": model_id, "weights": weights, "layer": layer,
        "perturbation": "none", "dataset": "d", "concept_set": "d", "basis": basis,
        "threshold_quantile": 0.005, "union_mode": "restricted", "planes": "set",
        "categories": "object", "iou_threshold": 0.04, "unit": [0, 1], "label": [1, 2],
        "concept": ["car", "tree"], "category": "object", "iou": [0.2, 0.01],
        "threshold": [1.5, 0.00025], "is_detector": [True, False]})


def test_pages_in_natural_order_named_by_identity_without_clipped_labels(tmp_path):
    """Layers in natural order (block2 before block10), alpha numerically, two checkpoints
    of one file name told apart, and long labels not cut off (in a browser, when there)."""
    from stages.report import PageImages, ReportConfig, build_report

    frame = pd.concat([
        _units_rows(layer, basis) for layer in ("block10", "block2")
        for basis in ("none", "rotate(alpha=1,seed=0)", "rotate(alpha=0.5,seed=0)",
                      "rotate(alpha=0,seed=0)")] + [
        _units_rows("block2", "none", "m-2", "A.pt#22222222")], ignore_index=True)
    index = build_report(ReportConfig(tmp_path / "report", progress=False), frame,
                         lambda page: PageImages(note="no strips here"))
    html = index.read_text()
    labels = re.findall(r'<tr class="layer"[^>]*><td[^>]*>([^<]*)</td><td><a href="([^"]+)"', html)
    hrefs = [h for _, h in labels]
    assert [name for name, _ in labels].count("resnet18 [A.pt#11111111]") == 8
    assert "resnet18 [A.pt#22222222]" in {name for name, _ in labels}
    first = [h for h in hrefs if h.startswith("m-1/")]
    assert first[:4] == ["m-1/block2.html"] + [f"m-1/block2~basis_rotate_alpha_{a}_seed_0.html"
                                                for a in ("0", "0.5", "1")], first
    assert first[4].startswith("m-1/block10")
    layer_page = (tmp_path / "report" / "m-1" / "block2.html").read_text()
    assert ">1.5000000<" in layer_page and ">0.0002500<" in layer_page  # one precision a column
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (.ci/run installs Debian's chromium package)")
    index.with_suffix(".check.html").write_text(
        html.replace("</body>", EXPLORE_JS.replace("WORD", '"car"') + "</body>"))
    with served(index.parent) as base:
        result = browser_check(chromium, base + "index.check.html", tmp_path / "profile")
    assert result["clipped"] == []


def test_stage_iou_says_when_the_report_is_older_than_the_tables(synthetic_root, tmp_path,
                                                                 capsys):
    base = [f"workdir={tmp_path / 'wd'}", f"dataset.path={synthetic_root}", "cluster=none",
            "progress=false", "model=custom", "model.factory=tests.tiny_models:tiny_cnn",
            "model.weights=none", "model.layers=[conv3]", "scoring.quantile=0.05"]
    run(compose_config([*base, "stage=all"]))
    run(compose_config([*base, "stage=iou"]))  # nothing new: the report is current
    assert "older than the tables" not in capsys.readouterr().out
    run(compose_config([*base, "stage=iou", "scoring.union=lite"]))  # new rows
    out = capsys.readouterr().out
    assert "is older than the tables; refresh it with stage=report" in out
    run(compose_config([f"workdir={tmp_path / 'wd'}", "cluster=none", "progress=false",
                        "stage=report"]))
    run(compose_config([*base, "stage=iou", "scoring.union=lite"]))
    assert "older than the tables" not in capsys.readouterr().out
