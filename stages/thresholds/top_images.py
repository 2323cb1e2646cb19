"""Per unit, the images with the highest maximum activation over the unit's map (ties to the
lower image row), with those maps kept, so a report reads only the winning images from disk.
Found from the same read of every block as the thresholds (``stages.quantile``), or in a
pass of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.engine.blocks import Block, LayerBlocks
from stages.engine.reduction import Partial, Pass, Statistic, reduce_blocks


@dataclass(frozen=True)
class TopImages(Partial):
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
class TopImagesStat(Statistic):
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


def top_images(
    store_path: Path, layer: str, top_n: int, scheduler: Any = None, progress: bool = False,
    transform: Any = None, checkpoint: Path | None = None,
) -> TopImages:
    """The top-``top_n`` images of every unit of ``layer``, one pass over the activations."""
    blocks = LayerBlocks(str(store_path), layer, transform, "cpu")
    (found,) = reduce_blocks(Pass(blocks, (TopImagesStat(top_n),)), blocks.n_blocks(),
                             scheduler, f"top images {layer}", progress, checkpoint=checkpoint)
    return found
