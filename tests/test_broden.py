"""Broden-format reader (storage/broden.py, SEMANTICS.md §3): corners and bad inputs.

Every dataset is built in tmp_path by tests/broden_factory.py; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import zarr

from stages.concepts import ConceptsConfig, build_concept_store
from stages.tally.labels import label_space
from storage.broden import primary_category, read_broden
from storage.broden_images import decode_plane, safe_relative_path, save_plane
from storage.broden_writer import write_csv
from storage.concepts import store_artifact
from storage.errors import BrodenFormatError, UnsafePathError, UserError
from tests.broden_factory import BrodenBuilder, rewrite_index_line

REPO = Path(__file__).resolve().parents[1]
SH = SW = 4


def _plane(*values: int) -> np.ndarray:
    """A 4x4 plane whose rows cycle through ``values``."""
    return np.array([[values[(y + x) % len(values)] for x in range(SW)] for y in range(SH)])


def _build(builder: BrodenBuilder, tmp_path: Path, block_size: int = 2):
    root = builder.write()
    store = build_concept_store(
        ConceptsConfig(root, tmp_path / "concepts" / "ds.zarr", block_size, progress=False),
        scheduler=None,
    )
    return root, store


# --------------------------------------------------------------------------- reader corners


def test_categories_in_any_order(tmp_path: Path) -> None:
    """category.csv order defines the category order; index.csv columns may be shuffled."""
    b = BrodenBuilder(
        tmp_path / "ds",
        ["scene", "part", "object"],
        index_columns=["object", "scene", "part"],
    )
    b.label(1, "car", object=0.5).label(300, "wheel", part=0.1).label(12, "street", scene=1.0)
    b.image(planes={"object": [_plane(1, 0)], "part": [_plane(300, 0)]}, scalars={"scene": [12]})
    ds = read_broden(b.write())
    assert ds.all_categories == ["scene", "part", "object"]
    assert ds.categories == ["scene", "part", "object"]
    (rec,) = ds.images
    assert rec.planes == {"object": ("img/0000_object_1.png",), "part": ("img/0000_part_1.png",)}
    assert rec.scalars == {"scene": (12,)}
    assert (rec.row, rec.line, rec.image, rec.split) == (0, 2, "img/0000.png", "train")
    assert (rec.ih, rec.iw, rec.sh, rec.sw) == (8, 8, SH, SW)
    np.testing.assert_array_equal(
        decode_plane(ds.images_dir / rec.planes["part"][0], (SH, SW)), _plane(300, 0)
    )


def test_several_planes_and_image_level_labels(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object", "part", "scene", "texture"])
    b.label(1, "car", object=0.5).label(300, "wheel", part=0.1).label(301, "door", part=0.1)
    b.label(12, "street", scene=1.0).label(40, "park", scene=1.0).label(400, "dots", texture=1.0)
    b.image(
        planes={"part": [_plane(300, 0), _plane(301, 300), _plane(0, 301)]},
        scalars={"scene": [12], "texture": [400]},
    )
    b.image(planes={"object": [_plane(1)]}, scalars={"scene": [12, 40]})
    root = b.write()
    ds = read_broden(root)
    first, second = ds.images
    assert first.planes == {"part": tuple(f"img/0000_part_{k}.png" for k in (1, 2, 3))}
    assert first.scalars == {"scene": (12,), "texture": (400,)}
    assert second.scalars == {"scene": (12, 40)}
    index = (root / "index.csv").read_text().splitlines()
    assert "img/0000_part_1.png;img/0000_part_2.png;img/0000_part_3.png" in index[1]
    assert ",12;40," in index[2]
    for k, want in enumerate([_plane(300, 0), _plane(301, 300), _plane(0, 301)]):
        got = decode_plane(ds.images_dir / first.planes["part"][k], (SH, SW), first.line)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32


def test_cell_whitespace_and_empty_entries(tmp_path: Path) -> None:
    """Entries are trimmed and empty entries (`a;;b`, trailing `;`) are ignored."""
    b = BrodenBuilder(tmp_path / "ds", ["object", "scene"])
    b.label(1, "car", object=0.5).label(12, "street", scene=1.0).label(40, "park", scene=1.0)
    b.image(cells={"scene": " 12 ;; 40;"})
    (rec,) = read_broden(b.write()).images
    assert rec.scalars == {"scene": (12, 40)}
    assert rec.planes == {}


@pytest.mark.parametrize("number", [255, 256, 257, 300, 511, 4095, 40000, 65535])
def test_labels_above_255_decode_r_plus_256g(tmp_path: Path, number: int) -> None:
    path = save_plane(tmp_path / "p.png", _plane(number, 0, 1))
    got = decode_plane(path, (SH, SW))
    np.testing.assert_array_equal(got, _plane(number, 0, 1))
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb[0, 0].tolist() == [number % 256, number // 256, 0]


@pytest.mark.parametrize("mode", ["RGB", "P", "PA", "L", "LA", "RGBA", "I;16", "BMP", "TIFF"])
def test_every_kind_of_plane_file_decodes_as_pillow_reads_it(tmp_path: Path, mode: str) -> None:
    """libpng decodes 8-bit RGB PNGs; palettes, grey, alpha, 16-bit and other formats give
    the label numbers of Pillow's RGB conversion, as before libpng was used."""
    from PIL import Image

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 256, (SH, SW, 3), dtype=np.uint8)
    image = Image.fromarray(labels)
    if mode in ("P", "PA"):
        image = image.quantize(16)
        if mode == "PA":
            image.info["transparency"] = 0
    elif mode == "I;16":
        image = Image.fromarray(labels[..., 0].astype(np.uint16) * 257)
    elif mode not in ("BMP", "TIFF"):
        image = image.convert(mode)
    fmt = mode if mode in ("BMP", "TIFF") else "PNG"
    path = tmp_path / "plane.png"
    image.save(path, format=fmt)
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.int32)
    np.testing.assert_array_equal(decode_plane(path, (SH, SW)), rgb[..., 0] + 256 * rgb[..., 1])


