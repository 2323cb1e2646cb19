"""The IoU tally (stages/iou.py, the tally kernels) against a plain reference.

A tiny Broden-format directory and activation store are written here, through the real
stores (concept store builder, activation store writer), and every count the pipeline
produces is compared with ``tests/iou_reference.py``: a loop per image and per unit that
upsamples one map with ``F.interpolate`` (no skip rule), thresholds strictly and counts
labels exactly as SEMANTICS.md §3–5 word it, in every union × planes combination.

Corners built into the data (image numbers in brackets):
- the same label in two part planes at one pixel [0]; a label in a colour plane and an
  object plane at the same pixels [8];
- image-level labels: one [1], two [0, 6, 10] ("twins" that always come together), the same
  label twice in one cell [2];
- a label both image-level and in a pixel plane of the same image: another category's plane
  [3], and the same cell mixing a PNG and a number [4];
- a label listed in two categories: primary by coverage [glass, metal, grid], and a
  coverage tie won by the category listed later in category.csv [panel]; index.csv lists
  its columns in another order than category.csv;
- an image with no labels at all [5], images with no scene / colour / part labels, an image
  whose only object-plane label has primary category part [1];
- label numbers above 255 (G channel): door 300, woven 270;
- units: quantile thresholds (q from 0.005 to 0.5), a threshold of exactly 0 on mostly-zero
  activations, a unit with empty masks, a unit firing on whole images, border-touching masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.concepts import ConceptsConfig, build_concept_store
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Pass, reduce_in_process, reduce_with_dask
from stages.iou import iou_frame, layers_frame, units_frame
from stages.tally.labels import block_labels, label_space
from stages.tally.reference import (
    RefImage,
    reference_counts,
    reference_iou,
    reference_layers,
    reference_mask,
    reference_units,
)
from stages.tally.statistic import Tally, TallyCounts, TallyRule
from storage import activations as astore
from storage.activations import ActivationStore
from storage.broden_writer import BrodenWriter
from storage.concepts import ConceptStore
from tests.passes import count_block

N = 14  # images; block size 4 does not divide it
H, W = 4, 5  # activation maps (non-square on purpose)
SH, SW = 12, 14  # segmentation (non-square, non-integer scale)
IH, IW = 24, 28
K = 7
LAYER = "features.3"
BLOCK = 4

CATEGORY_CSV = ["color", "part", "object", "scene", "texture"]
INDEX_COLUMNS = ["scene", "object", "part", "texture", "color"]  # another order on purpose

# number -> (name, {category: coverage})
LABELS: dict[int, tuple[str, dict[str, float]]] = {
    1: ("red", {"color": 0.3}),
    2: ("blue", {"color": 0.2}),
    3: ("car", {"object": 0.4}),
    4: ("tree", {"object": 0.3}),
    5: ("wheel", {"part": 0.2}),
    6: ("window", {"part": 0.25}),
    7: ("glass", {"part": 0.3, "object": 0.1}),  # primary part: coverage beats order
    8: ("metal", {"color": 0.5, "object": 0.2}),  # color; object when color is not selected
    9: ("panel", {"part": 0.25, "object": 0.25}),  # tie -> object (later in category.csv)
    10: ("street", {"scene": 0.9}),
    11: ("forest", {"scene": 0.8}),
    12: ("striped", {"texture": 0.5}),
    13: ("dotted", {"texture": 0.5}),
    16: ("grid", {"part": 0.2, "texture": 0.1}),  # primary part, also used image-level
    17: ("unused", {"texture": 0.1}),  # listed, never present: label_area 0
    18: ("orphan", {}),  # in label.csv only: never scored
    270: ("woven", {"texture": 0.3}),
    300: ("door", {"part": 0.15}),
}

PRIMARY_ALL = {
    1: "color", 2: "color", 3: "object", 4: "object", 5: "part", 6: "part", 7: "part",
    8: "color", 9: "object", 10: "scene", 11: "scene", 12: "texture", 13: "texture",
    16: "part", 17: "texture", 270: "texture", 300: "part",
}
PRIMARY_OBJECT_PART = {
    3: "object", 4: "object", 5: "part", 6: "part", 7: "part", 8: "object", 9: "object",
    16: "part", 300: "part",
}
TWIN_IMAGES = (0, 6, 10)  # carry texture "12;13"
COMBOS = [(u, p) for u in ("restricted", "global", "lite") for p in ("set", "multiset")]


# --------------------------------------------------------------------------- data


def _rect(plane: np.ndarray, label: int, y0: int, y1: int, x0: int, x1: int) -> None:
    plane[y0:y1, x0:x1] = label


def _random_plane(rng: np.random.Generator, labels: list[int], n_rects: int) -> np.ndarray:
    plane = np.zeros((SH, SW), dtype=np.int64)
    for _ in range(n_rects):
        y0 = int(rng.integers(0, SH - 1))
        x0 = int(rng.integers(0, SW - 1))
        y1 = int(rng.integers(y0 + 1, SH + 1))
        x1 = int(rng.integers(x0 + 1, SW + 1))
        _rect(plane, int(rng.choice(labels)), y0, y1, x0, x1)
    return plane


def build_images(rng: np.random.Generator) -> list[RefImage]:
    images = []
    for i in range(N):
        img = RefImage()
        if i not in (3, 5, 9):
            img.scalars["scene"] = [10 if i % 3 else 11]
        if i not in (1, 5, 11):
            img.planes["color"] = [_random_plane(rng, [1, 2, 8], 4)]
        if i not in (1, 2, 5, 12):
            img.planes["object"] = [_random_plane(rng, [3, 4, 7, 8, 9], 3)]
        if i % 4 == 1 and i != 1 and i != 5:
            img.planes["part"] = [_random_plane(rng, [5, 6, 7, 9, 16, 300], 3)]
        if i in TWIN_IMAGES:
            img.scalars["texture"] = [12, 13]
        images.append(img)
    # [0] the same label in two part planes at the same pixels (and borders)
    p1 = np.zeros((SH, SW), dtype=np.int64)
    p2 = np.zeros((SH, SW), dtype=np.int64)
    _rect(p1, 5, 0, 6, 0, 8)
    _rect(p2, 5, 3, 9, 4, 12)
    _rect(p2, 6, 9, SH, 0, SW)
    _rect(p1, 300, 8, SH, 10, SW)
    images[0].planes["part"] = [p1, p2]
    # [1] one image-level label; the only object-plane label is glass (primary part)
    obj = np.zeros((SH, SW), dtype=np.int64)
    _rect(obj, 7, 2, 10, 3, 11)
    images[1].planes["object"] = [obj]
    images[1].scalars["texture"] = [270]
    # [2] the same image-level label twice in one cell
    images[2].scalars["texture"] = [270, 270]
    # [3] grid image-level (texture) and in a part plane of the same image; no scene
    part = np.zeros((SH, SW), dtype=np.int64)
    _rect(part, 16, 0, SH, 0, 5)
    _rect(part, 9, 4, 8, 6, SW)
    images[3].planes["part"] = [part]
    images[3].scalars["texture"] = [16]
    # [4] one texture cell mixing a PNG plane and the same label image-level
    tex = np.zeros((SH, SW), dtype=np.int64)
    _rect(tex, 270, 5, SH, 7, SW)
    images[4].planes["texture"] = [tex]
    images[4].scalars["texture"] = [270]
    # [5] no labels at all
    assert not images[5].planes and not images[5].scalars
    # [8] metal in the colour plane and the object plane at the same pixels
    col = images[8].planes["color"][0]
    obj = images[8].planes["object"][0]
    _rect(col, 8, 0, 7, 0, 9)
    _rect(obj, 8, 2, 10, 3, 12)
    return images


def write_broden(root: Path, images: list[RefImage]) -> list[str]:
    """A Broden directory for ``images``; returns the image paths in row order."""
    writer = BrodenWriter(root, CATEGORY_CSV, INDEX_COLUMNS)
    for n, (name, cov) in LABELS.items():
        writer.label(n, name, [c for c in CATEGORY_CSV if c in cov])
    rng = np.random.default_rng(7)
    paths = []
    for i, img in enumerate(images):
        image_path = f"tiny/img_{i:02d}.jpg"
        paths.append(image_path)
        entries = {}
        for cat in INDEX_COLUMNS:
            planes = [(f"tiny/img_{i:02d}_{cat}_{j}.png", plane)
                      for j, plane in enumerate(img.planes.get(cat, []))]
            numbers = list(img.scalars.get(cat, []))
            entries[cat] = numbers + planes if i % 2 else planes + numbers  # order is free
        writer.add_image(image_path, "train", (IH, IW, SH, SW), entries,
                         rng.integers(0, 256, (IH, IW, 3), dtype=np.uint8))
    writer.write_tables({c: {n: cov[c] for n, (_, cov) in LABELS.items() if c in cov}
                         for c in CATEGORY_CSV})
    return paths


def build_activations(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, H, W) float32 activations and (K,) float64 thresholds."""
    acts = np.zeros((N, K, H, W), dtype=np.float32)
    thresholds = np.zeros(K, dtype=np.float64)

    def quantile(k: int, q: float) -> float:
        return float(np.quantile(acts[:, k].astype(np.float64).ravel(), 1 - q, method="linear"))

    acts[:, 0] = rng.standard_normal((N, H, W))
    thresholds[0] = quantile(0, 0.005)  # the default: tiny masks
    acts[:, 1] = rng.standard_normal((N, H, W))
    thresholds[1] = quantile(1, 0.2)
    acts[:, 2] = np.maximum(rng.standard_normal((N, H, W)) - 1.6, 0)  # mostly zero
    thresholds[2] = quantile(2, 0.1)
    assert thresholds[2] == 0.0 and (acts[:, 2] > 0).any()
    acts[:, 3] = rng.uniform(-1, 1, (N, H, W))  # whole images with the twin textures
    acts[list(TWIN_IMAGES), 3] = rng.uniform(4, 5, (len(TWIN_IMAGES), H, W))
    thresholds[3] = 2.0
    acts[:, 4] = rng.uniform(0, 1, (N, H, W))  # border and corner cells
    acts[::2, 4, 0, :] += 2.0
    acts[1::3, 4, :, -1] += 2.5
    acts[::3, 4, -1, 0] += 3.0
    thresholds[4] = 1.7
    acts[:, 5] = rng.uniform(-2, -1, (N, H, W))  # empty masks everywhere
    thresholds[5] = 0.0
    acts[:, 6] = rng.uniform(0, 1, (N, H, W))
    thresholds[6] = quantile(6, 0.5)
    return acts, thresholds


