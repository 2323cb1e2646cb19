"""Statistics over the activation cache: pure reductions (``stages.engine.reduction``) on blocks.

- :class:`TopValues`: per unit, the largest ``need`` values (exact thresholds, one pass);
- :class:`RadixHistogram`: per unit, a histogram of the next key bits (exact thresholds,
  three passes, any quantile);
- :class:`TopImagesStat`: per unit, the images with the highest maximum activation over the
  unit's map (ties to the lower image row), with those maps kept, so a report reads only the
  winning images from disk;
- :class:`Covariance`: the exact float64 mean and scatter of the unit vectors (PCA bases).

Every chunk step takes a :class:`~stages.engine.blocks.Block` (already read, transformed if asked);
none does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.engine.blocks import Block, LayerBlocks
from stages.engine.reduction import Arrays, Pass, reduce_blocks, summed
from stages.tally.kernels import float_keys, merge_top, radix_histogram, top_values, unit_values

RADIX_SLICE = 1 << 22  # values keyed at once in a radix pass (32 MiB of int64 keys)


# ---------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class TopList(Arrays):
    values: np.ndarray  # (K, m) float32, in no particular order


@dataclass(frozen=True)
class TopValues:
    """Per-unit top ``need`` values: partials merge by keeping the top of their union.

    ``floor`` (per unit, from :meth:`refine`) is the ``need``-th largest value seen so far:
    a later value at or below it can never change the top ``need`` as values, so a block
    keeps only the values above it and partials shrink from ``need`` wide to a few columns
    once the first blocks are merged (memory no longer grows with the number of images).
    Lists stay unsorted until :meth:`finish`, so merging a few columns into a full list
    costs a scan rather than a sort (:func:`~stages.tally.kernels.merge_top`).
    """

    need: int
    floor: np.ndarray | None = None  # (K,) float32
    partial_type = TopList

    def chunk(self, block: Block) -> TopList:
        values = unit_values(block.acts)
        keep = self.need
        if self.floor is not None:
            floor = torch.from_numpy(self.floor).to(values.device)
            keep = min(keep, int((values > floor[:, None]).sum(dim=1).max()))
        return TopList(top_values(values, keep).cpu().numpy())

    def refine(self, partial: TopList) -> TopValues:
        """This statistic for the blocks still to come, given the merged ``partial``."""
        if partial.values.shape[1] < self.need:
            return self
        return replace(self, floor=partial.values.min(axis=1))

    def combine(self, partials: Sequence[TopList]) -> TopList:
        return TopList(merge_top([torch.from_numpy(p.values) for p in partials], self.need).numpy())

    def finish(self, partial: TopList) -> np.ndarray:
        """(K, need) float32, each row descending."""
        return torch.sort(torch.from_numpy(partial.values), dim=1, descending=True).values.numpy()


@dataclass(frozen=True)
class Histogram(Arrays):
    counts: np.ndarray  # (K, T, 2^width) int64


@dataclass(frozen=True)
class RadixHistogram:
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

    def finish(self, partial: Histogram) -> np.ndarray:
        return partial.counts


# ---------------------------------------------------------------- top images
@dataclass(frozen=True)
class TopImages(Arrays):
    """Per unit, the top images by maximum activation, best first."""

    index: np.ndarray  # (K, m) int64 image rows
    value: np.ndarray  # (K, m) float32 maximum activation of the unit on that image
    maps: np.ndarray  # (K, m, h, w) float32 the unit's raw map on that image


def select_top(index: np.ndarray, value: np.ndarray, maps: np.ndarray, n: int) -> TopImages:
    """Keep each row's ``n`` largest values, ties to the lower image index, best first."""
    order = np.lexsort((index, -value), axis=1)[:, :n]
    return TopImages(
        np.take_along_axis(index, order, axis=1),
        np.take_along_axis(value, order, axis=1),
        np.take_along_axis(maps, order[:, :, None, None], axis=1),
    )


@dataclass(frozen=True)
class TopImagesStat:
    """Partial = per unit the block's top-n (image, max, map); combine keeps the top-n of the
    union; ties go to the lower image index whatever the blocking."""

    top_n: int
    partial_type = TopImages

    def chunk(self, block: Block) -> TopImages:
        acts = block.acts.cpu()  # (B, K, h, w)
        b, k = acts.shape[:2]
        maps = acts.transpose(0, 1).numpy()  # (K, B, h, w)
        value = acts.amax(dim=(2, 3)).T.contiguous().numpy()  # (K, B)
        index = np.ascontiguousarray(np.broadcast_to(block.rows.astype(np.int64), (k, b)))
        return select_top(index, value, maps, self.top_n)

    def combine(self, partials: Sequence[TopImages]) -> TopImages:
        return select_top(np.concatenate([p.index for p in partials], axis=1),
                          np.concatenate([p.value for p in partials], axis=1),
                          np.concatenate([p.maps for p in partials], axis=1), self.top_n)

    def finish(self, partial: TopImages) -> TopImages:
        return partial


def TopImagesReduction(blocks: LayerBlocks, top_n: int) -> Pass:  # noqa: N802 - a pass, named as before
    """The top images of one layer as a pass of its own."""
    return Pass(blocks, (TopImagesStat(top_n),), single=True)


def top_images(
    store_path: Path, layer: str, top_n: int, scheduler: Any = None, progress: bool = False,
    transform: Any = None, checkpoint: Path | None = None,
) -> TopImages:
    """The top-``top_n`` images of every unit of ``layer``, one pass over the activations."""
    blocks = LayerBlocks(str(store_path), layer, transform, "cpu")
    return reduce_blocks(TopImagesReduction(blocks, top_n), blocks.n_blocks(), scheduler,
                         f"top images {layer}", progress, checkpoint=checkpoint)


# ---------------------------------------------------------------- covariance
@dataclass(frozen=True)
class Moments(Arrays):
    count: np.ndarray  # () int64 vectors seen
    mean: np.ndarray  # (K,) float64
    scatter: np.ndarray  # (K, K) float64: sum of (a - mean)(a - mean)^T


@dataclass(frozen=True)
class Covariance:
    """Exact float64 mean and scatter of every spatial unit vector, merged with Chan et al.'s
    pairwise update (no catastrophic cancellation from raw second moments)."""

    partial_type = Moments

    def chunk(self, block: Block) -> Moments:
        x = unit_values(block.acts).T.double()  # (B·h·w, K)
        n = x.shape[0]
        if n == 0:
            k = x.shape[1]
            return Moments(np.array(0), np.zeros(k), np.zeros((k, k)))
        mean = x.mean(dim=0)
        centred = x - mean
        return Moments(np.array(n), mean.cpu().numpy(), (centred.T @ centred).cpu().numpy())

    def combine(self, partials: Sequence[Moments]) -> Moments:
        acc = partials[0]
        for p in partials[1:]:
            n_a, n_b = int(acc.count), int(p.count)
            n = n_a + n_b
            if n_b == 0:
                continue
            if n_a == 0:
                acc = p
                continue
            delta = p.mean - acc.mean
            acc = Moments(np.array(n), acc.mean + delta * (n_b / n),
                          acc.scatter + p.scatter + np.outer(delta, delta) * (n_a * n_b / n))
        return acc

    def finish(self, partial: Moments) -> Moments:
        return partial
