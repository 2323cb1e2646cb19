"""Check stage: the census equals what the generator drew; damage is reported, all of it.

Expected numbers come from the generator itself (``stages.synthetic.render`` and
``label_table``), never from the function under test. Damaged copies are made by hand.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquire import format_report
from stages.check import check_dataset
from stages.scenes.labels import CATEGORIES, label_table
from stages.scenes.render import render
from storage.broden import read_broden
from storage.broden_images import save_plane
from storage.errors import BrodenFormatError, UserError
from tests.broden_factory import BrodenBuilder, save_rgb

N_IMAGES = 12


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    from stages.synthetic import generate

    return generate(tmp_path_factory.mktemp("check") / "syn", n_images=N_IMAGES, progress=False)


def expected_census() -> dict:
    """Census of the 12-image synthetic set, from the generator's own description."""
    table = label_table()
    drawn = [render(i) for i in range(N_IMAGES)]
    planes = {c: [len(r.planes.get(c, [])) for r in drawn] for c in CATEGORIES}
    image_labels = {c: [len(r.image_labels.get(c, [])) for r in drawn] for c in CATEGORIES}
    seen = {
        c: len({int(v) for r in drawn for p in r.planes.get(c, []) for v in np.unique(p) if v})
        for c in CATEGORIES
    }
    return {
        "images": N_IMAGES,
        "splits": dict(Counter(r.split for r in drawn)),
        "labels": len(table),
        "labels_per_category": {c: sum(c in t["categories"] for t in table) for c in CATEGORIES},
        "multi_category_labels": {
            t["number"]: tuple(t["categories"]) for t in table if len(t["categories"]) > 1
        },
        "images_with_category": {
            c: sum(1 for i in range(N_IMAGES) if planes[c][i] or image_labels[c][i])
            for c in CATEGORIES
        },
        "planes_per_category": {c: sum(planes[c]) for c in CATEGORIES},
        "max_planes_per_image": {c: max(planes[c]) for c in CATEGORIES},
        "image_labels_per_category": {c: sum(image_labels[c]) for c in CATEGORIES},
        "pixel_labels_seen": seen,
        "image_sizes": {(112, 112, 56, 56): N_IMAGES},
    }


def test_census_equals_what_the_generator_drew(generated: Path) -> None:
    result = check_dataset(generated, progress=False)
    assert result.ok, format_report(result)
    expected = expected_census()
    census = result.census
    assert census.categories == list(CATEGORIES)
    for key, value in expected.items():
        assert getattr(census, key) == value, key
    assert sum(expected["image_labels_per_category"].values()) > 0  # both kinds are exercised
    assert expected["max_planes_per_image"]["part"] == 2

    report = format_report(result)
    assert f"{N_IMAGES} images" in report and "no problems" in report
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines()[4:10]}
    for cat in CATEGORIES:
        numbers = [
            expected["labels_per_category"][cat],
            expected["images_with_category"][cat],
            expected["planes_per_category"][cat],
            expected["max_planes_per_image"][cat],
            expected["image_labels_per_category"][cat],
            expected["pixel_labels_seen"][cat],
        ]
        assert rows[cat] == [str(n) for n in numbers], cat


def _rows(root: Path) -> tuple[list[str], list[list[str]]]:
    with (root / "index.csv").open(newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, rows


def _write_rows(root: Path, header: list[str], rows: list[list[str]]) -> None:
    with (root / "index.csv").open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])


