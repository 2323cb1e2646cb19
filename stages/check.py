"""Check stage: validate a whole Broden-format directory and take its census.

Why a stage of its own: the reader used by the pipeline stops at the first problem and
decodes label planes only when it builds the concept store, so a damaged download or a
hand-made dataset would surface one error at a time, late. ``check_dataset`` reads every
CSV leniently (``storage.broden`` scanners, the same messages as the reader), decodes every
image and label PNG once (streamed, optionally on threads), and reports every problem it
finds, each as one line naming the file and row, together with a census of what is there.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from storage.broden import (
    FIXED_COLUMNS,
    SIZE_COLUMNS,
    LabelInfo,
    parse_image_path,
    parse_label_cell,
    parse_sizes,
    read_csv_rows,
    scan_categories,
    scan_labels,
)
from storage.broden_images import dataset_file, decode_plane, load_image
from storage.errors import (
    BrodenFormatError,
    MissingFileError,
    SizeMismatchError,
    UnknownLabelError,
    UnsafePathError,
)

# Problem kinds, in the order the report lists them.
KINDS = ("csv", "path", "duplicate", "missing", "unreadable", "size", "label")
_WINDOW = 256  # rows whose files are in flight at once: bounded memory on any dataset size


@dataclass(frozen=True)
class Problem:
    """One thing to fix: ``text`` is one line naming the file (and index.csv row)."""

    kind: str  # one of KINDS
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Census:
    """What the dataset holds, counted from its files (per category in category.csv order)."""

    categories: list[str] = field(default_factory=list)
    images: int = 0  # index.csv rows with the right number of fields
    splits: dict[str, int] = field(default_factory=dict)
    labels: int = 0  # label.csv numbers except 0
    labels_per_category: dict[str, int] = field(default_factory=dict)  # listed in c_<cat>.csv
    multi_category_labels: dict[int, tuple[str, ...]] = field(default_factory=dict)
    images_with_category: dict[str, int] = field(default_factory=dict)  # non-empty cell
    planes_per_category: dict[str, int] = field(default_factory=dict)  # PNG entries
    max_planes_per_image: dict[str, int] = field(default_factory=dict)
    image_labels_per_category: dict[str, int] = field(default_factory=dict)  # numeric entries
    pixel_labels_seen: dict[str, int] = field(default_factory=dict)  # distinct, decoded planes
    image_sizes: dict[tuple[int, int, int, int], int] = field(default_factory=dict)  # ih,iw,sh,sw


@dataclass
class CheckResult:
    """Census plus problems (the first ``max_problems`` kept; ``problem_counts`` counts all)."""

    root: Path
    census: Census
    problems: list[Problem]
    problem_counts: dict[str, int]
    decoded: bool  # False: files were checked for presence only, not decoded

    @property
    def ok(self) -> bool:
        return not self.problem_counts

    @property
    def n_problems(self) -> int:
        return sum(self.problem_counts.values())


@dataclass(frozen=True)
class _RowFiles:
    """The files of one index.csv row, to check off the main thread."""

    line: int
    image: str
    size: tuple[int, int, int, int]  # ih, iw, sh, sw
    planes: tuple[tuple[str, str], ...]  # (category, path)


class _Problems:
    def __init__(self, limit: int) -> None:
        self.kept: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self.limit = limit

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.kept) < self.limit:
            self.kept.append(Problem(kind, text))

    def add_error(self, exc: BrodenFormatError) -> None:
        self.add(_kind(exc), str(exc))


def check_dataset(
    root: str | Path,
    *,
    decode: bool = True,
    workers: int | None = None,
    progress: bool = True,
    max_problems: int = 10_000,
) -> CheckResult:
    """Validate every file of the Broden directory ``root`` and count what it holds.

    ``decode=False`` only checks that referenced files exist (no pixel checks, no
    ``pixel_labels_seen``). ``workers`` threads decode files (default: up to 8, one per
    core). Only a missing ``root`` raises; everything else is a :class:`Problem`.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingFileError(f"{root}: dataset directory not found")
    problems = _Problems(max_problems)
    census = Census()

    try:
        categories, errors = scan_categories(root)
    except BrodenFormatError as exc:
        categories, errors = [], [exc]
    for exc in errors:
        problems.add_error(exc)
    for name, count in Counter(categories).items():
        if count > 1:
            problems.add("csv", f"{root / 'category.csv'}: category {name!r} listed {count} times")
    categories = list(dict.fromkeys(categories))
    census.categories = categories

    try:
        labels, errors = scan_labels(root, categories)
        labels_known = True
    except BrodenFormatError as exc:
        labels, errors, labels_known = {}, [exc], False
    for exc in errors:
        problems.add_error(exc)
    _count_labels(census, labels, categories)

    jobs = _check_index(root, categories, labels, labels_known, census, problems)
    images_dir = root / "images"
    if not images_dir.is_dir():
        problems.add("missing", f"{images_dir}: folder not found; no image or label file checked")
        jobs = []
    seen = _check_files(
        images_dir, jobs, labels if labels_known else None, decode, workers, progress, problems
    )
    if decode:
        census.pixel_labels_seen = {c: len(seen.get(c, ())) for c in categories}
    return CheckResult(root, census, problems.kept, dict(problems.counts), decode)