def test_a_damaged_chunk_before_the_pixels_is_refused_as_pillow_refuses_it(tmp_path: Path):
    """libpng only warns about a bad CRC in an ancillary chunk; the plane is still refused
    (BrodenFormatError), as it was when Pillow decoded every plane."""
    import io
    import zlib

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("note", "label plane")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((SH, SW, 3), np.uint8)).save(buffer, format="PNG", pnginfo=info)
    data = bytearray(buffer.getvalue())
    text = data.index(b"tEXt")
    length = int.from_bytes(data[text - 4:text], "big")
    crc = text + 4 + length
    assert int.from_bytes(data[crc:crc + 4], "big") == zlib.crc32(data[text:crc])
    data[crc] ^= 0xFF
    path = tmp_path / "plane.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BrodenFormatError, match="plane.png: not a readable image"):
        decode_plane(path, (SH, SW))


def test_links_are_followed_inside_images_and_refused_outside(tmp_path: Path) -> None:
    """A link to a file inside images/ (or to images/ itself: then no file) is allowed; one
    leading outside is refused with the link named."""
    from storage.broden_images import ImagesFolder
    from storage.errors import MissingFileError

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    save_plane(images / "sub" / "real.png", _plane(3, 0))
    outside = save_plane(tmp_path / "outside.png", _plane(3, 0))
    (images / "inside.png").symlink_to(images / "sub" / "real.png")
    (images / "away.png").symlink_to(outside)
    (images / "root.png").symlink_to(".")
    folder = ImagesFolder(images)
    np.testing.assert_array_equal(decode_plane(folder.file("inside.png"), (SH, SW)), _plane(3, 0))
    with pytest.raises(UnsafePathError, match="away.png: a link to .*outside the dataset"):
        folder.file("away.png", 4)
    with pytest.raises(MissingFileError, match="root.png: label image not found"):
        decode_plane(folder.file("root.png"), (SH, SW))


