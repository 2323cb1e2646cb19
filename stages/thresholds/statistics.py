"""The statistics of exact thresholds (SEMANTICS.md §1): pure reductions on blocks.

- :class:`TopValues`: per unit, the largest ``need`` values (one pass);
- :class:`RadixHistogram`: per unit, a histogram of the next key bits (three passes, any
  quantile).

Every chunk step takes a :class:`~stages.engine.blocks.Block` (already read, transformed if
asked); none does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic, summed
from stages.thresholds.kernels import (
    float_keys,
    merge_top,
    radix_histogram,
    top_values,
    unit_values,
)

RADIX_SLICE = 1 << 22  # values keyed at once in a radix pass (32 MiB of int64 keys)


@dataclass(frozen=True)
class TopList(Partial):
    values: np.ndarray  # (K, m) float32, in no particular order

    def descending(self) -> np.ndarray:
        """(K, m) float32, each row sorted from the largest value."""
        return torch.sort(torch.from_numpy(self.values), dim=1, descending=True).values.numpy()


@dataclass(frozen=True)
class TopValues(Statistic):
    """Per-unit top ``need`` values: partials merge by keeping the top of their union.

    ``floor`` (per unit, from :meth:`refine`) is the ``need``-th largest value seen so far:
    a later value at or below it can never change the top ``need`` as values, so a block
    keeps only the values above it and partials shrink from ``need`` wide to a few columns
    once the first blocks are merged (memory no longer grows with the number of images).
    Lists stay unsorted until they are read (:meth:`TopList.descending`), so merging a few columns into a full list
    costs a scan rather than a sort (:func:`~stages.thresholds.kernels.merge_top`).
    """

    need: int
    floor: np.ndarray | None = None  # (K,) the need-th largest ranked value seen so far
    partial_type = TopList

    def ranked(self, block: Block) -> torch.Tensor:
        """(K, n) what is ranked per unit: here the block's raw values."""
        return unit_values(block.acts)

    def chunk(self, block: Block) -> TopList:
        values = self.ranked(block)
        keep = self.need
        if self.floor is not None:
            floor = torch.from_numpy(self.floor).to(values.device)
            keep = min(keep, int((values > floor[:, None]).sum(dim=1).max()))
        return self.partial_type(top_values(values, keep).cpu().numpy())

    def refine(self, partial: TopList) -> TopValues:
        """This statistic for the blocks still to come, given the merged ``partial``."""
        if partial.values.shape[1] < self.need:
            return self
        return replace(self, floor=partial.values.min(axis=1))

    def combine(self, partials: Sequence[TopList]) -> TopList:
        return self.partial_type(merge_top([torch.from_numpy(p.values) for p in partials],
                                           self.need).numpy())


@dataclass(frozen=True)
class Histogram(Partial):
    counts: np.ndarray  # (K, T, 2^width) int64


@dataclass(frozen=True)
class RadixHistogram(Statistic):
    """Counts of the next ``width`` key bits among values matching each target's prefix."""

    prefixes: np.ndarray  # (K, T) int64
    done_bits: int
    width: int
    partial_type = Histogram

    def chunk(self, block: Block) -> Histogram:
        values = unit_values(block.acts)
        prefixes = torch.from_numpy(self.prefixes).to(values.device)
        # a slice of units at a time keeps the int64 key temporaries near 2^22 elements
        step = max(1, RADIX_SLICE // max(values.shape[1], 1))
        return Histogram(np.concatenate([
            radix_histogram(float_keys(values[u : u + step]), prefixes[u : u + step],
                            self.done_bits, self.width).cpu().numpy()
            for u in range(0, values.shape[0], step)
        ]))

    def combine(self, partials: Sequence[Histogram]) -> Histogram:
        return Histogram(summed([p.counts for p in partials]))