def write_activations(path: Path, image_paths: list[str], layers: dict[str, np.ndarray],
                      block_size: int) -> None:
    shapes = {name: tuple(a.shape[1:]) for name, a in layers.items()}
    astore.create_store(path, image_paths, shapes, block_size, "float32", {"model": "test"})
    for b, start in enumerate(range(0, len(image_paths), block_size)):
        astore.write_block(path, b, start, {n: a[start : start + block_size]
                                            for n, a in layers.items()})
    astore.mark_complete(path)


@dataclass
class World:
    root: Path
    concept_path: Path
    act_path: Path
    images: list[RefImage]
    image_paths: list[str]
    acts: np.ndarray
    thresholds: np.ndarray

    @property
    def store(self) -> ConceptStore:
        return ConceptStore(self.concept_path)

    def activation_store(self, block_size: int, layers: dict[str, np.ndarray] | None = None,
                         name: str | None = None) -> Path:
        path = self.root / "acts" / (name or f"b{block_size}.zarr")
        if not path.exists():
            write_activations(path, self.image_paths, layers or {LAYER: self.acts}, block_size)
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("iou")
    rng = np.random.default_rng(2024)
    images = build_images(rng)
    paths = write_broden(root / "broden", images)
    concept_path = root / "concepts" / "tiny.zarr"
    build_concept_store(
        ConceptsConfig(root / "broden", concept_path, block_size=4, progress=False),
        scheduler=None,
    )
    acts, thresholds = build_activations(rng)
    w = World(root, concept_path, root / "acts" / "b4.zarr", images, paths, acts, thresholds)
    w.activation_store(BLOCK)
    return w


