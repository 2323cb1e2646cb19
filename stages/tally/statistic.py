"""The tally of SEMANTICS.md §2–4 as a statistic, and the per-block product it shares with
the signatures: every unit's mask pixels per pixel class.

Per block: the pixel classes of its labels (:mod:`stages.tally.classes`), then one mask
producer counts each unit's mask pixels per class — the compiled CPU loop where it is exact
for the shape (:mod:`stages.tally.compiled`), the torch producer otherwise and on GPUs
(:func:`stages.tally.torch_masks.torch_mask_classes`).  :mod:`stages.tally.counts` reads the §4
counts out of that; :class:`stages.signatures.statistic.Signatures` reads the §6 signature
counts out of the same product when both run in one pass.  A CPU tally by the compiled loop
on a machine whose form is recorded (:class:`~stages.tally.compiled.VerifiedForm`) imports no
torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from stages.engine.blocks import Block, Values, as_tensor
from stages.engine.reduction import Partial, Statistic, summed
from stages.tally.classes import PixelClasses, pixel_classes
from stages.tally.compiled import (
    CompiledMasks,
    Shape,
    VerifiedForm,
    compiled_masks,
    form_of,
    recorded_variant,
)
from stages.tally.counts import block_counts
from stages.tally.labels import LabelSpace, block_labels
from stages.tally.masks import MaskClasses, float32_below, skip_bound

if TYPE_CHECKING:
    import torch

log = logging.getLogger("netdissect")
KERNELS = ("auto", "compiled", "torch")


def mask_kernel(device: torch.device | str, shape: Shape, kernel: str = "auto",
                verified: tuple[VerifiedForm, ...] = ()) -> CompiledMasks | None:
    """The compiled producer for (h, w) -> (sh, sw) when ``kernel`` and the device let it
    run (``auto``: on CPU where it is exact for the shape, as ``verified`` records for this
    machine or as checked here); None for the torch producer.  GPUs always take the torch
    producer."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown tally kernel {kernel!r}")
    compiled = None
    if str(device).split(":")[0] == "cpu" and kernel != "torch":
        variant = recorded_variant(shape, verified)
        compiled = compiled_masks(*shape) if variant is None else form_of(shape, variant)
    if kernel == "compiled" and compiled is None:
        raise ValueError(f"the compiled tally is not exact for {shape} on {device}")
    return compiled


def describe_kernel(shape: Shape, verified: tuple[VerifiedForm, ...] = ()) -> str:
    """Which producer counts CPU blocks of this shape, in words (the run logs it once)."""
    compiled = mask_kernel("cpu", shape, "auto", verified)
    if compiled is None:
        return ("torch kernel: no compiled form matches this torch's CPU arithmetic for "
                f"{shape[0]}x{shape[1]} -> {shape[2]}x{shape[3]} (about 10x slower)")
    return f"compiled CPU loop ({compiled.describe()})"


def mask_classes(acts: Values, thresholds: np.ndarray, classes: PixelClasses,
                 seg_size: tuple[int, int], kernel: str = "auto", pair_chunk: int = 1024,
                 verified: tuple[VerifiedForm, ...] = ()) -> MaskClasses:
    """Every unit's mask pixels per pixel class of a block: acts (B, K, h, w), an array or a
    tensor on any device, thresholds (K,) float64, or (K, R) for R thresholds per unit: then
    per class and band of :func:`ascending_thresholds` (:class:`MaskClasses`)."""
    thresholds = np.asarray(thresholds, np.float64)
    bands = ascending_thresholds(thresholds) if thresholds.ndim == 2 else None
    t32 = float32_below(thresholds) if bands is None else bands[:, 0]
    device = "cpu" if isinstance(acts, np.ndarray) else acts.device
    compiled = mask_kernel(device, (*acts.shape[2:], *seg_size), kernel, verified)
    if compiled is not None:
        array = acts if isinstance(acts, np.ndarray) else acts.numpy()
        return compiled.mask_classes(array, t32, skip_bound(t32), classes, bands)
    from stages.tally.torch_masks import torch_mask_classes

    return torch_mask_classes(as_tensor(acts), t32, classes.pixel_class, classes.n_classes,
                              seg_size, pair_chunk, bands)


