"""Tests for the synthetic Broden generator (stages/synthetic.py).

The generated directory must be a genuine Broden dataset (SEMANTICS.md §3) whose files agree
exactly with ``render``, so every check re-renders images independently and compares.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import synthetic as syn
from stages.scenes.labels import label_table
from stages.scenes.render import render

N = 24
INDEX_HEADER = "image,split,ih,iw,sh,sw,scene,object,color,part,material,texture"
CATEGORY_ORDER = ["color", "object", "part", "material", "scene", "texture"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "broden"
    out = syn.generate(root, n_images=N, progress=False)
    assert out == root.absolute()
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        rgb = np.asarray(img)
    assert not rgb[..., 2].any()
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def _entries(cell: str) -> list[str]:
    return [e for e in cell.split(";") if e]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_files_and_headers(dataset: Path) -> None:
    assert (dataset / "images" / "synthetic").is_dir()
    assert syn.dataset_artifact(dataset, n_images=N).manifest_path.is_file()
    first = {
        "index.csv": INDEX_HEADER,
        "category.csv": "name,first,last,count,frequency",
        "label.csv": "number,name,category,frequency,coverage,syns",
    }
    for cat in CATEGORY_ORDER:
        first[f"c_{cat}.csv"] = "code,number,name,frequency,coverage"
    for name, header in first.items():
        lines = (dataset / name).read_text().splitlines()
        assert lines[0] == header, name
    assert (dataset / "label.csv").read_text().splitlines()[1] == "0,-,,0,0,"
    assert len(_rows(dataset / "index.csv")) == N


def test_category_csv(dataset: Path) -> None:
    rows = _rows(dataset / "category.csv")
    assert [r["name"] for r in rows] == CATEGORY_ORDER
    index = _rows(dataset / "index.csv")
    table = label_table()
    for r in rows:
        nums = [lab["number"] for lab in table if r["name"] in lab["categories"]]
        assert (int(r["first"]), int(r["last"]), int(r["count"])) == (
            min(nums),
            max(nums),
            len(nums),
        )
        assert int(r["frequency"]) == sum(1 for row in index if row[r["name"]])
    # scene and texture are on every image, colour and material planes too
    freq = {r["name"]: int(r["frequency"]) for r in rows}
    assert freq["scene"] == freq["texture"] == freq["color"] == freq["material"] == N


def test_files_match_render(dataset: Path) -> None:
    images = dataset / "images"
    for i, row in enumerate(_rows(dataset / "index.csv")):
        img = render(i)
        assert row["image"] == f"synthetic/{i:06d}.png"
        assert row["split"] == img.split
        assert (row["ih"], row["iw"], row["sh"], row["sw"]) == ("112", "112", "56", "56")
        with Image.open(images / row["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), img.rgb)
        for cat in ("color", "object", "part", "material"):
            paths = _entries(row[cat])
            assert len(paths) == len(img.planes[cat]), (i, cat)
            for rel, plane in zip(paths, img.planes[cat], strict=True):
                assert rel.startswith("synthetic/") and rel.endswith(".png")
                decoded = _decode(images / rel)
                assert decoded.shape == (56, 56)
                assert plane.dtype == np.int32
                assert np.array_equal(decoded, plane), (i, rel)
        for cat in ("scene", "texture"):
            assert [int(e) for e in _entries(row[cat])] == img.image_labels[cat]
        assert len(img.image_labels["scene"]) == 1
        assert len(img.image_labels["texture"]) in (1, 2)
        assert len(set(img.image_labels["texture"])) == len(img.image_labels["texture"])
        colors = img.planes["color"][0]
        assert colors.min() >= 1 and colors.max() <= 11  # every pixel has a colour name


def test_part_plane_names(dataset: Path) -> None:
    for i, row in enumerate(_rows(dataset / "index.csv")):
        stem = f"synthetic/{i:06d}"
        parts = _entries(row["part"])
        assert parts == [f"{stem}_part_{k}.png" for k in range(1, len(parts) + 1)]
        assert row["object"] in ("", f"{stem}_object.png")
        assert row["color"] == f"{stem}_color.png"
        assert row["material"] == f"{stem}_material.png"


def test_required_variety(dataset: Path) -> None:
    index = _rows(dataset / "index.csv")
    n_parts = [len(_entries(r["part"])) for r in index]
    assert 2 in n_parts, "some image must have two part planes"
    assert 0 in n_parts, "some image must have an empty part cell"
    assert any(len(_entries(r["texture"])) == 2 for r in index), "some image has two textures"
    assert {r["split"] for r in index} == {"train", "val"}
    # the two part planes really overlap somewhere (a pixel labelled on both planes)
    overlap = False
    big_pixel_label = False
    for i in range(N):
        img = render(i)
        parts = img.planes["part"]
        if len(parts) == 2 and ((parts[0] > 0) & (parts[1] > 0)).any():
            overlap = True
        if any((p > 255).any() for cat in ("object", "part", "material") for p in img.planes[cat]):
            big_pixel_label = True
    assert overlap
    assert big_pixel_label, "a pixel-level label above 255 must use the G channel"
    # and it is on disk with a non-zero G channel
    assert any(
        (np.asarray(Image.open(p))[..., 1] > 0).any()
        for p in sorted((dataset / "images" / "synthetic").glob("*_part_*.png"))
    )


def test_label_tables(dataset: Path) -> None:
    table = label_table()
    numbers = [lab["number"] for lab in table]
    assert numbers == sorted(set(numbers)) and 0 not in numbers
    assert any(n > 255 for n in numbers)
    shared = [lab for lab in table if len(lab["categories"]) > 1]
    assert shared, "at least one label must belong to two categories"
    by_cat = {cat: _rows(dataset / f"c_{cat}.csv") for cat in CATEGORY_ORDER}
    for rows in by_cat.values():
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
    for lab in shared:
        listed = [
            c for c, rows in by_cat.items() if any(int(r["number"]) == lab["number"] for r in rows)
        ]
        assert listed == lab["categories"] and len(listed) >= 2
    label_rows = {int(r["number"]): r for r in _rows(dataset / "label.csv")}
    for lab in table:
        row = label_rows[lab["number"]]
        assert row["name"] == lab["name"]
        cells = row["category"].split(";")
        assert [c.split("(")[0] for c in cells] == lab["categories"]
        for c in cells:
            cat, freq = c[:-1].split("(")
            crow = next(r for r in by_cat[cat] if int(r["number"]) == lab["number"])
            assert int(freq) == int(crow["frequency"])


def test_frequency_and_coverage(dataset: Path) -> None:
    """c_<cat>.csv statistics recomputed from the rendered planes."""
    area = 56 * 56
    freq: dict[str, dict[int, int]] = {c: {} for c in CATEGORY_ORDER}
    cov: dict[str, dict[int, float]] = {c: {} for c in CATEGORY_ORDER}
    for i in range(N):
        img = render(i)
        for cat, planes in img.planes.items():
            if not planes:
                continue
            stack = np.stack(planes)
            for lab in np.unique(stack[stack > 0]):
                px = int(np.any(stack == lab, axis=0).sum())
                freq[cat][int(lab)] = freq[cat].get(int(lab), 0) + 1
                cov[cat][int(lab)] = cov[cat].get(int(lab), 0.0) + px / area
        for cat, labs in img.image_labels.items():
            for lab in labs:
                freq[cat][lab] = freq[cat].get(lab, 0) + 1
                cov[cat][lab] = cov[cat].get(lab, 0.0) + 1.0
    for cat in CATEGORY_ORDER:
        for r in _rows(dataset / f"c_{cat}.csv"):
            n, f = int(r["number"]), int(r["frequency"])
            assert f == freq[cat].get(n, 0), (cat, n)
            expected = cov[cat][n] / f if f else 0.0
            assert float(r["coverage"]) == pytest.approx(expected, abs=1e-6), (cat, n)
            if cat in ("scene", "texture") and f:
                assert float(r["coverage"]) == 1.0


def test_deterministic_bytes(dataset: Path, tmp_path: Path) -> None:
    again = syn.generate(tmp_path / "again", n_images=N, progress=False)
    assert _tree_bytes(again) == _tree_bytes(dataset)
    other = syn.generate(tmp_path / "other", n_images=N, seed=1, progress=False)
    assert (other / "index.csv").read_bytes() != (dataset / "index.csv").read_bytes()
    name = "images/synthetic/000000.png"
    assert (other / name).read_bytes() != (dataset / name).read_bytes()


def test_parallel_matches_serial(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(syn, "PARALLEL_MIN", 1)
    monkeypatch.setattr(syn, "CHUNK", 5)
    out = syn.generate(tmp_path / "par", n_images=N, progress=False)
    assert _tree_bytes(out) == _tree_bytes(dataset)


def test_render_is_independent_of_other_images() -> None:
    late = render(17, seed=3)
    for i in range(3):
        render(i, seed=3)
    again = render(17, seed=3)
    assert np.array_equal(late.rgb, again.rgb)
    assert late.image_labels == again.image_labels and late.split == again.split
    for cat in late.planes:
        assert len(late.planes[cat]) == len(again.planes[cat])
        for a, b in zip(late.planes[cat], again.planes[cat], strict=True):
            assert np.array_equal(a, b)


def test_other_sizes() -> None:
    img = render(5, image_size=96, seg_size=40)
    assert img.rgb.shape == (96, 96, 3) and img.rgb.dtype == np.uint8
    for planes in img.planes.values():
        assert all(p.shape == (40, 40) for p in planes)
    with pytest.raises(ValueError):
        render(0, image_size=32, seg_size=64)


def test_is_complete(dataset: Path, tmp_path: Path) -> None:
    assert syn.is_complete(dataset, n_images=N)
    assert not syn.is_complete(dataset)  # default n_images differs
    assert not syn.is_complete(dataset, n_images=N, seed=1)
    assert not syn.is_complete(dataset, n_images=N, image_size=64)
    assert not syn.is_complete(dataset, n_images=N, seg_size=28)
    assert not syn.is_complete(tmp_path / "missing", n_images=N)
    made_by = syn.dataset_artifact(dataset, n_images=N).manifest()["fingerprint"]
    assert made_by["schema_version"] == syn.SCHEMA_VERSION
    assert made_by["n_images"] == N


def test_no_temp_dir_left_and_replace(tmp_path: Path) -> None:
    out = tmp_path / "data"
    syn.generate(out, n_images=4, progress=False)
    syn.generate(out, n_images=5, progress=False)  # replaces the previous dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.artifact.json", "data"]
    assert syn.is_complete(out, n_images=5) and not syn.is_complete(out, n_images=4)
    assert len(_rows(out / "index.csv")) == 5


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(syn.BrodenWriter, "write_tables", boom)
    with pytest.raises(RuntimeError):
        syn.generate(tmp_path / "data", n_images=3, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_dir(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        syn.generate(out, n_images=2, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
