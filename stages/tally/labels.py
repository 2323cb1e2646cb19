"""Scored labels and their dense numbering (SEMANTICS.md §3), and the labels of a block as
the tally reads them.

Shared by the IoU tally, the signatures (formulas, explanations) and the pipeline's plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from storage.broden import LabelInfo, primary_category
from storage.concepts import ConceptBlock
from storage.errors import UserError


class LabelSource(Protocol):
    """What a label space is made from: a concept store, or a dataset's label tables."""

    categories: list[str]  # every category, category.csv order
    labels: dict[int, LabelInfo]


@dataclass(frozen=True)
class LabelSpace:
    """Dense numbering of the scored labels: index 0 = none, 1..L = labels ascending."""

    numbers: np.ndarray  # (L,) label numbers
    names: tuple[str, ...]
    categories: tuple[str, ...]  # selected, category.csv order
    primary: np.ndarray  # (L,) index into categories
    lut: np.ndarray  # label number -> dense index
    selected: np.ndarray  # (source categories,) bool: the category is scored

    @property
    def n_labels(self) -> int:
        return len(self.numbers)

    def dense_category(self) -> np.ndarray:
        """(L + 1,) primary category index of each dense label, -1 for index 0."""
        return np.concatenate([[-1], self.primary]).astype(np.int64)


def label_space(source: LabelSource, categories: tuple[str, ...] | list[str] | None
                ) -> LabelSpace:
    """Scored labels of a concept store under a category selection (SEMANTICS.md §3)."""
    if categories is None:
        selected = list(source.categories)
    else:
        unknown = [c for c in categories if c not in source.categories]
        if unknown:
            raise UserError(
                f"scoring.categories: unknown category {unknown[0]!r}; the dataset has "
                f"{', '.join(source.categories)}"
            )
        selected = [c for c in source.categories if c in categories]
    numbers, names, primary = [], [], []
    for number in sorted(source.labels):
        info = source.labels[number]
        cat = primary_category(info.coverage, selected)
        if cat is None:
            continue
        numbers.append(number)
        names.append(info.name)
        primary.append(selected.index(cat))
    max_number = max(source.labels, default=0)
    lut = np.zeros(max_number + 1, dtype=np.int64)
    lut[np.array(numbers, dtype=np.int64)] = np.arange(1, len(numbers) + 1)
    return LabelSpace(
        np.array(numbers, dtype=np.int64), tuple(names), tuple(selected),
        np.array(primary, dtype=np.int64), lut,
        np.array([c in selected for c in source.categories], dtype=bool),
    )


@dataclass(frozen=True)
class BlockLabels:
    """The labels of a block as stored, with the planes and image-level labels of
    unselected categories zeroed: the kernels number each pixel's labels themselves."""

    pixel: np.ndarray  # (B, P, S) int32 label number per pixel plane, 0 = none
    image: np.ndarray  # (B, Q) int32 image-level label numbers, 0 = none


def block_labels(block: ConceptBlock, space: LabelSpace) -> BlockLabels:
    """A concept block's labels restricted to the categories ``space`` scores."""
    b, p = block.pixel_labels.shape[:2]
    pixel = block.pixel_labels.reshape(b, p, -1)
    plane_dropped = (block.plane_category >= 0) & ~space.selected[
        np.maximum(block.plane_category, 0)]
    if plane_dropped.any():  # a copy only when some category is left out
        pixel = pixel * ~plane_dropped[:, :, None]
    image_keep = (block.image_label_category >= 0) & space.selected[
        np.maximum(block.image_label_category, 0)]
    return BlockLabels(pixel.astype(np.int32, copy=False),
                       (block.image_labels * image_keep).astype(np.int32, copy=False))
