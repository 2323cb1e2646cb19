"""Build tiny Broden-format directories (SEMANTICS.md §3) from Python data, for tests.

Usage::

    b = BrodenBuilder(tmp_path / "ds", categories=["object", "part", "scene"], sh=4, sw=4)
    b.label(1, "car", object=0.5)
    b.label(300, "wheel", part=0.1, object=0.02)   # listed in two c_<cat>.csv files
    b.label(12, "street", scene=1.0)
    b.image(planes={"object": [arr]}, scalars={"scene": [12]})
    root = b.write()

Label planes are int arrays of label numbers; they are written as RGB PNGs with
R = n % 256, G = n // 256 (so numbers up to 65535 fit).  Every generated path lives under
``images/``.  ``cells`` overrides a raw index.csv cell for malformed-input tests, and
``index_columns`` sets the category column order of index.csv independently of
category.csv.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

INDEX_FIXED = ["image", "split", "ih", "iw", "sh", "sw"]


def encode_plane(labels: np.ndarray) -> np.ndarray:
    """(H, W) label numbers -> (H, W, 3) uint8 with R + 256·G = number, B = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"a label plane must be 2-D, got shape {labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("label numbers must lie in 0..65535")
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[..., 0] = labels & 0xFF
    out[..., 1] = (labels >> 8) & 0xFF
    return out


def save_plane(path: Path, labels: np.ndarray) -> Path:
    """Write a label plane PNG (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_plane(labels)).save(path, format="PNG")
    return path


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """Write a small deterministic RGB image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[str(v) for v in row] for row in rows])
    return path


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
        root = self.root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self._write_category_csv()
        self._write_label_csv()
        for cat in self.categories:
            self._write_c_csv(cat)
        self._write_index_and_images()
        return root

    def _write_category_csv(self) -> None:
        rows = []
        for cat in self.categories:
            nums = sorted(self.coverage[cat]) or [0]
            rows.append([cat, nums[0], nums[-1], len(self.coverage[cat]), len(self.images)])
        write_csv(self.root / "category.csv", ["name", "first", "last", "count", "frequency"], rows)

    def _write_label_csv(self) -> None:
        rows: list[list[object]] = [[0, "-", "", 0, 0, ""]]
        for n in sorted(self.labels):
            cats = ";".join(f"{c}(1)" for c in self.categories if n in self.coverage[c])
            rows.append([n, self.labels[n], cats, 1, 0.5, ""])
        header = ["number", "name", "category", "frequency", "coverage", "syns"]
        write_csv(self.root / "label.csv", header, rows)

    def _write_c_csv(self, cat: str) -> None:
        rows = [
            [code, n, self.labels[n], 1, repr(cov)]
            for code, (n, cov) in enumerate(sorted(self.coverage[cat].items()), start=1)
        ]
        header = ["code", "number", "name", "frequency", "coverage"]
        write_csv(self.root / f"c_{cat}.csv", header, rows)

    def _write_index_and_images(self) -> None:
        images_dir = self.root / "images"
        rows = []
        for row, spec in enumerate(self.images):
            save_rgb(images_dir / spec.name, self.ih, self.iw, seed=row)
            stem = spec.name.rsplit(".", 1)[0]
            cells = []
            for cat in self.index_columns:
                paths = []
                for k, plane in enumerate(spec.planes.get(cat, [])):
                    rel = f"{stem}_{cat}_{k + 1}.png"
                    save_plane(images_dir / rel, plane)
                    paths.append(rel)
                spec.plane_paths[cat] = paths
                entries = paths + [str(v) for v in spec.scalars.get(cat, [])]
                cells.append(spec.cells.get(cat, ";".join(entries)))
            rows.append([spec.name, spec.split, self.ih, self.iw, self.sh, self.sw, *cells])
        write_csv(self.root / "index.csv", INDEX_FIXED + self.index_columns, rows)

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
