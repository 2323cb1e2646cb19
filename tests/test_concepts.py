"""Concept store (storage/concepts.py, stages/concepts.py): contents, gathering, skip,
resume, rebuild, a round trip through the synthetic generator, and the CLI.

Every dataset is built in tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from stages import synthetic as syn
from stages.concepts import ConceptsConfig, build_concept_store
from stages.scenes.labels import CATEGORIES
from stages.scenes.render import render
from storage.broden import read_broden
from storage.broden_images import decode_plane
from storage.concepts import ConceptBlock, ConceptStore, store_artifact
from tests.broden_factory import BrodenBuilder, tree_mtimes

REPO = Path(__file__).resolve().parents[1]
SH, SW = 5, 6
N_IMAGES = 7
BLOCK = 3  # does not divide N_IMAGES
ARRAYS = ("pixel_labels", "plane_category", "image_labels", "image_label_category")
ALLOWED = {
    "object": [1, 2, 5],
    "part": [5, 300, 301, 1027],
    "scene": [12, 40],
    "texture": [400, 401],
}


def _builder(root: Path) -> BrodenBuilder:
    """7 images, 0-3 planes and 0-2 image-level labels each, numbers above 255 included."""
    b = BrodenBuilder(
        root,
        ["object", "part", "scene", "texture"],
        ih=10,
        iw=12,
        sh=SH,
        sw=SW,
        index_columns=["texture", "part", "scene", "object"],
    )
    b.label(1, "car", object=0.5).label(2, "tree", object=0.4)
    b.label(5, "glass", object=0.05, part=0.2)
    b.label(300, "wheel", part=0.1).label(301, "door", part=0.1).label(1027, "sail", part=0.3)
    b.label(12, "street", scene=1.0).label(40, "park", scene=1.0)
    b.label(400, "striped", texture=1.0).label(401, "dotted", texture=1.0)
    rng = np.random.default_rng(7)
    plane_counts = [(1, 2), (0, 0), (1, 3), (0, 1), (1, 0), (0, 0), (1, 1)]
    scalar_counts = [(1, 1), (0, 0), (1, 2), (1, 0), (0, 1), (0, 0), (1, 2)]
    for i in range(N_IMAGES):
        planes = {}
        for cat, count in zip(("object", "part"), plane_counts[i], strict=True):
            if count:
                planes[cat] = [rng.choice([0, *ALLOWED[cat]], size=(SH, SW)) for _ in range(count)]
        scalars = {}
        for cat, count in zip(("scene", "texture"), scalar_counts[i], strict=True):
            if count:
                scalars[cat] = list(rng.choice(ALLOWED[cat], size=count, replace=False))
        b.image(split="val" if i % 3 == 0 else "train", planes=planes, scalars=scalars)
    return b


def _cfg(root: Path, tmp_path: Path, block_size: int = BLOCK) -> ConceptsConfig:
    return ConceptsConfig(root, tmp_path / "concepts" / "ds.zarr", block_size, progress=False)


def _blocks_done_path(group: zarr.Group) -> str:
    """Where the resume marker array lives (``progress/blocks_done``; older layout: top level)."""
    for name in ("progress/blocks_done", "blocks_done"):
        if name in group:
            return name
    raise AssertionError(f"no blocks_done array in {group.store}")


def _snapshot(store: ConceptStore) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store.path), mode="r")
    names = (*ARRAYS, _blocks_done_path(group))
    return {name: group[name][:] for name in names}


def _assert_block_equal(a: ConceptBlock, b: ConceptBlock) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name


def _age_tree(root: Path, seconds: float = 3600) -> None:
    """Move every file's mtime into the past, so any rewrite is visible."""
    past = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


@pytest.fixture()
def built(tmp_path: Path):
    b = _builder(tmp_path / "ds")
    root = b.write()
    store = build_concept_store(_cfg(root, tmp_path), scheduler=None)
    return b, root, store


# --------------------------------------------------------------------------- contents


