"""Small pure functions on tensors for exact order statistics (SEMANTICS.md §1): numpy's
'linear' quantile position and interpolation, per-unit top-k merges, and radix histograms
over order-preserving integer keys of float32 values.  The device is whatever the input
tensors live on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KEY_BITS = 32
RADIX_WIDTHS = (11, 11, 10)  # three histogram passes pin down a float32 exactly


def quantile_position(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' method for quantile ``1 - q`` of n values: (lo, hi, gamma).

    lo and hi are 0-based ascending ranks; the answer is lerp(v[lo], v[hi], gamma).
    """
    virtual = (n - 1) * (1.0 - q)
    lo = int(math.floor(virtual))
    lo = min(max(lo, 0), n - 1)
    hi = min(lo + 1, n - 1)
    return lo, hi, float(virtual - lo)


def lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's own interpolation formula (``numpy.lib._function_base_impl._lerp``)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    out = a + diff * gamma
    if gamma >= 0.5:
        out = b - diff * (1 - gamma)
    return out


def unit_values(block: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (K, B·h·w) float32: every raw value of each unit."""
    b, k = block.shape[:2]
    return block.float().permute(1, 0, 2, 3).reshape(k, -1)


def top_values(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per-unit largest ``k`` values, in no particular order (k clipped to what is there)."""
    k = min(k, values.shape[1])
    return torch.topk(values, k, dim=1, largest=True, sorted=False).values


def merge_top(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """Associative merge of per-unit top lists (any order): the top ``k`` of their union.

    A full list W (k wide) met by c <= k/2 new columns E only trades its c smallest L:
    every value of W outside L is >= max(L), and at most c values of L ∪ E exceed max(L),
    so the top k of W ∪ E is (W minus L) plus the top c of L ∪ E, ties included.  That
    costs one scan of W instead of a selection over all k + c columns per unit.
    """
    parts = sorted(parts, key=lambda part: part.shape[1], reverse=True)
    wide, extra = parts[0], sum(part.shape[1] for part in parts[1:])
    if wide.shape[1] != k or not 0 < extra <= k // 2:
        return top_values(torch.cat(parts, dim=1), k)
    smallest = torch.topk(wide, extra, dim=1, largest=False, sorted=False)
    keep = top_values(torch.cat([smallest.values, *parts[1:]], dim=1), extra)
    return wide.clone().scatter_(1, smallest.indices, keep)


def float_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float32 -> int64 in [0, 2^32): a < b  <=>  key(a) < key(b)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys`."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys >= (1 << 31), keys - (1 << 31), ((1 << 31) - 1 - keys) | (1 << 31))
    return bits.astype(np.uint32).view(np.float32)


def radix_histogram(
    keys: torch.Tensor, prefixes: torch.Tensor, done_bits: int, width: int
) -> torch.Tensor:
    """Per unit and target, counts of the next ``width`` key bits among keys whose top
    ``done_bits`` equal the target's prefix.  keys (K, n); prefixes (K, T) -> (K, T, 2^width).
    """
    k, t = prefixes.shape
    bins = 1 << width
    shift = KEY_BITS - done_bits - width
    digits = (keys >> shift) & (bins - 1)
    out = torch.zeros((k, t, bins), dtype=torch.int64, device=keys.device)
    unit_index = torch.arange(k, device=keys.device).unsqueeze(1).expand_as(keys)
    for target in range(t):
        if done_bits == 0:
            match = torch.ones_like(keys, dtype=torch.bool)
        else:
            match = (keys >> (KEY_BITS - done_bits)) == prefixes[:, target : target + 1]
        flat = unit_index[match] * bins + digits[match]
        out[:, target] = torch.bincount(flat, minlength=k * bins).view(k, bins)
    return out


def radix_step(
    hist: np.ndarray, prefixes: np.ndarray, ranks: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Descend one digit: the bucket holding each target rank, and the rank inside it."""
    cum = np.cumsum(hist, axis=-1)
    digit = (cum <= ranks[..., None]).sum(axis=-1)
    before = np.where(digit > 0, np.take_along_axis(cum, np.maximum(digit - 1, 0)[..., None], -1)[..., 0], 0)
    return (prefixes << width) | digit, ranks - before