@dataclass(frozen=True)
class Scoring:
    """The counting rule and the categories a test scores with."""

    union: str = "restricted"
    planes: str = "set"
    categories: tuple[str, ...] | None = None


def tally(world: World, scoring: Scoring, act_path: Path | None = None,
          thresholds: np.ndarray | None = None, layer: str = LAYER, dask: bool = False):
    """The tally's counts (as named arrays) through the real stores and a real pass."""
    store = world.store
    space = label_space(store, scoring.categories)
    path = act_path or world.act_path
    statistic = Tally(world.thresholds if thresholds is None else thresholds, space,
                      TallyRule(scoring.union, scoring.planes))
    reduction = Pass(ScoringBlocks(LayerBlocks(str(path), layer), str(world.concept_path)),
                     [statistic])
    blocks = list(range(ActivationStore(path).n_blocks()))
    if dask:
        (counts,) = reduce_with_dask(reduction, blocks, scheduler="threads", split_every=2,
                                     progress=False)
    else:
        (counts,) = reduce_in_process(reduction, blocks)
    return counts.state_dict(), space


def reference(world: World, union: str, planes: str, primary: dict[int, str] | None = None,
              acts: np.ndarray | None = None, thresholds: np.ndarray | None = None):
    primary = PRIMARY_ALL if primary is None else primary
    selected = [c for c in CATEGORY_CSV if c in set(primary.values())]
    return reference_counts(
        world.acts if acts is None else acts,
        world.thresholds if thresholds is None else thresholds,
        world.images, selected, primary, union, planes, (SH, SW),
    ), selected