def test_store_equals_direct_decoding(built) -> None:
    b, root, store = built
    ds = read_broden(root)
    assert store.complete
    assert store.categories == ["object", "part", "scene", "texture"]
    assert (store.n_images, store.ih, store.iw, store.sh, store.sw) == (N_IMAGES, 10, 12, SH, SW)
    assert store.block_size == BLOCK
    assert store.fingerprint == ds.fingerprint()
    assert store.image_paths() == [r.image for r in ds.images]
    assert store.group[_blocks_done_path(store.group)][:].tolist() == [1, 1, 1]
    assert {n: (lab.name, lab.coverage) for n, lab in store.labels.items()} == {
        n: (lab.name, lab.coverage) for n, lab in ds.labels.items()
    }
    n_planes = store.group["pixel_labels"].shape[1]
    n_scalars = store.group["image_labels"].shape[1]
    assert (n_planes, n_scalars) == (4, 3)
    whole = store.read_block(0, N_IMAGES)
    for rec, want in zip(ds.images, b.expected_packing(), strict=True):
        i = rec.row
        planes, pcat, scal, scat = [], [], [], []
        for ci, cat in enumerate(ds.all_categories):  # category.csv order, then cell order
            for rel in rec.planes.get(cat, ()):
                planes.append(decode_plane(ds.images_dir / rel, (rec.sh, rec.sw), rec.line))
                pcat.append(ci)
            for number in rec.scalars.get(cat, ()):
                scal.append(number)
                scat.append(ci)
        # direct decoding agrees with the data the builder was given
        assert len(planes) == len(want[0]) and pcat == want[1]
        assert (scal, scat) == (want[2], want[3])
        for got, exp in zip(planes, want[0], strict=True):
            np.testing.assert_array_equal(got, exp)
        # ... and with the store, zero/-1 filled after the used slots
        k, q = len(planes), len(scal)
        if k:
            np.testing.assert_array_equal(whole.pixel_labels[i, :k], np.stack(planes))
        assert not whole.pixel_labels[i, k:].any()
        assert whole.plane_category[i].tolist() == pcat + [-1] * (n_planes - k)
        assert whole.image_labels[i].tolist() == scal + [0] * (n_scalars - q)
        assert whole.image_label_category[i].tolist() == scat + [-1] * (n_scalars - q)
    assert whole.pixel_labels.dtype == np.int32 and whole.image_labels.dtype == np.int32
    assert whole.plane_category.dtype == np.int8
    assert whole.image_label_category.dtype == np.int8
    # blocks read piecewise equal the whole
    for start in range(0, N_IMAGES, BLOCK):
        stop = min(start + BLOCK, N_IMAGES)
        part = store.read_block(start, stop)
        _assert_block_equal(
            part,
            ConceptBlock(*(getattr(whole, name)[start:stop] for name in ARRAYS)),
        )


@pytest.mark.parametrize(
    "rows", [[5, 0, 3], [6, 2, 4, 1, 0, 5, 3], [3], [4, 1, 4, 0, 1], np.array([2, 6, 5])]
)
def test_read_rows_unsorted_equals_gathered_block(built, rows) -> None:
    _, _, store = built
    whole = store.read_block(0, N_IMAGES)
    got = store.read_rows(np.asarray(rows))
    want = ConceptBlock(*(getattr(whole, name)[np.asarray(rows)] for name in ARRAYS))
    _assert_block_equal(got, want)


def test_threads_scheduler_gives_the_same_store(built, tmp_path: Path) -> None:
    _, root, store = built
    other = build_concept_store(
        ConceptsConfig(root, tmp_path / "other.zarr", 2, progress=False), scheduler="threads"
    )
    _assert_block_equal(other.read_block(0, N_IMAGES), store.read_block(0, N_IMAGES))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_store_built_on_threads_is_byte_identical_to_one_built_serially(
        built, tmp_path: Path) -> None:
    """Every chunk, every array's metadata and the store's attributes: the same bytes."""
    _, root, _ = built
    serial = build_concept_store(ConceptsConfig(root, tmp_path / "serial.zarr", 2,
                                                progress=False), scheduler=None)
    threads = build_concept_store(ConceptsConfig(root, tmp_path / "threads.zarr", 2,
                                                 progress=False), scheduler="threads")
    want, got = _files(serial.path), _files(threads.path)
    assert len(want) > 10 and got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []


# --------------------------------------------------------------------------- skip / resume


