"""Stage ``quantile``: exact per-unit thresholds T_k (SEMANTICS.md §1) as block reductions.

Two exact strategies, both statistics (``stages.thresholds.statistics``) in passes over image blocks:

- top-k (one pass): each block keeps every unit's largest ``need = n - lo`` values, partials
  merge by keeping the top ``need`` of their union.  Used when ``K · need`` fits the
  candidate budget.
- radix select (three passes): per-unit histograms of 11, 11 and 10 bits of an
  order-preserving integer key of the float32 values; each pass narrows both target ranks
  (lo and hi) to one bucket, and after 32 bits the keys are the exact values.

Memory per worker is bounded by one block plus ``split_every`` partials: top-k partials are
at most ``K · need`` float32 (the candidate budget), and once the first blocks are merged only
the values above each unit's running ``need``-th largest (``TopValues.refine``); radix
partials are ``K · 2 · 2048`` int64, whatever the number of images.  The same read of each block can also feed the top images per
unit (what the report shows), so thresholds and top images cost one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.engine.blocks import LayerBlocks
from stages.engine.reduction import Pass, reduce_blocks
from stages.thresholds.kernels import (
    RADIX_WIDTHS,
    keys_to_floats,
    lerp,
    quantile_position,
    radix_step,
)
from stages.thresholds.statistics import RadixHistogram, TopValues
from stages.thresholds.top_images import TopImages, TopImagesStat

DEFAULT_CANDIDATE_BUDGET = 1 << 25  # float32 values kept per partial (128 MiB)


def strategy(units: int, values_per_unit: int, q: float,
             candidate_budget: int = DEFAULT_CANDIDATE_BUDGET) -> str:
    """``top-k`` (one pass) when every unit's candidates fit the budget, else ``radix``."""
    lo, _, _ = quantile_position(values_per_unit, q)
    return "top-k" if units * (values_per_unit - lo) <= candidate_budget else "radix"


def _pass_checkpoint(checkpoint: Path | None, name: str) -> Path | None:
    return None if checkpoint is None else checkpoint.with_name(f"{checkpoint.name}.{name}")


def threshold_pass(
    blocks: LayerBlocks,
    q: float,
    scheduler: Any = None,
    candidate_budget: int = DEFAULT_CANDIDATE_BUDGET,
    progress: bool = False,
    top_n: int | None = None,
    checkpoint: Path | None = None,
) -> tuple[np.ndarray, TopImages | None]:
    """Exact thresholds T_k = numpy.quantile(all values of unit k, 1 - q, method='linear'),
    and, when ``top_n`` is given, each unit's top images from the same read of every block.

    ``scheduler=None`` runs in-process; otherwise a Dask scheduler name or Client;
    ``checkpoint`` (a file path) makes the passes resumable.
    """
    store = blocks.store()
    n_blocks = store.n_blocks()
    # a transform may change the unit count: then ask it, on the first block
    k, h, w = blocks.load(0).shape[1:] if blocks.transform else store.shape(blocks.layer)[1:]
    n = store.n_images * h * w
    lo, hi, gamma = quantile_position(n, q)
    need = n - lo
    desc = f"quantile {blocks.layer}"
    extra = (TopImagesStat(top_n),) if top_n else ()
    if strategy(k, n, q, candidate_budget) == "top-k":
        split_every = max(2, min(8, candidate_budget // max(k * need, 1)))
        tops, *found = reduce_blocks(Pass(blocks, (TopValues(need), *extra)), n_blocks,
                                     scheduler, desc, progress, split_every,
                                     _pass_checkpoint(checkpoint, "top"))
        tops = tops.descending()
        v_lo, v_hi = tops[:, n - 1 - lo], tops[:, n - 1 - hi]
        return lerp(v_lo, v_hi, gamma), (found[0] if found else None)
    ranks = np.tile(np.array([lo, hi], dtype=np.int64), (k, 1))
    prefixes = np.zeros((k, 2), dtype=np.int64)
    done, found = 0, []
    for i, width in enumerate(RADIX_WIDTHS):
        statistics = (RadixHistogram(prefixes, done, width), *(extra if i == 0 else ()))
        hist, *more = reduce_blocks(Pass(blocks, statistics), n_blocks, scheduler,
                                    f"{desc} pass {i + 1}/{len(RADIX_WIDTHS)}", progress, 8,
                                    _pass_checkpoint(checkpoint, f"radix{i}"))
        found += more
        prefixes, ranks = radix_step(hist.counts, prefixes, ranks, width)
        done += width
    values = keys_to_floats(prefixes)
    return lerp(values[:, 0], values[:, 1], gamma), (found[0] if found else None)
