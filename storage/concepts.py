"""Concept store: every label plane of a Broden dataset decoded once into Zarr.

Contract (a Zarr v3 group, ``<workdir>/concepts/<dataset-id>.zarr``):

- ``pixel_labels``  int32 (image, plane, y, x): label numbers (R + 256·G) of every pixel
  plane of the image, all categories, planes packed from slot 0, zero-filled after.
- ``plane_category`` int8 (image, plane): index into ``attrs['categories']``, -1 = empty slot.
- ``image_labels``  int32 (image, slot): image-level label numbers, 0 = empty slot.
- ``image_label_category`` int8 (image, slot): category index, -1 = empty slot.
- ``image``  str (image,): index.csv image paths in row order.
- ``progress/blocks_done`` uint8 (block,): 1 once a block of images is fully written (resume marker).
- attributes: ``fingerprint`` (of the dataset CSVs), ``categories``, ``labels`` (number,
  name, coverage and frequency per category), sizes, ``block_size``.

Arrays are chunked by image blocks and Zstd-compressed; each block is written by exactly one
task, so concurrent builders never share a chunk.  Completeness and currency are the artifact
layer's (:func:`store_artifact`): partial while blocks are written, complete after the last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from storage import blocks
from storage.artifacts import Artifact
from storage.broden import BrodenDataset, ImageRecord, LabelInfo
from storage.broden_images import ImagesFolder, plane_rgb
from storage.errors import BrodenFormatError

FORMAT_VERSION = 3
PROGRESS = "blocks_done"
ARRAYS = ("pixel_labels", "plane_category", "image_labels", "image_label_category")


@dataclass(frozen=True)
class ConceptBlock:
    """The decoded labels of a contiguous or gathered set of images."""

    pixel_labels: np.ndarray  # (B, P, sh, sw) int32
    plane_category: np.ndarray  # (B, P) int8
    image_labels: np.ndarray  # (B, Q) int32
    image_label_category: np.ndarray  # (B, Q) int8


class ConceptStore(blocks.BlockStore):
    """Read access to a finished concept store."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        attrs = self.attrs
        self.categories: list[str] = list(attrs["categories"])
        self.sh, self.sw = int(attrs["sh"]), int(attrs["sw"])
        self.ih, self.iw = int(attrs["ih"]), int(attrs["iw"])
        self.fingerprint: str = attrs["fingerprint"]
        self.labels: dict[int, LabelInfo] = {
            int(d["number"]): LabelInfo(int(d["number"]), d["name"], d["coverage"], d["frequency"])
            for d in attrs["labels"]
        }

    @property
    def perturbation(self) -> str:
        return str(self.attrs.get("perturbation", "none"))

    @property
    def complete(self) -> bool:
        return store_artifact(self.path, self.fingerprint, self.perturbation).is_current()

    @cached_property
    def _arrays(self) -> tuple[zarr.Array, ...]:
        """The four label arrays in ConceptBlock order, opened once for every block read."""
        return tuple(self.group[name] for name in
                     ("pixel_labels", "plane_category", "image_labels", "image_label_category"))

    def read_block(self, start: int, stop: int) -> ConceptBlock:
        return ConceptBlock(*(blocks.read_rows(array, start, stop) for array in self._arrays))

    def read_rows(self, rows: np.ndarray) -> ConceptBlock:
        """Gather arbitrary image rows (used when a concept set is matched to a cache)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_rows = rows[order]
        return ConceptBlock(*(array.get_orthogonal_selection((sorted_rows,))[inverse]
                              for array in self._arrays))


def plane_slots(images: list[ImageRecord]) -> tuple[int, int]:
    """(max pixel planes, max image-level labels) over all images, at least 1 each."""
    planes = max((sum(len(v) for v in r.planes.values()) for r in images), default=0)
    scalars = max((sum(len(v) for v in r.scalars.values()) for r in images), default=0)
    return max(planes, 1), max(scalars, 1)


def create_store(path: Path, dataset: BrodenDataset, block_size: int,
                 perturbation: str = "none") -> None:
    """Create empty arrays and attributes (not yet complete)."""
    ih, iw, sh, sw = dataset.uniform_sizes()
    n = len(dataset.images)
    n_planes, n_scalars = plane_slots(dataset.images)
    group = zarr.open_group(str(path), mode="w")
    common = {"compressors": blocks.compressors()}
    group.create_array(
        "pixel_labels", shape=(n, n_planes, sh, sw), chunks=(block_size, n_planes, sh, sw),
        dtype="int32", fill_value=0, dimension_names=["image", "plane", "y", "x"], **common,
    )
    group.create_array(
        "plane_category", shape=(n, n_planes), chunks=(block_size, n_planes), dtype="int8",
        fill_value=-1, dimension_names=["image", "plane"], **common,
    )
    group.create_array(
        "image_labels", shape=(n, n_scalars), chunks=(block_size, n_scalars), dtype="int32",
        fill_value=0, dimension_names=["image", "slot"], **common,
    )
    group.create_array(
        "image_label_category", shape=(n, n_scalars), chunks=(block_size, n_scalars),
        dtype="int8", fill_value=-1, dimension_names=["image", "slot"], **common,
    )
    blocks.create_image_coordinate(group, [r.image for r in dataset.images])
    blocks.create_progress(group, PROGRESS, blocks.n_blocks(n, block_size))
    group.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": dataset.fingerprint(),
            "source": str(dataset.root),
            "categories": dataset.all_categories,
            "labels": [
                {"number": lab.number, "name": lab.name, "coverage": lab.coverage,
                 "frequency": lab.frequency}
                for lab in dataset.labels.values()
            ],
            "n_images": n, "ih": ih, "iw": iw, "sh": sh, "sw": sw,
            "block_size": block_size, "perturbation": perturbation,
        }
    )
    store_artifact(path, dataset.fingerprint(), perturbation).begin()


def missing_blocks(path: Path) -> list[int]:
    return blocks.missing_blocks(path, PROGRESS)


def store_artifact(path: Path, fingerprint: str, perturbation: str = "none") -> Artifact:
    """The concept store as an artifact: made from the dataset CSVs with this fingerprint
    (and the label planes moved by a geometric perturbation, when one is named)."""
    made_by = {"format": FORMAT_VERSION, "dataset": fingerprint}
    if perturbation != "none":
        made_by["perturbation"] = perturbation
    return Artifact(Path(path), made_by)


def decode_block(
    images_dir: Path,
    records: list[ImageRecord],
    categories: list[str],
    listed: dict[str, frozenset[int]],
    n_planes: int,
    n_scalars: int,
) -> ConceptBlock:
    """Decode the label planes of ``records``; validates every label number: each must be
    listed in its plane's c_<cat>.csv (0: unlabelled).  The first offending plane is named,
    category by category, after every plane of the block has been read."""
    from storage.label_planes import allowed_table, labels_into

    b = len(records)
    sh, sw = records[0].sh, records[0].sw
    pixel = np.zeros((b, n_planes, sh, sw), dtype=np.int32)
    plane_cat = np.full((b, n_planes), -1, dtype=np.int8)
    scal = np.zeros((b, n_scalars), dtype=np.int32)
    scal_cat = np.full((b, n_scalars), -1, dtype=np.int8)
    folder = ImagesFolder(images_dir)
    allowed = [allowed_table(listed[cat]) for cat in categories]
    unlisted: list[tuple[int, int, str, ImageRecord, int]] = []  # (category, ..., number)
    for i, rec in enumerate(records):
        slot = 0
        qslot = 0
        for ci, cat in enumerate(categories):
            for rel in rec.planes.get(cat, ()):
                plane_path = folder.checked(rel, rec.line)
                rgb = plane_rgb(plane_path, (rec.sh, rec.sw), rec.line)
                number = labels_into(rgb, pixel[i, slot], allowed[ci])
                if number >= 0:
                    unlisted.append((ci, len(unlisted), plane_path, rec, number))
                plane_cat[i, slot] = ci
                slot += 1
            for number in rec.scalars.get(cat, ()):
                scal[i, qslot] = number
                scal_cat[i, qslot] = ci
                qslot += 1
    if unlisted:
        ci, _, plane_path, rec, number = min(unlisted, key=lambda u: u[:2])
        raise BrodenFormatError(
            f"{plane_path} (index.csv line {rec.line}): label {number} is not "
            f"in label.csv or not listed in c_{categories[ci]}.csv"
        )
    return ConceptBlock(pixel, plane_cat, scal, scal_cat)


def write_block(
    path: Path,
    images_dir: Path,
    records: list[ImageRecord],
    block_index: int,
    categories: list[str],
    listed: dict[str, frozenset[int]],
    planes_hook: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> int:
    """Decode and write one image block, then mark it done. Returns the number of images.
    ``planes_hook(planes, rows)`` may rewrite the decoded pixel planes first (a geometric
    perturbation moving the labels with the images)."""
    group, arrays = blocks.open_for_writing(path, ARRAYS)
    n_planes, n_scalars = arrays[0].shape[1], arrays[2].shape[1]
    block = decode_block(images_dir, records, categories, listed, n_planes, n_scalars)
    if planes_hook is not None:
        rows = np.array([r.row for r in records])
        block = ConceptBlock(planes_hook(block.pixel_labels, rows), block.plane_category,
                             block.image_labels, block.image_label_category)
    for name, array in zip(ARRAYS, arrays, strict=True):
        blocks.write_rows(array, records[0].row, getattr(block, name))
    blocks.mark_block_done(group, PROGRESS, block_index)
    return len(records)


def listed_labels(dataset: BrodenDataset) -> dict[str, frozenset[int]]:
    """Labels each category's c_<cat>.csv lists: the only ones allowed in its planes."""
    return {
        cat: frozenset(n for n, lab in dataset.labels.items() if cat in lab.coverage)
        for cat in dataset.all_categories
    }
