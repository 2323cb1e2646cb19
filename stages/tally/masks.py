"""The mask of SEMANTICS.md §2.

M_k(x) = { p : bilinear(A_k(x))[p] > T_k }, in float32 with the float64 threshold T_k: every
mask producer compares with :func:`float32_below` (the exact float32 form of the strict
comparison) and skips pairs and cells at or below :func:`skip_bound`.  Two producers count a
block's mask pixels per pixel class (:class:`MaskClasses`): the compiled CPU loop
(:mod:`stages.tally.compiled`) and the torch producer (:mod:`stages.tally.torch_masks`), on
any device (GPUs, and CPUs where the compiled loop is not exact), whose ``unit_mask`` draws
the report's outlines.  This module imports no torch: a CPU tally by the compiled loop never
loads it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

Thresholds = TypeVar("Thresholds", np.ndarray, "torch.Tensor")


class MaskClasses(NamedTuple):
    """How many pixels of each pixel class every unit's masks cover in a block: one entry per
    (unit, class) pair the unit's mask meets (classes numbered across the block), the
    entries of one (image, unit) contiguous.

    With several thresholds per unit (the bootstrap's replicate thresholds, ascending), one
    entry per (unit, class, band): ``band`` is how many of the unit's thresholds lie below
    the pixels' values, so a pixel is in the mask at the unit's j-th threshold iff its band
    is > j.  With one threshold every band is 0."""

    unit: np.ndarray  # (M,) int64
    klass: np.ndarray  # (M,) int64
    pixels: np.ndarray  # (M,) int64
    band: np.ndarray  # (M,) int64


def float32_below(thresholds: Thresholds) -> Thresholds:
    """The largest float32 <= T for each float64 T: for a float32 u, u > T  <=>  u > result.

    (Rounding T to nearest could round up and drop pixels equal to the rounded value.)
    A tensor gives a tensor on its device, an array an array.
    """
    torch = sys.modules.get("torch")  # not imported: thresholds cannot be a tensor
    if torch is not None and isinstance(thresholds, torch.Tensor):
        return torch.from_numpy(float32_below(thresholds.double().cpu().numpy())).to(
            thresholds.device)
    t = np.asarray(thresholds, dtype=np.float64)
    t32 = t.astype(np.float32)
    lower = np.nextafter(t32, np.float32(-np.inf))
    return np.where(t32.astype(np.float64) > t, lower, t32)


def skip_bound(t32: Thresholds) -> Thresholds:
    """Pairs whose raw max is <= this cannot produce a mask pixel.

    In exact arithmetic a bilinear value never exceeds its largest corner, so max <= T
    would do; float32 interpolation can overshoot a flat region by a few ulps, so the
    bound keeps a margin of 16 float32 epsilons (relative).  Pairs inside the margin are
    upsampled and tested exactly, so the skip never changes a count.
    """
    eps = np.finfo(np.float32).eps
    return t32 - 16 * eps * abs(t32)