@pytest.fixture
def damaged(generated: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A copy with one problem of each kind; returns it and, per kind, what each line names."""
    root = shutil.copytree(generated, tmp_path / "damaged", symlinks=True)
    images = root / "images"
    header, rows = _rows(root)
    col = {name: header.index(name) for name in header}

    def cell(row: int, category: str) -> str:
        return rows[row][col[category]].split(";")[0]

    def line(row: int) -> str:
        return f"index.csv line {row + 2}"

    missing = cell(1, "object")
    (images / missing).unlink()
    wrong_size = cell(2, "color")
    save_plane(images / wrong_size, np.ones((57, 56), dtype=int))
    unknown = cell(3, "object")
    save_plane(images / unknown, np.full((56, 56), 9999))
    other_category = cell(4, "object")
    save_plane(images / other_category, np.full((56, 56), 100))  # a scene label in an object plane
    rows[5][col["scene"]] = "20"  # 'house' is an object, not listed in c_scene.csv
    rows[6][col["image"]] = "../outside.png"
    outside = tmp_path / "outside.png"
    shutil.copy(images / cell(7, "material"), outside)
    (images / cell(7, "material")).unlink()
    (images / cell(7, "material")).symlink_to(outside)
    _write_rows(root, header, rows)
    with (root / "index.csv").open("a") as fh:
        fh.write("synthetic/extra.png,train,112\n")  # a malformed row: 3 fields
    where = {
        "missing": [missing, line(1)],
        "size": [wrong_size, "57", line(2)],
        "label": [
            unknown,
            "9999",
            "label.csv",
            other_category,
            "100",
            "c_object.csv",
            line(5),
            "20",
            "c_scene.csv",
        ],
        "path": ["../outside.png", line(6), cell(7, "material"), str(outside)],
        "csv": [f"line {len(rows) + 2}", "3 fields"],
    }
    return root, where


def test_damaged_copy_lists_every_problem(damaged) -> None:
    root, where = damaged
    result = check_dataset(root, progress=False)
    assert result.problem_counts == {"missing": 1, "size": 1, "label": 3, "path": 2, "csv": 1}
    for kind, needles in where.items():
        text = " | ".join(p.text for p in result.problems if p.kind == kind)
        for needle in needles:
            assert needle in text, (kind, needle, text)
    assert all("\n" not in p.text for p in result.problems)
    report = format_report(result)
    assert "8 problem(s): csv 1, path 2, missing 1, size 1, label 3" in report
    for problem in result.problems:
        assert problem.text in report
    with pytest.raises(BrodenFormatError):  # the pipeline's reader still stops at the first
        read_broden(root)


def test_without_decoding_only_presence_and_csv_problems_are_found(damaged) -> None:
    root, _ = damaged
    result = check_dataset(root, decode=False, progress=False)
    assert result.problem_counts == {"missing": 1, "label": 1, "path": 2, "csv": 1}
    assert result.census.pixel_labels_seen == {}
    report = format_report(result)
    assert "seen in planes" not in report and "5 problem(s)" in report


def test_threads_find_the_same_as_one_thread(damaged) -> None:
    root, _ = damaged
    one = check_dataset(root, workers=1, progress=False)
    many = check_dataset(root, workers=4, progress=False)
    assert one.census == many.census
    assert sorted(map(str, one.problems)) == sorted(map(str, many.problems))


def test_every_bad_row_of_label_files_is_reported(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object", "scene"])
    b.label(1, "car", object=1.0).label(2, "street", scene=1.0)
    b.image(planes={"object": [np.ones((4, 4), dtype=int)]}, scalars={"scene": [2]})
    root = b.write()
    with (root / "label.csv").open("a") as fh:
        fh.write("x,broken,,0,0,\n1,car again,,0,0,\n")
    with (root / "c_object.csv").open("a") as fh:
        fh.write("9,777,ghost,1,0.1\n")
    result = check_dataset(root, progress=False)
    texts = [p.text for p in result.problems]
    assert result.problem_counts == {"csv": 2, "label": 1}, texts
    assert any("'x' is not an integer" in t for t in texts)
    assert any("label number 1 listed twice" in t for t in texts)
    assert any("c_object.csv line" in t and "777 is not in label.csv" in t for t in texts)
    with pytest.raises(BrodenFormatError, match="'x' is not an integer"):
        read_broden(root)  # the strict reader raises the first of them, as before


def test_mixed_image_sizes_are_flagged(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object"])
    b.label(1, "car", object=1.0)
    for _ in range(3):
        b.image(planes={"object": [np.ones((4, 4), dtype=int)]})
    root = b.write()
    header, rows = _rows(root)
    rows[2][header.index("ih")] = rows[2][header.index("iw")] = "16"
    save_rgb(root / "images" / rows[2][0], 16, 16)
    _write_rows(root, header, rows)
    result = check_dataset(root, progress=False)
    assert result.problem_counts == {"size": 1}
    assert "this tool needs one image size per dataset" in result.problems[0].text
    assert result.census.image_sizes == {(8, 8, 4, 4): 2, (16, 16, 4, 4): 1}


def test_missing_dataset_is_one_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset directory not found"):
        check_dataset(tmp_path / "nope", progress=False)