def ascending_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """(K, R) float64 -> (K, R) float32: each unit's :func:`float32_below` thresholds in
    ascending order, the bands of a banded :class:`MaskClasses`."""
    return np.sort(float32_below(thresholds), axis=1)


def band_needed(thresholds: np.ndarray) -> np.ndarray:
    """(K, R) float64 -> (R, K) int64: the band a pixel needs to be in the mask at each of its
    unit's thresholds (how many of the unit's thresholds are <= that one, in float32)."""
    t32, bands = float32_below(thresholds), ascending_thresholds(thresholds)
    return np.stack([np.searchsorted(bands[k], t32[k], side="right")
                     for k in range(len(bands))], axis=1).astype(np.int64)


class ScoredBlock(NamedTuple):
    """A block's pixel classes and every unit's mask pixels per class."""

    classes: PixelClasses
    masks: MaskClasses


def scored_block(block: Block, thresholds: np.ndarray, space: LabelSpace,
                 kernel: str = "auto", verified: tuple[VerifiedForm, ...] = ()) -> ScoredBlock:
    """The block's :class:`ScoredBlock`, made once per block for every statistic of the pass
    that counts against the same thresholds and labels (``verified``: the recorded compiled
    forms, which change how the kernel is found, not what it counts)."""
    thresholds = np.asarray(thresholds, np.float64)
    key = ("scored", kernel, thresholds.shape, thresholds.tobytes(), space.lut.tobytes(), space.categories)

    def make() -> ScoredBlock:
        classes = pixel_classes(block_labels(block.labels, space), space.lut)
        return ScoredBlock(classes, mask_classes(block.values, thresholds, classes,
                                                 block.seg_size, kernel, verified=verified))

    return block.shared(key, make)


@dataclass(frozen=True)
class TallyRule:
    """How labels are counted (SEMANTICS.md §3–4): ``planes`` set or multiset, ``union``
    restricted, global or lite."""

    union: str = "restricted"
    planes: str = "set"


@dataclass(frozen=True)
class TallyCounts(Partial):
    intersection: np.ndarray  # (K, L + 1) int64
    unit_area: np.ndarray  # (K, C) int64
    label_area: np.ndarray  # (L + 1,) int64
    images: np.ndarray  # () int64 images counted

    def union_area(self, space: LabelSpace) -> np.ndarray:
        """(K, L) |M_k| in the label's primary category + |L_l| - |M_k ∩ L_l|."""
        return (self.unit_area[:, space.primary] + self.label_area[None, 1:]
                - self.intersection[:, 1:])

    def iou(self, space: LabelSpace) -> np.ndarray:
        """(K, L) intersection over union, 0 where the union is empty (SEMANTICS.md §4)."""
        union = self.union_area(space)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.intersection[:, 1:] / np.maximum(union, 1), 0.0)


@dataclass(frozen=True)
class Tally(Statistic):
    """The exact int64 counts of SEMANTICS.md §4 over the blocks it sees (labels required)."""

    thresholds: np.ndarray  # (K,) float64
    space: LabelSpace
    rule: TallyRule = TallyRule()
    kernel: str = "auto"
    verified: tuple[VerifiedForm, ...] = ()  # compiled forms recorded for their machines
    partial_type = TallyCounts

    def chunk(self, block: Block) -> TallyCounts:
        k = block.shape[1]
        if block.labels is None:
            width, c = self.space.n_labels + 1, len(self.space.categories)
            return TallyCounts(np.zeros((k, width), np.int64), np.zeros((k, c), np.int64),
                               np.zeros(width, np.int64), np.zeros((), np.int64))
        scored = scored_block(block, self.thresholds, self.space, self.kernel, self.verified)
        counts = block_counts(scored.masks, scored.classes, k, self.space.dense_category(),
                              len(self.space.categories), self.rule.planes, self.rule.union)
        return TallyCounts(*counts, np.array(block.shape[0], dtype=np.int64))

    def combine(self, partials) -> TallyCounts:
        return TallyCounts(*(summed([getattr(p, f) for p in partials])
                             for f in ("intersection", "unit_area", "label_area", "images")))