def assert_counts_equal(counts: dict, ref: dict) -> None:
    for key in ("intersection", "unit_area", "label_area"):
        assert counts[key].dtype == np.int64, key
    np.testing.assert_array_equal(counts["intersection"][:, 0], 0)
    np.testing.assert_array_equal(counts["intersection"][:, 1:], ref["intersection"])
    np.testing.assert_array_equal(counts["label_area"][1:], ref["label_area"])
    np.testing.assert_array_equal(counts["unit_area"], ref["unit_area"])


# --------------------------------------------------------------------------- the data itself


def test_data_covers_the_corners(world: World) -> None:
    """Guard the fixture: the corners the other tests rely on really are in the data."""
    m = [[reference_mask(world.acts[x, k], world.thresholds[k], (SH, SW)) for k in range(K)]
         for x in range(N)]
    areas = np.array([[mask.sum() for mask in row] for row in m])
    assert (areas[:, 5] == 0).all()  # unit 5 never fires
    assert (areas[list(TWIN_IMAGES), 3] == SH * SW).all()
    assert areas[:, 3].sum() == len(TWIN_IMAGES) * SH * SW
    for k in (0, 1, 2, 4, 6):
        assert 0 < areas[:, k].sum() < N * SH * SW, k
    # unit 4 masks touch all four image borders; unit 2 (threshold 0) fires somewhere
    border = np.any([m[x][4] for x in range(N)], axis=0)
    assert border[0].any() and border[-1].any() and border[:, 0].any() and border[:, -1].any()
    # the same label in two planes at one pixel, with a mask over it
    p1, p2 = world.images[0].planes["part"]
    assert ((p1 == 5) & (p2 == 5)).any()
    # set and multiset really differ, and the three union modes really differ
    ref = {c: reference(world, *c)[0] for c in COMBOS}
    assert not np.array_equal(ref["lite", "set"]["intersection"],
                              ref["lite", "multiset"]["intersection"])
    assert not np.array_equal(ref["lite", "set"]["label_area"],
                              ref["lite", "multiset"]["label_area"])
    ua = [ref[u, "set"]["unit_area"] for u in ("restricted", "global", "lite")]
    assert not np.array_equal(ua[0], ua[1]) and not np.array_equal(ua[0], ua[2])
    assert not np.array_equal(ua[1], ua[2])


