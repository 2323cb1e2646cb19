"""Build tiny Broden-format directories (SEMANTICS.md §3) from Python data, for tests.

Usage::

    b = BrodenBuilder(tmp_path / "ds", categories=["object", "part", "scene"], sh=4, sw=4)
    b.label(1, "car", object=0.5)
    b.label(300, "wheel", part=0.1, object=0.02)   # listed in two c_<cat>.csv files
    b.label(12, "street", scene=1.0)
    b.image(planes={"object": [arr]}, scalars={"scene": [12]})
    root = b.write()

Label planes are int arrays of label numbers, written by the project's Broden writer
(:mod:`storage.broden_writer`).  Every generated path lives under ``images/``.  ``cells`` overrides a raw index.csv cell for malformed-input tests, and
``index_columns`` sets the category column order of index.csv independently of
category.csv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from storage.broden_writer import BrodenWriter


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """Write a small deterministic RGB image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_rgb(h, w, seed)).save(path, format="PNG")
    return path


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@dataclass
class ImageSpec:
    """One index.csv row as the builder will write it."""

    name: str
    split: str
    planes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, list[int]] = field(default_factory=dict)
    cells: dict[str, str] = field(default_factory=dict)  # raw overrides per category
    plane_paths: dict[str, list[str]] = field(default_factory=dict)  # filled by write()


class BrodenBuilder:
    """Collects categories, labels, coverage and images; ``write()`` lays out the files."""

    def __init__(
        self,
        root: Path,
        categories: list[str],
        *,
        ih: int = 8,
        iw: int = 8,
        sh: int = 4,
        sw: int = 4,
        index_columns: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.categories = list(categories)  # category.csv order
        self.index_columns = list(index_columns) if index_columns is not None else list(categories)
        self.ih, self.iw, self.sh, self.sw = ih, iw, sh, sw
        self.labels: dict[int, str] = {}
        self.coverage: dict[str, dict[int, float]] = {c: {} for c in self.categories}
        self.images: list[ImageSpec] = []

    # ------------------------------------------------------------------ building
    def label(self, number: int, name: str, **coverage: float) -> BrodenBuilder:
        """Add a label; each keyword lists it in ``c_<category>.csv`` with that coverage."""
        if number <= 0:
            raise ValueError("label 0 is reserved for 'none'")
        self.labels[number] = name
        for cat, cov in coverage.items():
            if cat not in self.coverage:
                raise KeyError(f"unknown category {cat!r}")
            self.coverage[cat][number] = float(cov)
        return self

    def image(
        self,
        name: str | None = None,
        split: str = "train",
        planes: dict[str, list[np.ndarray]] | None = None,
        scalars: dict[str, list[int]] | None = None,
        cells: dict[str, str] | None = None,
    ) -> int:
        """Add an image; returns its row. Planes are (sh, sw) int arrays, listed per cell."""
        row = len(self.images)
        self.images.append(
            ImageSpec(
                name or f"img/{row:04d}.png",
                split,
                {c: [np.asarray(p) for p in ps] for c, ps in (planes or {}).items()},
                {c: list(v) for c, v in (scalars or {}).items()},
                dict(cells or {}),
            )
        )
        return row

    # ------------------------------------------------------------------ writing
    def write(self) -> Path:
        writer = BrodenWriter(self.root, self.categories, self.index_columns)
        for n in sorted(self.labels):
            writer.label(n, self.labels[n], [c for c in self.categories if n in self.coverage[c]])
        for row, spec in enumerate(self.images):
            stem = spec.name.rsplit(".", 1)[0]
            entries: dict[str, list] = {}
            for cat in self.index_columns:
                paths = [f"{stem}_{cat}_{k + 1}.png" for k in range(len(spec.planes.get(cat, [])))]
                spec.plane_paths[cat] = paths
                entries[cat] = [*zip(paths, spec.planes.get(cat, []), strict=True),
                                *(int(v) for v in spec.scalars.get(cat, []))]
            writer.add_image(spec.name, spec.split, (self.ih, self.iw, self.sh, self.sw),
                             entries, random_rgb(self.ih, self.iw, seed=row), spec.cells)
        return writer.write_tables(self.coverage)

    # ------------------------------------------------------------------ expectations
    def expected_packing(self) -> list[tuple[list[np.ndarray], list[int], list[int], list[int]]]:
        """Per image: (planes, plane category idx, image labels, image label category idx),
        packed in category.csv order, then cell order (the concept store's layout)."""
        out = []
        for spec in self.images:
            planes, pcat, scal, scat = [], [], [], []
            for ci, cat in enumerate(self.categories):
                for p in spec.planes.get(cat, []):
                    planes.append(np.asarray(p, dtype=np.int32))
                    pcat.append(ci)
                for v in spec.scalars.get(cat, []):
                    scal.append(int(v))
                    scat.append(ci)
            out.append((planes, pcat, scal, scat))
        return out


def rewrite_index_line(root: Path, line: int, text: str) -> None:
    """Replace 1-based ``line`` of index.csv with raw ``text`` (for malformed-row tests)."""
    path = Path(root) / "index.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def tree_mtimes(root: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every file under ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def run_files(workdir: Path) -> dict[str, int]:
    """:func:`tree_mtimes` of what a run makes, its log folder and lock files aside."""
    return {rel: mtime for rel, mtime in tree_mtimes(workdir).items()
            if "logs" not in Path(rel).parts and not rel.endswith(".lock")}