def test_finished_store_is_reused_untouched(built, tmp_path: Path, caplog) -> None:
    _, root, store = built
    before = _snapshot(store)
    _age_tree(store.path)
    mtimes = tree_mtimes(store.path)
    manifest = store_artifact(store.path, store.fingerprint).manifest_path.read_text()
    caplog.set_level(logging.INFO, logger="netdissect")
    again = build_concept_store(_cfg(root, tmp_path), scheduler=None)
    assert tree_mtimes(store.path) == mtimes
    assert store_artifact(store.path, store.fingerprint).manifest_path.read_text() == manifest
    assert not caplog.records, caplog.text  # nothing built, nothing to say
    for name, arr in _snapshot(again).items():
        np.testing.assert_array_equal(arr, before[name])
    # another block size for a finished, current store is still reused as it is
    build_concept_store(_cfg(root, tmp_path, block_size=5), scheduler=None)
    assert tree_mtimes(store.path) == mtimes


@pytest.mark.parametrize("resume_block_size", [BLOCK, 5])
def test_interrupted_build_resumes_only_missing_block(
    built, tmp_path: Path, caplog, resume_block_size: int
) -> None:
    _, root, store = built
    before = _snapshot(store)
    group = zarr.open_group(str(store.path), mode="r+")
    done = _blocks_done_path(group)
    group[done][1] = 0
    group["pixel_labels"][BLOCK : 2 * BLOCK] = 0
    artifact = store_artifact(store.path, store.fingerprint)
    artifact.begin()  # what a killed build leaves: the manifest says partial
    assert artifact.state() == "partial"
    assert not (store.path / "pixel_labels" / "c" / "1" / "0" / "0" / "0").exists()
    _age_tree(store.path)
    mtimes = tree_mtimes(store.path)

    caplog.set_level(logging.INFO, logger="netdissect")
    again = build_concept_store(_cfg(root, tmp_path, resume_block_size), scheduler=None)
    assert "resuming" in caplog.text
    assert again.complete and again.block_size == BLOCK  # the partial store's block size wins
    assert artifact.state() == "complete"
    for name, arr in _snapshot(again).items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)
    after = tree_mtimes(store.path)
    changed = {p for p in after if after[p] != mtimes.get(p)}
    assert changed == {
        f"{done}/c/1",
        "pixel_labels/c/1/0/0/0",
        "plane_category/c/1/0",
        "image_labels/c/1/0",
        "image_label_category/c/1/0",
    }
    assert set(mtimes) <= set(after)


def test_changed_label_csv_rebuilds(built, tmp_path: Path, caplog) -> None:
    _, root, store = built
    before = _snapshot(store)
    old_fp = store.fingerprint
    label_csv = root / "label.csv"
    label_csv.write_text(label_csv.read_text().replace(",tree,", ",oak,"))
    assert store_artifact(store.path, read_broden(root).fingerprint()).state() == "stale"
    _age_tree(store.path)
    mtimes = tree_mtimes(store.path)
    caplog.set_level(logging.INFO, logger="netdissect")
    again = build_concept_store(_cfg(root, tmp_path), scheduler=None)
    assert "rebuilding" in caplog.text and "skipped" not in caplog.text
    assert again.fingerprint != old_fp and again.complete
    assert again.labels[2].name == "oak"
    after = tree_mtimes(store.path)
    assert all(after[p] != mtimes.get(p) for p in after)  # every file written anew
    for name, arr in _snapshot(again).items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)


def test_changed_coverage_rebuilds_and_new_attrs(built, tmp_path: Path, caplog) -> None:
    _, root, store = built
    c_part = root / "c_part.csv"
    c_part.write_text(re.sub(r"(,glass,\d+,)0\.2\n", r"\g<1>0.01\n", c_part.read_text()))
    caplog.set_level(logging.INFO, logger="netdissect")
    again = build_concept_store(_cfg(root, tmp_path), scheduler=None)
    assert "rebuilding" in caplog.text
    assert again.labels[5].coverage == {"object": 0.05, "part": 0.01}


@pytest.mark.parametrize("damage", ["group without attrs", "corrupt zarr.json"])
def test_unreadable_or_half_created_store_is_rebuilt(built, tmp_path: Path, damage: str) -> None:
    _, root, store = built
    before = _snapshot(store)
    if damage == "group without attrs":  # killed inside create_store, before the attributes
        zarr.open_group(str(store.path), mode="w")
    else:
        (store.path / "zarr.json").write_text("{not json")
    assert store_artifact(store.path, store.fingerprint).state() == "complete"  # says the manifest
    again = build_concept_store(_cfg(root, tmp_path), scheduler=None)
    assert again.complete
    for name, arr in _snapshot(again).items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)