def test_concept_store_decodes_the_planes(world: World) -> None:
    store = world.store
    assert store.categories == CATEGORY_CSV
    assert (store.sh, store.sw, store.n_images) == (SH, SW, N)
    block = store.read_block(0, N)
    for x, img in enumerate(world.images):
        got = sorted(
            (store.categories[c], plane.tobytes())
            for plane, c in zip(block.pixel_labels[x], block.plane_category[x], strict=True)
            if c >= 0
        )
        want = sorted((c, p.astype(np.int32).tobytes()) for c, ps in img.planes.items()
                      for p in ps)
        assert got == want, x
        got_s = sorted((store.categories[c], int(n)) for n, c in
                       zip(block.image_labels[x], block.image_label_category[x], strict=True)
                       if c >= 0)
        want_s = sorted((c, n) for c, ns in img.scalars.items() for n in ns)
        assert got_s == want_s, x


@pytest.mark.parametrize(("categories", "primary"),
                         [(None, PRIMARY_ALL), (("object", "part"), PRIMARY_OBJECT_PART),
                          (("part", "object"), PRIMARY_OBJECT_PART)])
def test_label_space_primary_categories(world: World, categories, primary) -> None:
    space = label_space(world.store, categories)
    assert list(space.numbers) == sorted(primary)
    assert {int(n): space.categories[p] for n, p in zip(space.numbers, space.primary,
                                                        strict=True)} == primary
    assert list(space.categories) == [c for c in CATEGORY_CSV if c in set(primary.values())]
    assert list(space.names) == [LABELS[n][0] for n in sorted(primary)]


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(("union", "planes"), COMBOS)
def test_tally_matches_reference(world: World, union: str, planes: str) -> None:
    counts, space = tally(world, Scoring(union=union, planes=planes))
    ref, _ = reference(world, union, planes)
    assert_counts_equal(counts, ref)
    assert int(counts["images"]) == N


@pytest.mark.parametrize(("union", "planes"), COMBOS)
def test_iou_frame_matches_reference(world: World, union: str, planes: str) -> None:
    counts, space = tally(world, Scoring(union=union, planes=planes))
    ref, selected = reference(world, union, planes)
    rows = reference_iou(ref, sorted(PRIMARY_ALL), selected, PRIMARY_ALL)
    frame = iou_frame(TallyCounts.from_state_dict(counts), space, {"layer": LAYER, "union_mode": union})
    assert len(frame) == len(rows) == K * len(PRIMARY_ALL)
    assert (frame["layer"] == LAYER).all() and (frame["union_mode"] == union).all()
    want = pd.DataFrame(rows)
    for col in ("unit", "label", "category", "intersection", "label_area", "unit_area",
                "union_area"):
        assert frame[col].tolist() == want[col].tolist(), col
    assert frame["concept"].tolist() == [LABELS[n][0] for n in want["label"]]
    np.testing.assert_allclose(frame["iou"].to_numpy(), want["iou"].to_numpy(), rtol=0,
                               atol=1e-12)
    assert (frame["union_area"] >= 0).all()


@pytest.mark.parametrize(("union", "planes"), COMBOS)
@pytest.mark.parametrize("categories", [("object", "part"), ("part", "object")])
def test_category_subset_matches_reference(world: World, union, planes, categories) -> None:
    scoring = Scoring(union=union, planes=planes, categories=categories)
    counts, space = tally(world, scoring)
    assert space.categories == ("part", "object")  # category.csv order, whatever was asked
    ref, _ = reference(world, union, planes, PRIMARY_OBJECT_PART)
    assert_counts_equal(counts, ref)


