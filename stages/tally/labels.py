"""Scored labels of a concept store and their dense numbering (SEMANTICS.md §3).

Shared by the IoU tally and the formula/explanation reductions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.tally.kernels import TallyInputs
from storage.broden import primary_category
from storage.concepts import ConceptBlock, ConceptStore
from storage.errors import UserError


@dataclass(frozen=True)
class LabelSpace:
    """Dense numbering of the scored labels: index 0 = none, 1..L = labels ascending."""

    numbers: np.ndarray  # (L,) label numbers
    names: tuple[str, ...]
    categories: tuple[str, ...]  # selected, category.csv order
    primary: np.ndarray  # (L,) index into categories
    lut: np.ndarray  # label number -> dense index
    store_category_map: np.ndarray  # store category index -> selected index or -1
    category_share: np.ndarray  # (store cats, store cats) bool: some label listed in both

    @property
    def n_labels(self) -> int:
        return len(self.numbers)

    def dense_category(self) -> np.ndarray:
        return np.concatenate([[-1], self.primary]).astype(np.int64)


def label_space(store: ConceptStore, categories: tuple[str, ...] | list[str] | None) -> LabelSpace:
    """Scored labels of a concept store under a category selection (SEMANTICS.md §3)."""
    if categories is None:
        selected = list(store.categories)
    else:
        unknown = [c for c in categories if c not in store.categories]
        if unknown:
            raise UserError(
                f"scoring.categories: unknown category {unknown[0]!r}; the dataset has "
                f"{', '.join(store.categories)}"
            )
        selected = [c for c in store.categories if c in categories]
    numbers, names, primary = [], [], []
    for number in sorted(store.labels):
        info = store.labels[number]
        cat = primary_category(info.coverage, selected)
        if cat is None:
            continue
        numbers.append(number)
        names.append(info.name)
        primary.append(selected.index(cat))
    max_number = max(store.labels, default=0)
    lut = np.zeros(max_number + 1, dtype=np.int64)
    lut[np.array(numbers, dtype=np.int64)] = np.arange(1, len(numbers) + 1)
    cat_map = np.array([selected.index(c) if c in selected else -1 for c in store.categories])
    n_cats = len(store.categories)
    share = np.eye(n_cats, dtype=bool)
    for info in store.labels.values():
        listed = [store.categories.index(c) for c in info.coverage if c in store.categories]
        share[np.ix_(listed, listed)] = True
    return LabelSpace(
        np.array(numbers, dtype=np.int64), tuple(names), tuple(selected),
        np.array(primary, dtype=np.int64), lut, cat_map, share,
    )


def repeat_checks(block: ConceptBlock, share: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """Which plane pairs, and which image-level slots, can carry the same label somewhere in
    the block.  The concept store only admits a label into a plane of a category that lists
    it, so two planes can repeat a label only if their categories share one."""
    pc = block.plane_category.astype(np.int64)
    ic = block.image_label_category.astype(np.int64)
    pairs = []
    for j in range(1, pc.shape[1]):
        for i in range(j):
            ok = (pc[:, i] >= 0) & (pc[:, j] >= 0)
            if ok.any() and share[pc[ok, i], pc[ok, j]].any():
                pairs.append((i, j))
    slots = []
    for q in range(ic.shape[1]):
        ok = ic[:, q] >= 0
        if ok.any():
            cats = pc[ok]
            valid = cats >= 0
            rows = np.broadcast_to(ic[ok, q][:, None], cats.shape)
            if share[rows[valid], cats[valid]].any():
                slots.append(q)
    return pairs, slots


def tally_inputs(block: ConceptBlock, space: LabelSpace, planes: str, device: str) -> TallyInputs:
    """The labels of a concept block as the tally reads them: stored label numbers with the
    planes and image-level labels of unselected categories zeroed, and the dense numbering."""
    selected = space.store_category_map >= 0
    plane_dropped = (block.plane_category >= 0) & ~selected[np.maximum(block.plane_category, 0)]
    image_keep = (block.image_label_category >= 0) & selected[
        np.maximum(block.image_label_category, 0)]
    b, p = block.pixel_labels.shape[:2]
    pixel = torch.from_numpy(block.pixel_labels).to(device).reshape(b, p, -1)
    if plane_dropped.any():  # a copy only when some category is left out
        pixel = pixel * torch.from_numpy(~plane_dropped).to(device)[:, :, None]
    image = torch.from_numpy(block.image_labels * image_keep).to(device)
    return TallyInputs(
        pixel, image, torch.from_numpy(space.lut).to(device),
        torch.from_numpy(space.dense_category()).to(device), len(space.categories), planes,
    )
