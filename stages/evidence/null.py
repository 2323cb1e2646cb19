"""The null model of a detector (SEMANTICS.md §8): the same activations scored against the
labels of other images, so that a unit's masks and the labels no longer belong together.

Draw d pairs the image in activation row x with the labels of row pi_d(x), pi_d a permutation
drawn by a counter-based generator (Philox keyed by the seed, counter = the draw), so it is a
function of (seed, draw) alone, whatever the blocking.  A unit's p-value compares its best
IoU over all labels with the best IoU over all labels of every draw (the choice of the best
of ~1,200 labels is part of the null): (1 + #{d : null_d >= observed}) / (D + 1).
"""

from __future__ import annotations

import numpy as np


def permutation(n_rows: int, seed: int, draw: int) -> np.ndarray:
    """Draw ``draw``'s permutation of the activation rows."""
    generator = np.random.Generator(np.random.Philox(key=seed, counter=[draw, 1, 0, 0]))
    return generator.permutation(n_rows)


def permuted_rows(rows: np.ndarray | None, n_rows: int, seed: int, draw: int) -> np.ndarray:
    """Activation row -> concept row of draw ``draw``: the labels of row pi(x) for image x
    (``rows``: the concept-set match of the point scores, None for the same order)."""
    pi = permutation(n_rows, seed, draw)
    return pi if rows is None else np.asarray(rows)[pi]


def p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """(K,) p-value of each unit's observed best IoU against (D, K) null best IoUs."""
    return (1 + (null >= observed[None, :]).sum(axis=0)) / (null.shape[0] + 1)