def _kind(exc: BrodenFormatError) -> str:
    if isinstance(exc, UnsafePathError):
        return "path"
    if isinstance(exc, UnknownLabelError):
        return "label"
    if isinstance(exc, MissingFileError):
        return "missing"
    if isinstance(exc, SizeMismatchError):
        return "size"
    return "csv"


def _count_labels(census: Census, labels: dict[int, LabelInfo], categories: list[str]) -> None:
    census.labels = len(labels)
    census.labels_per_category = {
        c: sum(1 for info in labels.values() if c in info.coverage) for c in categories
    }
    census.multi_category_labels = {
        n: tuple(c for c in categories if c in info.coverage)
        for n, info in labels.items()
        if len(info.coverage) > 1
    }


def _check_index(
    root: Path,
    categories: list[str],
    labels: dict[int, LabelInfo],
    labels_known: bool,
    census: Census,
    problems: _Problems,
) -> list[_RowFiles]:
    """Parse every index.csv row cell by cell; returns the files each good row refers to."""
    path = root / "index.csv"
    try:
        header, rows, malformed = read_csv_rows(path)
    except BrodenFormatError as exc:
        problems.add_error(exc)
        return []
    for exc in malformed:
        problems.add_error(exc)
    missing = [c for c in FIXED_COLUMNS if c not in header]
    if missing:
        problems.add("csv", f"{path}: missing column(s) {', '.join(missing)}; rows not checked")
        return []
    for col in header:
        if col not in FIXED_COLUMNS and col not in categories:
            problems.add(
                "csv", f"{path}: column {col!r} is not a category of {root / 'category.csv'}"
            )
    pos = {c: header.index(c) for c in header}
    columns = [c for c in categories if c in pos]
    for cat in categories:
        for key in (
            "images_with_category",
            "planes_per_category",
            "max_planes_per_image",
            "image_labels_per_category",
        ):
            getattr(census, key)[cat] = 0
    splits: Counter[str] = Counter()
    sizes_seen: Counter[tuple[int, int, int, int]] = Counter()
    first_line: dict[str, int] = {}
    jobs: list[_RowFiles] = []
    for line, row in rows:
        census.images += 1
        splits[row[pos["split"]].strip()] += 1
        image = size = None
        try:
            image = parse_image_path(path, line, row[pos["image"]])
        except BrodenFormatError as exc:
            problems.add_error(exc)
        if image is not None:
            if image in first_line:
                problems.add(
                    "duplicate",
                    f"{path} line {line}: image {image!r} is already listed on line {first_line[image]}",
                )
            else:
                first_line[image] = line
        try:
            size = parse_sizes(path, line, [row[pos[c]] for c in SIZE_COLUMNS])
            sizes_seen[size] += 1
        except BrodenFormatError as exc:
            problems.add_error(exc)
        planes: list[tuple[str, str]] = []
        for cat in columns:
            cell = row[pos[cat]]
            if not cell.strip():
                continue
            census.images_with_category[cat] += 1
            try:
                cat_planes, cat_scalars = parse_label_cell(path, line, cat, cell, labels)
            except UnknownLabelError as exc:
                if labels_known:  # without a readable label.csv every label would be "unknown"
                    problems.add_error(exc)
                continue
            except BrodenFormatError as exc:
                problems.add_error(exc)
                continue
            census.planes_per_category[cat] += len(cat_planes)
            census.max_planes_per_image[cat] = max(
                census.max_planes_per_image[cat], len(cat_planes)
            )
            census.image_labels_per_category[cat] += len(cat_scalars)
            planes.extend((cat, p) for p in cat_planes)
        if image is not None and size is not None:
            jobs.append(_RowFiles(line, image, size, tuple(planes)))
    census.splits = dict(sorted(splits.items()))
    census.image_sizes = dict(sizes_seen.most_common())
    if len(sizes_seen) > 1:
        listed = ", ".join(f"{size_text(s)} ({n} rows)" for s, n in sizes_seen.most_common(3))
        problems.add(
            "size",
            f"{path}: rows differ in sizes ih,iw,sh,sw: {listed}; this tool needs one image size per dataset",
        )
    return jobs


