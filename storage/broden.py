"""Reader for Broden-format label directories (SEMANTICS.md §3).

A Broden directory holds ``index.csv``, ``category.csv``, ``label.csv``, one
``c_<category>.csv`` per category and an ``images/`` folder.  Every path inside
``index.csv`` is relative to ``images/``.  The reader validates everything it can
without decoding images; plane decoding (and its checks) happens in
:func:`decode_plane`, which the concept store calls once per plane.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from storage.broden_images import safe_relative_path
from storage.errors import BrodenFormatError, UnknownLabelError

SIZE_COLUMNS = ("ih", "iw", "sh", "sw")
FIXED_COLUMNS = ("image", "split", *SIZE_COLUMNS)


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``index.csv``."""

    row: int  # 0-based data row (the image's position in the dataset)
    line: int  # 1-based line in index.csv, for error messages
    image: str  # path relative to images/
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    planes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # category -> PNG paths
    scalars: dict[str, tuple[int, ...]] = field(default_factory=dict)  # category -> labels


@dataclass(frozen=True)
class LabelInfo:
    """One label of ``label.csv`` with its per-category coverage from ``c_<cat>.csv``."""

    number: int
    name: str
    coverage: dict[str, float]  # category -> coverage, only categories listing the label
    frequency: dict[str, int]  # category -> image frequency


class LabelTable(NamedTuple):
    """Every category (category.csv order) and every label with its coverage: what a label
    space is made from."""

    categories: list[str]
    labels: dict[int, LabelInfo]


@dataclass
class BrodenDataset:
    """A parsed Broden directory restricted to a selection of categories."""

    root: Path
    all_categories: list[str]  # category.csv order
    categories: list[str]  # selected, in category.csv order
    labels: dict[int, LabelInfo]  # every label of label.csv except 0
    images: list[ImageRecord]

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def label_table(self) -> LabelTable:
        return LabelTable(self.all_categories, self.labels)

    def primary_category(self, number: int) -> str | None:
        """Primary category among the selected ones (highest coverage, tie -> later)."""
        return primary_category(self.labels[number].coverage, self.categories)

    def scored_labels(self) -> list[int]:
        """Label numbers listed in at least one selected category, ascending."""
        return sorted(n for n in self.labels if self.primary_category(n) is not None)

    def fingerprint(self) -> str:
        """Hash of every CSV that defines the dataset (not the images themselves)."""
        return dataset_fingerprint(self.root, self.all_categories)

    def uniform_sizes(self) -> tuple[int, int, int, int]:
        """(ih, iw, sh, sw) shared by every image; an error names the first row that differs."""
        if not self.images:
            raise BrodenFormatError(f"{self.root / 'index.csv'}: no images")
        first = self.images[0]
        sizes = (first.ih, first.iw, first.sh, first.sw)
        for rec in self.images:
            if (rec.ih, rec.iw, rec.sh, rec.sw) != sizes:
                raise BrodenFormatError(
                    f"{self.root / 'index.csv'} line {rec.line}: sizes ih,iw,sh,sw = "
                    f"{rec.ih},{rec.iw},{rec.sh},{rec.sw} differ from line {first.line} "
                    f"({','.join(map(str, sizes))}); this tool needs one image size per dataset"
                )
        return sizes


def primary_category(coverage: dict[str, float], selected: list[str]) -> str | None:
    """SEMANTICS.md §3: the selected category with the highest coverage; ties go later.

    Only categories whose ``c_<cat>.csv`` lists the label are candidates; a label listed
    in no selected category has no primary category and is not scored.
    """
    best: str | None = None
    best_cov = -math.inf
    for cat in selected:  # selected is in category.csv order, so >= lets the later one win
        if cat in coverage and coverage[cat] >= best_cov:
            best, best_cov = cat, coverage[cat]
    return best


