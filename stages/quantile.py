"""Stage ``quantile``: exact per-unit thresholds T_k (SEMANTICS.md §1) as block reductions.

Two exact strategies, both :class:`~stages.reduction.BlockReduction`s over image blocks:

- top-k (one pass): each block keeps every unit's largest ``need = n - lo`` values, partials
  merge by keeping the top ``need`` of their union.  Used when ``K · need`` fits the
  candidate budget.
- radix select (three passes): per-unit histograms of 11, 11 and 10 bits of an
  order-preserving integer key of the float32 values; each pass narrows both target ranks
  (lo and hi) to one bucket, and after 32 bits the keys are the exact values.

Memory per worker is bounded by one block plus ``split_every`` partials: top-k partials are
``K · need`` float32 (at most the candidate budget), radix partials ``K · 2 · 2048`` int64,
whatever the number of images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.blocks import LayerBlocks
from stages.kernels import (
    RADIX_WIDTHS,
    float_keys,
    keys_to_floats,
    lerp,
    merge_top,
    quantile_position,
    radix_histogram,
    radix_step,
    top_values,
    unit_values,
)
from stages.reduction import reduce_blocks
from storage.errors import UserError

log = logging.getLogger("netdissect")
DEFAULT_CANDIDATE_BUDGET = 1 << 24  # float32 values kept per partial (64 MiB)
RADIX_SLICE = 1 << 22  # values keyed at once in a radix pass (32 MiB of int64 keys)


@dataclass(frozen=True)
class TopReduction:
    blocks: LayerBlocks
    need: int

    def chunk(self, block: int) -> np.ndarray:
        return top_values(unit_values(self.blocks.load(block)), self.need).cpu().numpy()

    def combine(self, partials) -> np.ndarray:
        return merge_top([torch.from_numpy(p) for p in partials], self.need).numpy()

    def finish(self, partial: np.ndarray) -> np.ndarray:
        return partial


@dataclass(frozen=True)
class RadixReduction:
    blocks: LayerBlocks
    prefixes: np.ndarray  # (K, 2) int64
    done_bits: int
    width: int

    def chunk(self, block: int) -> np.ndarray:
        values = unit_values(self.blocks.load(block))
        prefixes = torch.from_numpy(self.prefixes).to(values.device)
        # a slice of units at a time keeps the int64 key temporaries near 2^22 elements
        step = max(1, RADIX_SLICE // max(values.shape[1], 1))
        return np.concatenate([
            radix_histogram(float_keys(values[u : u + step]), prefixes[u : u + step],
                            self.done_bits, self.width).cpu().numpy()
            for u in range(0, values.shape[0], step)
        ])

    def combine(self, partials) -> np.ndarray:
        return np.sum(partials, axis=0)

    def finish(self, partial: np.ndarray) -> np.ndarray:
        return partial


def exact_thresholds(
    blocks: LayerBlocks,
    q: float,
    scheduler: Any = None,
    candidate_budget: int = DEFAULT_CANDIDATE_BUDGET,
    progress: bool = False,
) -> np.ndarray:
    """T_k = numpy.quantile(all values of unit k, 1 - q, method='linear'), exactly.

    ``scheduler=None`` runs in-process; otherwise a Dask scheduler name or Client.
    """
    if not 0.0 < q < 1.0:
        raise UserError(f"scoring.quantile={q}: must lie in (0, 1)")
    store = blocks.store()
    n_blocks = store.n_blocks()
    # a transform may change the unit count: then ask it, on the first block
    k, h, w = blocks.load(0).shape[1:] if blocks.transform else store.shape(blocks.layer)[1:]
    n = store.n_images * h * w
    lo, hi, gamma = quantile_position(n, q)
    need = n - lo
    desc = f"quantile {blocks.layer}"
    if k * need <= candidate_budget:
        split_every = max(2, min(8, candidate_budget // max(k * need, 1)))
        tops = reduce_blocks(TopReduction(blocks, need), n_blocks, scheduler, desc, progress, split_every)
        v_lo = tops[:, n - 1 - lo]
        v_hi = tops[:, n - 1 - hi]
    else:
        ranks = np.tile(np.array([lo, hi], dtype=np.int64), (k, 1))
        prefixes = np.zeros((k, 2), dtype=np.int64)
        done = 0
        for i, width in enumerate(RADIX_WIDTHS):
            hist = reduce_blocks(
                RadixReduction(blocks, prefixes, done, width), n_blocks, scheduler,
                f"{desc} pass {i + 1}/{len(RADIX_WIDTHS)}", progress, 8,
            )
            prefixes, ranks = radix_step(hist, prefixes, ranks, width)
            done += width
        values = keys_to_floats(prefixes)
        v_lo, v_hi = values[:, 0], values[:, 1]
    return lerp(v_lo, v_hi, gamma)
