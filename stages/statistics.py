"""Statistics shared by several stages: pure block reductions over the activation cache.

Top images: per unit, the images with the highest maximum activation over the unit's map
(ties to the lower image row), with those maps kept, so a report reads only the winning
images from disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.blocks import LayerBlocks
from stages.reduction import reduce_blocks
from storage.activations import ActivationStore


@dataclass(frozen=True)
class TopImages:
    """Per unit, the top images by maximum activation, best first."""

    index: np.ndarray  # (K, m) int64 image rows
    value: np.ndarray  # (K, m) float32 maximum activation of the unit on that image
    maps: np.ndarray  # (K, m, h, w) float32 the unit's raw map on that image

    def arrays(self) -> dict[str, np.ndarray]:
        return {"index": self.index, "value": self.value, "maps": self.maps}


def select_top(
    index: np.ndarray, value: np.ndarray, maps: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's ``n`` largest values, ties to the lower image index, best first."""
    order = np.lexsort((index, -value), axis=1)[:, :n]
    return (
        np.take_along_axis(index, order, axis=1),
        np.take_along_axis(value, order, axis=1),
        np.take_along_axis(maps, order[:, :, None, None], axis=1),
    )


@dataclass(frozen=True)
class TopImagesReduction:
    """Block reduction: partial = per unit the block's top-n (image, max, map); combine keeps
    the top-n of the union; ties go to the lower image index whatever the blocking."""

    blocks: LayerBlocks
    top_n: int

    def chunk(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        acts, start, _ = self.blocks.load_rows(block)  # (B, K, h, w), NaN-checked
        acts = acts.cpu()
        b, k = acts.shape[:2]
        maps = acts.transpose(0, 1).numpy()  # (K, B, h, w)
        value = acts.amax(dim=(2, 3)).T.contiguous().numpy()  # (K, B)
        index = np.broadcast_to(np.arange(start, start + b, dtype=np.int64), (k, b))
        return select_top(np.ascontiguousarray(index), value, maps, self.top_n)

    def combine(self, partials: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        index = np.concatenate([p[0] for p in partials], axis=1)
        value = np.concatenate([p[1] for p in partials], axis=1)
        maps = np.concatenate([p[2] for p in partials], axis=1)
        return select_top(index, value, maps, self.top_n)

    def finish(self, partial) -> TopImages:
        index, value, maps = partial
        return TopImages(index.copy(), value.copy(), maps.copy())


def top_images(
    store_path: Path, layer: str, top_n: int, scheduler: Any = None, progress: bool = False
) -> TopImages:
    """The top-``top_n`` images of every unit of ``layer``, one pass over the activations."""
    reduction = TopImagesReduction(LayerBlocks(str(store_path), layer, None, "cpu"), top_n)
    n_blocks = ActivationStore(store_path).n_blocks()
    return reduce_blocks(reduction, n_blocks, scheduler, f"top images {layer}", progress)