@pytest.mark.parametrize(("union", "planes"), [("restricted", "set"), ("lite", "multiset")])
def test_dask_threads_and_other_block_size(world: World, union: str, planes: str) -> None:
    scoring = Scoring(union=union, planes=planes)
    ref, _ = reference(world, union, planes)
    counts, _ = tally(world, scoring, dask=True)
    assert_counts_equal(counts, ref)
    other = world.activation_store(3)  # chunks no longer aligned with the concept store's
    counts3, _ = tally(world, scoring, act_path=other, dask=True)
    assert_counts_equal(counts3, ref)
    assert int(counts3["images"]) == N


@pytest.mark.parametrize(("union", "planes"), COMBOS)
def test_tally_block_pair_chunks(world: World, union: str, planes: str) -> None:
    """The torch producer on the whole dataset at once, with tiny pair chunks."""
    space = label_space(world.store, None)
    labels = block_labels(world.store.read_block(0, N), space)
    ref, _ = reference(world, union, planes)
    for chunk in (1, 3, 512):
        counts = count_block(torch.from_numpy(world.acts), world.thresholds, labels, space.lut,
                             space.dense_category(), len(space.categories), (SH, SW),
                             TallyRule(union, planes), kernel="torch", pair_chunk=chunk)
        assert_counts_equal(counts._asdict(), ref)


def test_second_layer_and_quantile_thresholds(world: World) -> None:
    """Another layer of other shape in the same store; thresholds all by numpy.quantile."""
    rng = np.random.default_rng(5)
    small = rng.standard_normal((N, 3, 3, 2)).astype(np.float32)
    small[:, 2] = np.maximum(small[:, 2], 0)
    path = world.activation_store(4, {LAYER: world.acts, "head": small}, name="two.zarr")
    thr = np.array([np.quantile(small[:, k].astype(np.float64).ravel(), 1 - q)
                    for k, q in enumerate((0.005, 0.3, 0.6))])
    for union, planes in COMBOS:
        counts, _ = tally(world, Scoring(union=union, planes=planes), act_path=path,
                          thresholds=thr, layer="head")
        ref, _ = reference(world, union, planes, acts=small, thresholds=thr)
        assert_counts_equal(counts, ref)


# --------------------------------------------------------------------------- units, layers


@pytest.mark.parametrize(("union", "planes"), COMBOS)
def test_units_and_layers_frames(world: World, union: str, planes: str) -> None:
    counts, space = tally(world, Scoring(union=union, planes=planes))
    ref, selected = reference(world, union, planes)
    rows = reference_iou(ref, sorted(PRIMARY_ALL), selected, PRIMARY_ALL)
    meta = {"layer": LAYER}
    units = units_frame(iou_frame(TallyCounts.from_state_dict(counts), space, meta), world.thresholds, 0.04)
    want = reference_units(rows, K, 0.04)
    assert units["unit"].tolist() == list(range(K))
    assert units["label"].tolist() == [u["label"] for u in want]
    assert units["category"].tolist() == [u["category"] for u in want]
    assert units["is_detector"].tolist() == [u["is_detector"] for u in want]
    np.testing.assert_allclose(units["iou"].to_numpy(), [u["iou"] for u in want], atol=1e-12)
    np.testing.assert_array_equal(units["threshold"].to_numpy(), world.thresholds)
    # the twin-texture unit: iou 1 with both twins, the lower label wins
    assert units.loc[3, "label"] == 12 and units.loc[3, "iou"] == 1.0
    # the silent unit: every iou is 0, so the lowest label number, and no detector
    assert units.loc[5, "label"] == min(PRIMARY_ALL) and not units.loc[5, "is_detector"]
    layers = layers_frame(units, space.categories, meta).set_index("category")
    expected = reference_layers(want, selected)
    assert list(layers.index) == ["all", *selected]
    for cat, (detectors, unique) in expected.items():
        assert layers.loc[cat, "detectors"] == detectors, cat
        assert layers.loc[cat, "unique_concepts"] == unique, cat
        assert layers.loc[cat, "units"] == K
    assert expected["all"][0] >= 2  # the test means something