def read_csv_rows(
    path: Path,
) -> tuple[list[str], list[tuple[int, list[str]]], list[BrodenFormatError]]:
    """Header, well-formed data rows (with their 1-based lines) and one error per row whose
    field count differs from the header's. A missing, empty or undecodable file raises.

    Why lenient: ``stage=check`` reports every malformed row, not just the first. The strict
    readers raise the first error of a scan; a scan lists malformed rows first, then the
    errors inside well-formed rows, which is the order the strict readers always had.
    """
    if not path.is_file():
        raise BrodenFormatError(f"{path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise BrodenFormatError(f"{path}: empty file, expected a header line")
            rows = [(reader.line_num, row) for row in reader if row]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise BrodenFormatError(f"{path}: not a readable CSV file ({exc})") from None
    header = [h.strip() for h in header]
    good, errors = [], []
    for line, row in rows:
        if len(row) != len(header):
            errors.append(
                BrodenFormatError(
                    f"{path} line {line}: {len(row)} fields, expected {len(header)} ({','.join(header)})"
                )
            )
        else:
            good.append((line, row))
    return header, good, errors


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    header, rows, errors = read_csv_rows(path)
    if errors:
        raise errors[0]
    return header, rows


def _require_columns(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise BrodenFormatError(f"{path}: missing column(s) {', '.join(missing)}")


def _require_columns_after(
    path: Path, header: list[str], needed: tuple[str, ...], errors: list[BrodenFormatError]
) -> None:
    """Missing columns make a file unusable; raise, but an earlier malformed row first."""
    try:
        _require_columns(path, header, needed)
    except BrodenFormatError as exc:
        raise (errors[0] if errors else exc) from None


def _int(path: Path, line: int, column: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise BrodenFormatError(
            f"{path} line {line}, column {column!r}: {text!r} is not an integer"
        ) from None


def _float(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text.strip()) if text.strip() else 0.0
    except ValueError:
        raise BrodenFormatError(
            f"{path} line {line}, column {column!r}: {text!r} is not a number"
        ) from None


def scan_categories(root: Path) -> tuple[list[str], list[BrodenFormatError]]:
    """category.csv names (empty names skipped) and the problems found; a file that cannot
    be read at all raises."""
    path = root / "category.csv"
    header, rows, errors = read_csv_rows(path)
    _require_columns_after(path, header, ("name",), errors)
    col = header.index("name")
    names = []
    for line, row in rows:
        name = row[col].strip()
        if name:
            names.append(name)
        else:
            errors.append(BrodenFormatError(f"{path} line {line}: empty category name"))
    return names, errors


def read_categories(root: Path) -> list[str]:
    names, errors = scan_categories(root)
    if errors:
        raise errors[0]
    return names


def scan_labels(
    root: Path, categories: list[str]
) -> tuple[dict[int, LabelInfo], list[BrodenFormatError]]:
    """label.csv names plus coverage/frequency of every c_<cat>.csv of ``categories``, and
    every problem found (bad rows are skipped, a missing c_<cat>.csv lists nothing). Only a
    label.csv that cannot be read at all raises."""
    path = root / "label.csv"
    header, rows, errors = read_csv_rows(path)
    _require_columns_after(path, header, ("number", "name"), errors)
    num_col, name_col = header.index("number"), header.index("name")
    names: dict[int, str] = {}
    for line, row in rows:
        try:
            number = _int(path, line, "number", row[num_col])
        except BrodenFormatError as exc:
            errors.append(exc)
            continue
        if number in names:
            errors.append(BrodenFormatError(f"{path} line {line}: label number {number} listed twice"))
            continue
        names[number] = row[name_col].strip()
    coverage: dict[int, dict[str, float]] = {n: {} for n in names}
    frequency: dict[int, dict[str, int]] = {n: {} for n in names}
    for cat in categories:
        cpath = root / f"c_{cat}.csv"
        try:
            cheader, crows, cerrors = read_csv_rows(cpath)
            _require_columns_after(cpath, cheader, ("number",), cerrors)
        except BrodenFormatError as exc:
            errors.append(exc)
            continue
        errors.extend(cerrors)
        ncol = cheader.index("number")
        cov_col = cheader.index("coverage") if "coverage" in cheader else None
        freq_col = cheader.index("frequency") if "frequency" in cheader else None
        for line, row in crows:
            try:
                number = _int(cpath, line, "number", row[ncol])
                if number == 0:
                    continue
                if number not in names:
                    raise UnknownLabelError(
                        f"{cpath} line {line}: label number {number} is not in label.csv"
                    )
                cov = _float(cpath, line, "coverage", row[cov_col]) if cov_col is not None else 0.0
                freq = (
                    int(_float(cpath, line, "frequency", row[freq_col]))
                    if freq_col is not None
                    else 0
                )
            except BrodenFormatError as exc:
                errors.append(exc)
                continue
            coverage[number][cat] = cov
            frequency[number][cat] = freq
    labels = {
        n: LabelInfo(n, names[n], coverage[n], frequency[n]) for n in sorted(names) if n != 0
    }
    return labels, errors


def read_labels(root: Path, categories: list[str]) -> dict[int, LabelInfo]:
    """label.csv names plus coverage/frequency of every c_<cat>.csv of ``categories``."""
    labels, errors = scan_labels(root, categories)
    if errors:
        raise errors[0]
    return labels


def read_broden(root: str | Path, categories: list[str] | None = None) -> BrodenDataset:
    """Parse and validate a Broden directory; ``categories`` selects a subset (default all)."""
    root = Path(root)
    if not root.is_dir():
        raise BrodenFormatError(f"{root}: dataset directory not found")
    all_categories = read_categories(root)
    if categories is None:
        selected = list(all_categories)
    else:
        unknown = [c for c in categories if c not in all_categories]
        if unknown:
            raise BrodenFormatError(
                f"unknown category {unknown[0]!r}: {root / 'category.csv'} lists "
                f"{', '.join(all_categories)}"
            )
        selected = [c for c in all_categories if c in categories]
    labels = read_labels(root, all_categories)
    images = read_index(root, all_categories, selected, labels)
    return BrodenDataset(root, all_categories, selected, labels, images)


def read_index(
    root: Path, all_categories: list[str], selected: list[str], labels: dict[int, LabelInfo]
) -> list[ImageRecord]:
    path = root / "index.csv"
    header, rows = _read_csv(path)
    _require_columns(path, header, FIXED_COLUMNS)
    extra = [c for c in header if c not in FIXED_COLUMNS]
    for col in extra:
        if col not in all_categories:
            raise BrodenFormatError(
                f"{path}: column {col!r} is not a category of {root / 'category.csv'}"
            )
    pos = {c: header.index(c) for c in header}
    images: list[ImageRecord] = []
    for row_index, (line, row) in enumerate(rows):
        image = parse_image_path(path, line, row[pos["image"]])
        sizes = parse_sizes(path, line, [row[pos[c]] for c in SIZE_COLUMNS])
        planes: dict[str, tuple[str, ...]] = {}
        scalars: dict[str, tuple[int, ...]] = {}
        for cat in selected:
            if cat not in pos:
                continue
            cat_planes, cat_scalars = parse_label_cell(path, line, cat, row[pos[cat]], labels)
            if cat_planes:
                planes[cat] = cat_planes
            if cat_scalars:
                scalars[cat] = cat_scalars
        images.append(
            ImageRecord(
                row_index, line, image, row[pos["split"]].strip(), *sizes, planes, scalars
            )
        )
    return images


def parse_image_path(path: Path, line: int, text: str) -> str:
    """The ``image`` cell of index.csv ``line``: a path inside images/."""
    image = text.strip()
    if not image:
        raise BrodenFormatError(f"{path} line {line}: empty image path")
    return safe_relative_path(path, line, "image", image)


def parse_sizes(path: Path, line: int, cells: list[str]) -> tuple[int, int, int, int]:
    """The ``ih, iw, sh, sw`` cells of index.csv ``line``: positive integers."""
    sizes = [_int(path, line, c, text) for c, text in zip(SIZE_COLUMNS, cells, strict=True)]
    if min(sizes) <= 0:
        raise BrodenFormatError(f"{path} line {line}: sizes must be positive, got {sizes}")
    ih, iw, sh, sw = sizes
    return ih, iw, sh, sw


def parse_label_cell(
    path: Path, line: int, cat: str, cell: str, labels: dict[int, LabelInfo]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """One category cell of index.csv ``line``: (PNG paths, image-level label numbers).

    Image-level labels must be in label.csv and listed in ``c_<cat>.csv``."""
    cat_planes: list[str] = []
    cat_scalars: list[int] = []
    for entry in (e.strip() for e in cell.strip().split(";")):
        if not entry:
            continue
        if entry.lower().endswith(".png"):
            cat_planes.append(safe_relative_path(path, line, cat, entry))
            continue
        try:
            number = int(entry)
        except ValueError:
            raise BrodenFormatError(
                f"{path} line {line}, column {cat!r}: {entry!r} is neither a .png "
                "path nor a label number"
            ) from None
        if number not in labels:
            raise UnknownLabelError(
                f"{path} line {line}, column {cat!r}: label {number} is not in label.csv"
            )
        if cat not in labels[number].coverage:
            raise UnknownLabelError(
                f"{path} line {line}, column {cat!r}: label {number} "
                f"({labels[number].name}) is not listed in c_{cat}.csv"
            )
        cat_scalars.append(number)
    return tuple(cat_planes), tuple(cat_scalars)


def dataset_fingerprint(root: Path, categories: list[str]) -> str:
    """sha256 over index.csv, category.csv, label.csv and every c_<cat>.csv."""
    digest = hashlib.sha256()
    for name in ["index.csv", "category.csv", "label.csv", *[f"c_{c}.csv" for c in categories]]:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def index_fingerprint(root: Path) -> str:
    """sha256 of index.csv alone: what activations depend on."""
    return hashlib.sha256((root / "index.csv").read_bytes()).hexdigest()
