"""A decoded label plane's numbers and their check, in one compiled pass per plane.

Why: a Broden label plane is an RGB PNG whose label number is R + 256·G.  Converting it and
checking every number against its category's ``c_<cat>.csv`` in NumPy took more time than
decoding the PNG, and held the GIL: threads building the concept store barely added up.
This loop does both in one pass with the GIL released.  Imported where a store is built,
not to plan (numba).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def labels_into(rgb: np.ndarray, out: np.ndarray, allowed: np.ndarray) -> int:
    """Write R + 256·G of ``rgb`` (h, w, 3) uint8 into ``out`` (h, w) int32; return the
    smallest number that ``allowed`` (65536,) bool does not allow, or -1 if all are."""
    worst = 65536
    h, w = out.shape
    for y in range(h):
        for x in range(w):
            number = np.int32(rgb[y, x, 0]) | (np.int32(rgb[y, x, 1]) << 8)
            out[y, x] = number
            if not allowed[number] and number < worst:
                worst = number
    return -1 if worst == 65536 else worst


def allowed_table(listed: frozenset[int]) -> np.ndarray:
    """(65536,) bool: the numbers a plane of the category may carry (0: unlabelled)."""
    allowed = np.zeros(65536, dtype=bool)
    allowed[[0, *(n for n in listed if n < 65536)]] = True
    return allowed
