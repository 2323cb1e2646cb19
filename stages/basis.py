"""Stage ``basis``: the (W, b) of a layer's basis transform (SEMANTICS.md §7) — a random
rotation's fractional power, the PCA of the layer's exact covariance (one pass over the
cache), or a linear map from a file (:func:`stages.bases.transforms.load_linear`).  Every pass that reads the layer applies it block by
block (:class:`stages.bases.transforms.LinearMap`); the transformed layer is never written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.bases.covariance import Covariance
from stages.bases.transforms import fractional_power, pca_basis, random_rotation
from stages.engine.blocks import LayerBlocks
from stages.engine.reduction import Pass, reduce_blocks


def rotation_basis(units: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Q^alpha for the random rotation Q of ``seed``, no bias."""
    return fractional_power(random_rotation(units, seed), alpha), np.zeros(units)


def pca_of_layer(blocks: LayerBlocks, whiten: bool, scheduler: Any = None, progress: bool = False,
                 checkpoint: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The PCA basis of the layer's exact float64 covariance over all images and positions."""
    (moments,) = reduce_blocks(Pass(blocks, (Covariance(),)), blocks.n_blocks(), scheduler,
                               f"covariance {blocks.layer}", progress, checkpoint=checkpoint)
    weight, bias, _ = pca_basis(moments.mean, moments.covariance(), whiten)
    return weight, bias

