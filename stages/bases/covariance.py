"""The exact float64 mean and covariance of a layer's spatial unit vectors, as a pure
reduction (the PCA basis of SEMANTICS.md §7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic
from stages.thresholds.kernels import unit_values


@dataclass(frozen=True)
class Moments(Partial):
    count: np.ndarray  # () int64 vectors seen
    mean: np.ndarray  # (K,) float64
    scatter: np.ndarray  # (K, K) float64: sum of (a - mean)(a - mean)^T

    def covariance(self) -> np.ndarray:
        """(K, K) the unbiased sample covariance."""
        return self.scatter / max(int(self.count) - 1, 1)


@dataclass(frozen=True)
class Covariance(Statistic):
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