def test_labels_above_255_in_concept_store(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object", "part"])
    b.label(2, "tree", object=0.3).label(256, "roof", part=0.1).label(1027, "sail", part=0.2)
    b.image(planes={"object": [_plane(2, 0)], "part": [_plane(256, 1027, 0)]})
    _, store = _build(b, tmp_path)
    block = store.read_block(0, 1)
    np.testing.assert_array_equal(block.pixel_labels[0, 1], _plane(256, 1027, 0))
    assert block.plane_category[0].tolist() == [0, 1]


def _two_category_dataset(tmp_path: Path, order: list[str], cov: dict[str, float]):
    b = BrodenBuilder(tmp_path / "_".join(order), order, index_columns=sorted(order))
    b.label(5, "glass", **cov).label(1, "car", object=0.9).label(300, "wheel", part=0.9)
    b.image(planes={"object": [_plane(1, 5)], "part": [_plane(300, 5)]})
    return b


@pytest.mark.parametrize(
    ("order", "cov", "want"),
    [
        (["object", "part"], {"object": 0.5, "part": 0.2}, "object"),
        (["object", "part"], {"object": 0.2, "part": 0.5}, "part"),
        (["part", "object"], {"object": 0.5, "part": 0.2}, "object"),
        # ties: the category listed LATER in category.csv (not in index.csv) wins
        (["object", "part"], {"object": 0.3, "part": 0.3}, "part"),
        (["part", "object"], {"object": 0.3, "part": 0.3}, "object"),
        (["object", "part"], {"object": 0.0, "part": 0.0}, "part"),
    ],
)
def test_primary_category_highest_coverage_tie_later(
    tmp_path: Path, order: list[str], cov: dict[str, float], want: str
) -> None:
    b = _two_category_dataset(tmp_path, order, cov)
    root, store = _build(b, tmp_path)
    ds = read_broden(root)
    assert ds.labels[5].coverage == cov
    assert ds.primary_category(5) == want
    assert ds.primary_category(1) == "object" and ds.primary_category(300) == "part"
    space = label_space(store, None)
    assert space.categories == tuple(order)
    assert space.numbers.tolist() == [1, 5, 300]
    assert space.categories[space.primary[1]] == want
    assert space.lut[5] == 2


def test_primary_category_function_corners() -> None:
    assert primary_category({}, ["a", "b"]) is None
    assert primary_category({"a": 0.1}, ["b"]) is None
    assert primary_category({"a": 0.1, "b": 0.1, "c": 0.1}, ["a", "b", "c"]) == "c"
    assert primary_category({"a": 0.1, "b": 0.1, "c": 0.1}, ["a", "b"]) == "b"
    assert primary_category({"a": 0.4, "b": 0.1, "c": 0.1}, ["a", "b", "c"]) == "a"


def test_category_subset_changes_primary(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object", "part", "material"])
    b.label(5, "glass", object=0.1, part=0.6, material=0.3)
    b.label(1, "car", object=0.9).label(300, "wheel", part=0.9).label(7, "wood", material=0.5)
    b.image(planes={"object": [_plane(1, 5)], "part": [_plane(300, 5)], "material": [_plane(7, 5)]})
    root, store = _build(b, tmp_path)

    assert read_broden(root).primary_category(5) == "part"
    sub = read_broden(root, categories=["material", "object"])  # given order is irrelevant
    assert sub.categories == ["object", "material"]
    assert sub.all_categories == ["object", "part", "material"]
    assert sub.primary_category(5) == "material"
    assert sub.primary_category(300) is None
    assert sub.scored_labels() == [1, 5, 7]
    assert set(sub.images[0].planes) == {"object", "material"}  # unselected cells dropped
    only_object = read_broden(root, categories=["object"])
    assert only_object.primary_category(5) == "object"
    assert only_object.scored_labels() == [1, 5]

    space = label_space(store, ["material", "object"])
    assert space.categories == ("object", "material")
    assert dict(zip(space.numbers.tolist(), space.primary.tolist(), strict=True)) == {
        1: 0,
        5: 1,
        7: 1,
    }
    assert space.selected.tolist() == [True, False, True]
    assert space.lut[300] == 0
    full = label_space(store, None)
    assert full.categories[full.primary[full.numbers.tolist().index(5)]] == "part"
    with pytest.raises(UserError, match="nope"):
        label_space(store, ["object", "nope"])


def test_images_with_empty_cells(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object", "part", "scene"])
    b.label(1, "car", object=0.5).label(300, "wheel", part=0.1).label(12, "street", scene=1.0)
    b.image()  # every cell empty
    b.image(planes={"part": [_plane(300, 0)]})
    b.image(scalars={"scene": [12]})
    b.image()
    root, store = _build(b, tmp_path, block_size=3)
    ds = read_broden(root)
    assert [(r.planes, r.scalars) for r in ds.images] == [
        ({}, {}),
        ({"part": ("img/0001_part_1.png",)}, {}),
        ({}, {"scene": (12,)}),
        ({}, {}),
    ]
    block = store.read_block(0, 4)
    assert block.pixel_labels.shape == (4, 1, SH, SW)
    assert not block.pixel_labels[[0, 2, 3]].any()
    np.testing.assert_array_equal(block.pixel_labels[1, 0], _plane(300, 0))
    assert block.plane_category[:, 0].tolist() == [-1, 1, -1, -1]
    assert block.image_labels[:, 0].tolist() == [0, 0, 12, 0]
    assert block.image_label_category[:, 0].tolist() == [-1, -1, 2, -1]


def test_no_labels_at_all_gives_one_empty_slot(tmp_path: Path) -> None:
    b = BrodenBuilder(tmp_path / "ds", ["object"])
    b.label(1, "car", object=0.5)
    b.image()
    b.image()
    _, store = _build(b, tmp_path)
    block = store.read_block(0, 2)
    assert block.pixel_labels.shape == (2, 1, SH, SW) and not block.pixel_labels.any()
    assert block.image_labels.shape == (2, 1) and not block.image_labels.any()
    assert (block.plane_category == -1).all() and (block.image_label_category == -1).all()


# --------------------------------------------------------------------------- bad inputs


def _base(root: Path) -> BrodenBuilder:
    b = BrodenBuilder(root, ["object", "part", "scene"])
    b.label(1, "car", object=0.6).label(2, "tree", object=0.3).label(300, "wheel", part=0.2)
    b.label(12, "street", scene=1.0).label(40, "park", scene=1.0)
    b.image(planes={"object": [_plane(1, 2)], "part": [_plane(300, 0)]}, scalars={"scene": [12]})
    b.image(planes={"object": [_plane(2, 0)], "part": [_plane(0, 300)]}, scalars={"scene": [40]})
    b.image(planes={"object": [_plane(1, 0)]}, scalars={"scene": [12, 40]})
    return b


def _index_line(root: Path, line: int) -> str:
    return (root / "index.csv").read_text().splitlines()[line - 1]


def _replace_cell(root: Path, line: int, column: int, text: str) -> None:
    fields = _index_line(root, line).split(",")
    fields[column] = text
    rewrite_index_line(root, line, ",".join(fields))


# each case: mutate(root) -> (where it fails: "read" | "build", substrings of the message)
def _missing(name: str):
    def mutate(root: Path):
        (root / name).unlink()
        return "read", [str(root / name), "not found"]

    return mutate


def _missing_png(root: Path):
    path = root / "images" / "img" / "0001_part_1.png"
    path.unlink()
    return "build", [str(path), "index.csv line 3", "not found"]


def _wrong_field_count(root: Path):
    rewrite_index_line(root, 3, _index_line(root, 3) + ",extra")
    return "read", [f"{root / 'index.csv'} line 3", "10 fields, expected 9"]


def _too_few_fields(root: Path):
    rewrite_index_line(root, 4, "img/0002.png,train,8,8")
    return "read", [f"{root / 'index.csv'} line 4"]


def _non_integer_sh(root: Path):
    _replace_cell(root, 4, 4, "four")
    return "read", [f"{root / 'index.csv'} line 4", "'sh'", "'four'"]


def _non_positive_size(root: Path):
    _replace_cell(root, 2, 5, "0")
    return "read", [f"{root / 'index.csv'} line 2"]


def _differing_sizes(root: Path):
    _replace_cell(root, 3, 2, "16")
    return "build", [f"{root / 'index.csv'} line 3"]


def _png_size_mismatch(root: Path):
    path = root / "images" / "img" / "0002_object_1.png"
    save_plane(path, np.ones((SH + 1, SW), dtype=int))
    return "build", [str(path), "index.csv line 4", "differs"]


def _png_not_an_image(root: Path):
    path = root / "images" / "img" / "0000_part_1.png"
    path.write_bytes(b"this is not a png")
    return "build", [str(path), "index.csv line 2"]


def _scalar_not_in_label_csv(root: Path):
    _replace_cell(root, 3, 8, "12;99")
    return "read", [f"{root / 'index.csv'} line 3", "99", "label.csv"]


def _scalar_not_in_category(root: Path):
    _replace_cell(root, 3, 8, "1")  # 'car' is a label, but not listed in c_scene.csv
    return "read", [f"{root / 'index.csv'} line 3", "c_scene.csv"]


def _scalar_not_a_number(root: Path):
    _replace_cell(root, 2, 8, "street")
    return "read", [f"{root / 'index.csv'} line 2", "'street'"]


def _pixel_not_in_label_csv(root: Path):
    path = root / "images" / "img" / "0001_object_1.png"
    save_plane(path, _plane(2, 77))
    return "build", [str(path), "index.csv line 3", "77"]


def _pixel_in_other_category_only(root: Path):
    path = root / "images" / "img" / "0002_object_1.png"
    save_plane(path, _plane(1, 300))  # wheel is listed in c_part.csv only
    return "build", [str(path), "index.csv line 4", "300", "c_object.csv"]


def _escape(column: int, text: str, line: int = 3):
    def mutate(root: Path):
        _replace_cell(root, line, column, text)
        return "read", [f"{root / 'index.csv'} line {line}", "escapes"]

    return mutate


def _c_csv_bad_number(root: Path):
    path = root / "c_part.csv"
    write_csv(path, ["code", "number", "name", "frequency", "coverage"], [[1, "x3", "w", 1, 0.1]])
    return "read", [f"{path} line 2", "'x3'"]


def _c_csv_unknown_label(root: Path):
    path = root / "c_part.csv"
    write_csv(path, ["code", "number", "name", "frequency", "coverage"], [[1, 999, "w", 1, 0.1]])
    return "read", [f"{path} line 2", "999"]


def _c_csv_bad_coverage(root: Path):
    path = root / "c_object.csv"
    text = path.read_text().replace("0.6", "lots")
    path.write_text(text)
    return "read", [f"{path} line 2", "'lots'"]


def _label_csv_bad_row(root: Path):
    path = root / "label.csv"
    path.write_text(path.read_text() + "13,a,b\n")
    return "read", [f"{path} line 8"]


def _label_csv_duplicate(root: Path):
    path = root / "label.csv"
    path.write_text(path.read_text() + "12,again,scene(1),1,0.5,\n")
    return "read", [f"{path} line 8", "12"]


def _index_unknown_column(root: Path):
    lines = (root / "index.csv").read_text().splitlines()
    lines = [lines[0] + ",colour"] + [line + "," for line in lines[1:]]
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return "read", [str(root / "index.csv"), "'colour'"]


def _index_missing_column(root: Path):
    lines = (root / "index.csv").read_text().splitlines()
    lines = [",".join(line.split(",")[:1] + line.split(",")[2:]) for line in lines]  # no split
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return "read", [str(root / "index.csv"), "split"]


def _index_empty(root: Path):
    (root / "index.csv").write_text("")
    return "read", [str(root / "index.csv"), "empty"]


def _index_no_rows(root: Path):
    (root / "index.csv").write_text(_index_line(root, 1) + "\n")
    return "build", [str(root / "index.csv"), "no images"]


def _empty_image_path(root: Path):
    _replace_cell(root, 2, 0, "")
    return "read", [f"{root / 'index.csv'} line 2"]


BAD_CASES = {
    "missing index.csv": _missing("index.csv"),
    "missing label.csv": _missing("label.csv"),
    "missing category.csv": _missing("category.csv"),
    "missing c_part.csv": _missing("c_part.csv"),
    "missing png plane": _missing_png,
    "index wrong field count": _wrong_field_count,
    "index too few fields": _too_few_fields,
    "index non-integer sh": _non_integer_sh,
    "index non-positive size": _non_positive_size,
    "index differing sizes": _differing_sizes,
    "index unknown column": _index_unknown_column,
    "index missing column": _index_missing_column,
    "index empty file": _index_empty,
    "index no rows": _index_no_rows,
    "index empty image path": _empty_image_path,
    "png size mismatch": _png_size_mismatch,
    "png not an image": _png_not_an_image,
    "scalar label not in label.csv": _scalar_not_in_label_csv,
    "scalar label not in c_scene.csv": _scalar_not_in_category,
    "scalar label not a number": _scalar_not_a_number,
    "pixel label not in label.csv": _pixel_not_in_label_csv,
    "pixel label not in its c_<cat>.csv": _pixel_in_other_category_only,
    "plane ../x.png": _escape(7, "../x.png"),
    "plane img/../../x.png": _escape(7, "img/../../x.png"),
    "plane /abs/x.png": _escape(7, "/abs/x.png"),
    "plane ..\\x.png": _escape(7, "..\\x.png"),
    "plane C:/x.png": _escape(7, "C:/x.png"),
    "second plane ../x.png": _escape(7, "img/0001_part_1.png;../x.png"),
    "image ../x.png": _escape(0, "../x.png", line=2),
    "image /abs/x.png": _escape(0, "/abs/x.png", line=4),
    "c_<cat> non-integer number": _c_csv_bad_number,
    "c_<cat> label not in label.csv": _c_csv_unknown_label,
    "c_<cat> non-numeric coverage": _c_csv_bad_coverage,
    "label.csv wrong field count": _label_csv_bad_row,
    "label.csv duplicate number": _label_csv_duplicate,
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_broden_format_error(tmp_path: Path, case: str) -> None:
    root = _base(tmp_path / "ds").write()
    read_broden(root)  # the untouched base dataset is valid
    where, needles = BAD_CASES[case](root)
    cfg = ConceptsConfig(root, tmp_path / "store.zarr", block_size=2, progress=False)
    if where == "read":
        with pytest.raises(BrodenFormatError) as info:
            read_broden(root)
    else:
        read_broden(root)  # the reader does not decode planes; the store build does
        with pytest.raises(BrodenFormatError) as info:
            build_concept_store(cfg, scheduler=None)
        state = store_artifact(cfg.store_path, read_broden(root).fingerprint()).state()
        assert state != "complete"
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_unknown_category_selected(tmp_path: Path) -> None:
    root = _base(tmp_path / "ds").write()
    with pytest.raises(BrodenFormatError) as info:
        read_broden(root, categories=["object", "colour"])
    message = str(info.value)
    assert "'colour'" in message and str(root / "category.csv") in message
    assert "\n" not in message


def test_missing_dataset_dir(tmp_path: Path) -> None:
    with pytest.raises(BrodenFormatError, match="dataset directory not found"):
        read_broden(tmp_path / "nowhere")


def test_unselected_category_cells_are_not_parsed(tmp_path: Path) -> None:
    """A bad entry in an unselected category does not stop reading the selected ones."""
    root = _base(tmp_path / "ds").write()
    _replace_cell(root, 3, 8, "99")
    assert read_broden(root, categories=["object", "part"]).images[1].planes["part"]
    with pytest.raises(BrodenFormatError):
        read_broden(root)


def test_dot_image_path_is_a_format_error(tmp_path: Path) -> None:
    root = _base(tmp_path / "ds").write()
    _replace_cell(root, 2, 0, "./")
    with pytest.raises(BrodenFormatError):
        read_broden(root)


# --------------------------------------------------------------------------- CLI


def _visible_lines(stream: str) -> list[str]:
    """What a terminal shows: per line, the text after the last carriage return."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in stream.split("\n")]
    return [line for line in lines if line.strip()]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    # bytes, decoded here: text=True would turn tqdm's carriage returns into newlines
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


@pytest.mark.parametrize("case", ["missing index.csv", "missing png plane"])
def test_cli_bad_dataset_exits_2_with_one_error_line(tmp_path: Path, case: str) -> None:
    root = _base(tmp_path / "bad_ds").write()
    _, needles = BAD_CASES[case](root)
    workdir = tmp_path / "work"
    proc = _run_cli("stage=concepts", f"dataset.path={root}", f"workdir={workdir}", "cluster=none")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in _visible_lines(proc.stderr) if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert _visible_lines(proc.stderr) == errors, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    store = workdir / "concepts" / "bad_ds.zarr"
    if store.exists():
        attrs = dict(zarr.open_group(str(store), mode="r").attrs)
        assert store_artifact(store, str(attrs.get("fingerprint"))).state() == "partial"


def test_line_numbers_count_blank_lines_and_crlf(tmp_path: Path) -> None:
    """CRLF files read like LF files; blank lines are skipped but still counted in messages."""
    root = _base(tmp_path / "ds").write()
    lines = (root / "index.csv").read_text().splitlines()
    (root / "index.csv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    assert [r.line for r in read_broden(root).images] == [2, 3, 4]
    lines.insert(2, "")
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    ds = read_broden(root)
    assert [(r.row, r.line) for r in ds.images] == [(0, 2), (1, 4), (2, 5)]
    lines[4] = lines[4].replace(",12;40", ",99")
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BrodenFormatError, match=r"index\.csv line 5"):
        read_broden(root)


def test_the_own_images_recipe_of_the_real_data_guide_writes_a_readable_directory(
        tmp_path, monkeypatch):
    """docs/REAL_DATA.md's 'Your own images' snippet, run as written."""
    import re

    from tests.conftest import REPO

    guide = (REPO / "docs" / "REAL_DATA.md").read_text().split("## Your own images")[1]
    (code,) = re.findall(r"```python\n(.*?)```", guide.split("\n## ")[0], re.S)
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    dataset = read_broden(tmp_path / "my_broden")
    assert [r.image for r in dataset.images] == ["street/0001.jpg"]
    assert dataset.labels[1].coverage == {"object": pytest.approx(40 * 50 / 112**2, abs=1e-6)}
    assert dataset.primary_category(3) == "scene"


def test_index_paths_fast_and_slow_agree() -> None:
    """Every path over a small alphabet (separators, dots, drive colons, backslashes) gets
    what PurePosixPath's normal form says, or the same refusal, whichever path it takes."""
    def reference(text: str) -> str | type:
        posix = PurePosixPath(text.replace("\\", "/"))
        if not posix.parts:
            return BrodenFormatError
        if text.startswith(("/", "\\")) or posix.is_absolute() or ":" in posix.parts[0] or (
                ".." in posix.parts):
            return UnsafePathError
        return str(posix)

    alphabet = ["a", "/", ".", "..", "\\", ":", "x.png"]
    for size in range(1, 6):
        for parts in itertools.product(alphabet, repeat=size):
            text = "".join(parts)
            want = reference(text)
            if isinstance(want, str):
                assert safe_relative_path(Path("index.csv"), 2, "image", text) == want, text
            else:
                with pytest.raises(want):
                    safe_relative_path(Path("index.csv"), 2, "image", text)


def test_the_first_unlisted_plane_is_named_by_category_then_row(tmp_path: Path) -> None:
    """Every plane of a block is read first; then the first category with an unlisted pixel
    label names its first such plane and that plane's smallest unlisted label, whatever
    image comes first."""
    b = BrodenBuilder(tmp_path / "ds", ["object", "part"])
    b.label(1, "car", object=0.5).label(300, "wheel", part=0.1)
    b.image(planes={"object": [_plane(1, 0)], "part": [_plane(300, 88)]})
    b.image(planes={"object": [_plane(1, 77, 55, 0)], "part": [_plane(300)]})
    b.image(planes={"object": [_plane(1, 44)], "part": [_plane(300)]})
    with pytest.raises(BrodenFormatError) as err:
        _build(b, tmp_path, block_size=3)
    assert "index.csv line 3" in str(err.value) and "label 55 " in str(err.value)
    assert "c_object.csv" in str(err.value) and "0001_object_1.png" in str(err.value)