def test_units_frame_ties_and_strict_detector() -> None:
    """Hand-made iou table: ties to the lowest label whatever the row order; iou equal to
    the threshold is not a detector."""
    iou = pd.DataFrame({
        "unit": [0, 0, 0, 1, 1, 2, 2, 3],
        "label": [9, 4, 7, 5, 2, 8, 3, 6],
        "category": ["a", "b", "a", "a", "b", "b", "a", "a"],
        "iou": [0.3, 0.3, 0.1, 0.04, 0.04, 0.0, 0.0, 0.0400001],
    })
    units = units_frame(iou, np.array([1.0, 2.0, 3.0, 4.0]), 0.04)
    assert units["label"].tolist() == [4, 2, 3, 6]
    assert units["category"].tolist() == ["b", "b", "a", "a"]
    assert units["is_detector"].tolist() == [True, False, False, True]
    layers = layers_frame(units, ("a", "b"), {}).set_index("category")
    assert layers.loc["all", "detectors"] == 2 and layers.loc["all", "unique_concepts"] == 2
    assert layers.loc["a", "unique_concepts"] == 1 and layers.loc["b", "unique_concepts"] == 1


def test_layers_frame_counts_distinct_concepts() -> None:
    units = pd.DataFrame({
        "unit": range(6),
        "label": [3, 3, 4, 10, 10, 11],
        "category": ["object", "object", "object", "scene", "scene", "scene"],
        "iou": [0.5, 0.2, 0.1, 0.3, 0.01, 0.2],
        "is_detector": [True, True, True, True, False, True],
    })
    layers = layers_frame(units, ("object", "part", "scene"), {"layer": "x"})
    got = {r.category: (r.units, r.detectors, r.unique_concepts) for r in layers.itertuples()}
    assert got == {"all": (6, 5, 4), "object": (6, 3, 2), "part": (6, 0, 0),
                   "scene": (6, 2, 2)}
    assert (layers["layer"] == "x").all()


# --------------------------------------------------------------------------- float edge cases


def _single_unit_tally(world: World, acts: np.ndarray, thresholds: np.ndarray, name: str):
    path = world.activation_store(4, {"edge": acts}, name=name)
    counts, _ = tally(world, Scoring(union="global"), act_path=path,
                      thresholds=thresholds, layer="edge")
    ref, _ = reference(world, "global", "set", acts=acts, thresholds=thresholds)
    return counts, ref


def test_plateau_at_threshold_is_not_skipped(world: World) -> None:
    """A unit whose top values form a plateau: T = numpy.quantile = the plateau value."""
    value = None
    for v in np.float32([0.9, 0.1, 0.2, 0.7, 0.3, 1.7, 2.9]):
        const = np.full((H, W), v, dtype=np.float32)
        if reference_mask(const, float(v), (SH, SW)).any():
            value = v
            break
    if value is None:
        pytest.skip("this torch build does not overshoot on these constants")
    acts = np.full((N, 1, H, W), value, dtype=np.float32)
    acts[1::2] = 0.0  # half the images are silent
    thr = np.array([np.quantile(acts.astype(np.float64).ravel(), 1 - 0.005)])
    assert thr[0] == float(value)
    counts, ref = _single_unit_tally(world, acts, thr, "plateau.zarr")
    assert ref["unit_area"].sum() > 0
    np.testing.assert_array_equal(counts["unit_area"], ref["unit_area"])


def test_threshold_not_rounded_to_float32(world: World) -> None:
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2))  # the float32 right above a
    acts = np.full((N, 1, H, W), a, dtype=np.float32)
    acts[0, 0, 0:3, 1:4] = b  # 9 of N*H*W = 280 values
    # numpy 'linear' position 279 * 0.9703 = 270.71: between the last a and the first b
    thr = np.array([np.quantile(acts.astype(np.float64).ravel(), 1 - 0.0297)])
    assert float(a) < thr[0] < float(b) and float(np.float32(thr[0])) == float(b)
    counts, ref = _single_unit_tally(world, acts, thr, "rounding.zarr")
    assert ref["unit_area"].sum() > 0
    np.testing.assert_array_equal(counts["unit_area"], ref["unit_area"])