# --------------------------------------------------------------------------- synthetic round trip


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("synthetic_roundtrip")
    root = syn.generate(base / "broden", n_images=24, progress=False)
    store = build_concept_store(
        ConceptsConfig(root, base / "concepts.zarr", 5, progress=False), scheduler=None
    )
    return root, store


def test_synthetic_round_trip(synthetic_store) -> None:
    root, store = synthetic_store
    ds = read_broden(root)
    assert ds.all_categories == list(CATEGORIES)
    assert store.categories == list(CATEGORIES)
    assert store.n_images == 24 and (store.sh, store.sw) == (56, 56)
    whole = store.read_block(0, store.n_images)
    n_planes = whole.pixel_labels.shape[1]
    n_scalars = whole.image_labels.shape[1]
    for rec in ds.images:
        img = render(rec.row, 0)
        assert rec.image == syn.image_path(rec.row) and rec.split == img.split
        # reader: image-level labels and planes per category
        assert rec.scalars == {c: tuple(v) for c, v in img.image_labels.items() if v}
        assert set(rec.planes) == {c for c, ps in img.planes.items() if ps}
        for cat, rels in rec.planes.items():
            assert len(rels) == len(img.planes[cat])
            for rel, want in zip(rels, img.planes[cat], strict=True):
                np.testing.assert_array_equal(decode_plane(ds.images_dir / rel, (56, 56)), want)
        # store: planes in category.csv order, then cell order; then image-level labels
        planes, pcat, scal, scat = [], [], [], []
        for ci, cat in enumerate(CATEGORIES):
            for p in img.planes.get(cat, []):
                planes.append(p)
                pcat.append(ci)
            for v in img.image_labels.get(cat, []):
                scal.append(v)
                scat.append(ci)
        i, k, q = rec.row, len(planes), len(scal)
        np.testing.assert_array_equal(whole.pixel_labels[i, :k], np.stack(planes))
        assert not whole.pixel_labels[i, k:].any()
        assert whole.plane_category[i].tolist() == pcat + [-1] * (n_planes - k)
        assert whole.image_labels[i].tolist() == scal + [0] * (n_scalars - q)
        assert whole.image_label_category[i].tolist() == scat + [-1] * (n_scalars - q)


def test_synthetic_store_has_labels_above_255(synthetic_store) -> None:
    _, store = synthetic_store
    whole = store.read_block(0, store.n_images)
    assert whole.pixel_labels.max() > 255
    assert whole.image_labels.max() > 255  # textures are 400..404


# --------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=180,
    )
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


def _prefixed(mtimes: dict[str, int]) -> dict[str, int]:
    return {f"store/{k}": v for k, v in mtimes.items()}


def test_cli_concepts_synthetic_then_skip(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    args = ("stage=concepts", f"workdir={workdir}", "dataset.synthetic.n_images=40", "cluster=none")
    rc, out = _run_cli(*args)
    assert rc == 0, out
    (dataset_dir,) = (workdir / "datasets").glob("synthetic-*")  # non-default parameters
    store_path = workdir / "concepts" / f"{dataset_dir.name}.zarr"
    assert syn.is_complete(dataset_dir, n_images=40)
    store = ConceptStore(store_path)
    assert store.complete and store.n_images == 40
    assert not [line for line in out.splitlines() if "skipped" in line], out
    assert "dataset: building synthetic dataset" in out and "concepts: built" in out

    _age_tree(dataset_dir)
    _age_tree(store_path)
    before = {**tree_mtimes(dataset_dir), **_prefixed(tree_mtimes(store_path))}
    rc, out = _run_cli(*args)
    assert rc == 0, out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 2, out
    assert len([line for line in skipped if "dataset:" in line]) == 1, out
    assert len([line for line in skipped if "concepts:" in line]) == 1, out
    assert "building" not in out and "built" not in out
    after = {**tree_mtimes(dataset_dir), **_prefixed(tree_mtimes(store_path))}
    assert after == before
