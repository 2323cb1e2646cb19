"""The Broden format's writer (SEMANTICS.md §3), beside its reader (:mod:`storage.broden`):
label planes as PNGs (label = R + 256·G), ``index.csv``, and ``category.csv``, ``label.csv``
and ``c_<category>.csv`` with each label's frequency and coverage measured from what was
written.  The synthetic dataset, the tests' factories and the benchmark's data all write
through it.

Measured as Broden defines them: per category, a label's *frequency* is the number of images
in which that category's planes (or image-level entries) carry it, its *coverage* the mean
share of the image they cover when they do (union over the category's planes; an image-level
label covers the whole image); ``label.csv`` gives the same over all categories.  A label's
coverage can also be set by hand (``coverage=`` of :meth:`BrodenWriter.write_tables`): the
primary category of a label listed in two categories follows from it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from storage.broden_images import save_plane

Entry = int | tuple[str, np.ndarray]  # an image-level label, or a plane's path and labels
FIXED_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw"]


@dataclass
class LabelPixels:
    """Pixels of an image that carry each label: per category and over all categories."""

    by_category: dict[str, dict[int, int]] = field(default_factory=dict)
    overall: dict[int, int] = field(default_factory=dict)


def label_pixels(entries: Mapping[str, Sequence[Entry]], area: int) -> LabelPixels:
    """What one image's entries cover (union over planes; image-level labels: ``area``)."""
    found = LabelPixels()
    every_plane, image_level = [], set()
    for cat, items in entries.items():
        planes = [np.asarray(e[1]) for e in items if isinstance(e, tuple)]
        numbers = [int(e) for e in items if not isinstance(e, tuple)]
        every_plane += planes
        image_level.update(numbers)
        pixels = {}
        if planes:
            stack = np.stack(planes)
            pixels = {int(n): int(np.any(stack == n, axis=0).sum())
                      for n in np.unique(stack) if n != 0}
        pixels.update(dict.fromkeys(numbers, area))
        if pixels:
            found.by_category[cat] = pixels
    stack = np.stack(every_plane) if every_plane else np.zeros((0, 1), np.int64)
    for n in {n for pixels in found.by_category.values() for n in pixels}:
        found.overall[n] = area if n in image_level else int(np.any(stack == n, axis=0).sum())
    return found


def write_image_files(images_dir: Path, image: str, rgb: np.ndarray | None,
                      entries: Mapping[str, Sequence[Entry]], compress_level: int = 6
                      ) -> dict[str, str]:
    """Write an image (when ``rgb`` is given) and its label planes under ``images_dir``;
    returns each category's index.csv cell, its entries in the order given."""
    if rgb is not None:
        path = images_dir / image
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
        options = {"compress_level": compress_level} if kind == "PNG" else {}
        Image.fromarray(rgb).save(path, format=kind, **options)
    cells = {}
    for cat, items in entries.items():
        texts = []
        for entry in items:
            if isinstance(entry, tuple):
                save_plane(images_dir / entry[0], entry[1], compress_level)
                texts.append(entry[0])
            else:
                texts.append(str(int(entry)))
        cells[cat] = ";".join(texts)
    return cells


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[str(v) for v in row] for row in rows])
    return path


class BrodenWriter:
    """Lays out a Broden-format directory at ``root``: declare the labels
    (:meth:`label`), add images (:meth:`add_image`, or :meth:`add_row` for files written
    elsewhere, e.g. by worker processes), then :meth:`write_tables`."""

    def __init__(self, root: Path, categories: Sequence[str],
                 index_columns: Sequence[str] | None = None, compress_level: int = 6):
        self.root = Path(root)
        self.categories = list(categories)  # category.csv order
        self.index_columns = list(index_columns or categories)
        self.compress_level = compress_level
        self.names: dict[int, str] = {}
        self.listed: dict[str, list[int]] = {c: [] for c in self.categories}
        self.rows: list[list[object]] = []
        self.frequency = {c: {} for c in self.categories} | {"": {}}
        self.cover = {c: {} for c in self.categories} | {"": {}}
        self.images_with = dict.fromkeys(self.categories, 0)

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def label(self, number: int, name: str, categories: Iterable[str]) -> BrodenWriter:
        """A label, listed in ``c_<cat>.csv`` of each of ``categories`` (in declared order)."""
        if number <= 0:
            raise ValueError("label 0 is reserved for 'none'")
        self.names[number] = name
        for cat in categories:
            if cat not in self.listed:
                raise KeyError(f"unknown category {cat!r}")
            self.listed[cat].append(number)
        return self

    def add_image(self, image: str, split: str, sizes: tuple[int, int, int, int],
                  entries: Mapping[str, Sequence[Entry]], rgb: np.ndarray | None = None,
                  raw_cells: Mapping[str, str] | None = None) -> None:
        """Write an image's files and record its row; ``raw_cells`` replaces a category's
        cell text (for malformed-input tests)."""
        cells = write_image_files(self.images_dir, image, rgb, entries, self.compress_level)
        cells.update(raw_cells or {})
        self.add_row(image, split, sizes, cells, label_pixels(entries, sizes[2] * sizes[3]))

    def add_row(self, image: str, split: str, sizes: tuple[int, int, int, int],
                cells: Mapping[str, str], pixels: LabelPixels) -> None:
        """Record one index.csv row whose files are written, and what its labels cover."""
        self.rows.append([image, split, *sizes, *(cells.get(c, "") for c in self.index_columns)])
        area = sizes[2] * sizes[3]
        for cat in self.categories:
            self.images_with[cat] += bool(cells.get(cat))
        for cat, found in [*pixels.by_category.items(), ("", pixels.overall)]:
            for n, px in sorted(found.items()):
                self.frequency[cat][n] = self.frequency[cat].get(n, 0) + 1
                self.cover[cat][n] = self.cover[cat].get(n, 0.0) + px / area

    def _coverage(self, cat: str, n: int) -> str:
        f = self.frequency[cat].get(n, 0)
        return f"{self.cover[cat].get(n, 0.0) / f if f else 0.0:.6f}"

    def write_tables(self, coverage: Mapping[str, Mapping[int, float]] | None = None) -> Path:
        """index.csv and the label tables; ``coverage[cat][number]`` sets a coverage by hand
        instead of measuring it."""
        given = {c: dict(v) for c, v in (coverage or {}).items()}
        write_csv(self.root / "index.csv", FIXED_COLUMNS + self.index_columns, self.rows)
        write_csv(self.root / "category.csv", ["name", "first", "last", "count", "frequency"],
                  [[c, min(self.listed[c], default=0), max(self.listed[c], default=0),
                    len(self.listed[c]), self.images_with[c]] for c in self.categories])
        rows: list[list[object]] = [[0, "-", "", 0, 0, ""]]
        for n in sorted(self.names):
            cats = ";".join(f"{c}({self.frequency[c].get(n, 0)})" for c in self.categories
                            if n in self.listed[c])
            rows.append([n, self.names[n], cats, self.frequency[""].get(n, 0),
                         self._coverage("", n), ""])
        write_csv(self.root / "label.csv",
                  ["number", "name", "category", "frequency", "coverage", "syns"], rows)
        for cat in self.categories:
            members = [[code, n, self.names[n], self.frequency[cat].get(n, 0),
                        repr(float(given[cat][n])) if n in given.get(cat, {})
                        else self._coverage(cat, n)]
                       for code, n in enumerate(self.listed[cat], start=1)]
            write_csv(self.root / f"c_{cat}.csv",
                      ["code", "number", "name", "frequency", "coverage"], members)
        return self.root