def _check_files(
    images_dir: Path,
    jobs: list[_RowFiles],
    labels: dict[int, LabelInfo] | None,
    decode: bool,
    workers: int | None,
    progress: bool,
    problems: _Problems,
) -> dict[str, set[int]]:
    """Check every row's files; returns the label numbers seen in each category's planes."""
    workers = workers or min(8, os.cpu_count() or 1)
    seen: dict[str, set[int]] = {}
    bar = tqdm(total=len(jobs), desc="check files", unit="img", disable=None if progress else True)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for window in _windows(jobs, _WINDOW):
            for found, row_seen in pool.map(
                lambda job: _check_row(images_dir, job, labels, decode), window
            ):
                for kind, text in found:
                    problems.add(kind, text)
                for cat, numbers in row_seen.items():
                    seen.setdefault(cat, set()).update(numbers)
                bar.update(1)
    return seen


def _windows(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_row(
    images_dir: Path,
    job: _RowFiles,
    labels: dict[int, LabelInfo] | None,
    decode: bool,
) -> tuple[list[tuple[str, str]], dict[str, set[int]]]:
    """Problems of one row's image and planes, and the label numbers its planes hold."""
    found: list[tuple[str, str]] = []
    seen: dict[str, set[int]] = {}
    ih, iw, sh, sw = job.size
    where = f" (index.csv line {job.line})"
    for cat, rel in ((None, job.image), *job.planes):
        try:
            path = dataset_file(images_dir, rel, job.line)
        except UnsafePathError as exc:
            found.append(("path", str(exc)))
            continue
        if not path.is_file():
            what = "image" if cat is None else "label image"
            found.append(("missing", f"{path}: {what} not found{where}"))
            continue
        if not decode:
            continue
        try:
            if cat is None:
                rgb = load_image(path, job.line)
                if rgb.shape[:2] != (ih, iw):
                    found.append(
                        (
                            "size",
                            f"{path}: size {rgb.shape[1]}x{rgb.shape[0]} (w x h) differs from index.csv iw x ih = {iw}x{ih}{where}",
                        )
                    )
                continue
            numbers = np.unique(decode_plane(path, (sh, sw), job.line))
        except SizeMismatchError as exc:
            found.append(("size", str(exc)))
            continue
        except BrodenFormatError as exc:  # present but not a decodable image
            found.append(("unreadable", str(exc)))
            continue
        numbers = [int(n) for n in numbers if n != 0]
        seen.setdefault(cat, set()).update(numbers)
        if labels is not None:
            found.extend(_plane_label_problems(path, cat, numbers, labels, where))
    return found, seen


def _plane_label_problems(
    path: Path, cat: str, numbers: list[int], labels: dict[int, LabelInfo], where: str
) -> list[tuple[str, str]]:
    unknown = [n for n in numbers if n not in labels]
    unlisted = [n for n in numbers if n in labels and cat not in labels[n].coverage]
    found = []
    if unknown:
        found.append(
            ("label", f"{path}: label number(s) {_first(unknown)} not in label.csv{where}")
        )
    if unlisted:
        names = ", ".join(f"{n} ({labels[n].name})" for n in unlisted[:5])
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        found.append(("label", f"{path}: label(s) {names}{more} not listed in c_{cat}.csv{where}"))
    return found


def _first(numbers: list[int], limit: int = 5) -> str:
    text = ", ".join(map(str, numbers[:limit]))
    return text + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def size_text(size: tuple[int, int, int, int]) -> str:
    ih, iw, sh, sw = size
    return f"{ih}x{iw} image, {sh}x{sw} labels"
