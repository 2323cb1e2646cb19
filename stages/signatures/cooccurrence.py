"""Co-occurrence tables of one layer's signature counts (SEMANTICS.md §12), what the optimal
search scores formulas from: per label and label pair over the dataset and inside each
unit's masks, and for larger label sets from the few signatures that carry them all."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from stages.signatures.statistic import SignaturePartial


def set_sums(by_label: sp.csc_matrix, member: sp.csr_matrix, weights: np.ndarray,
             sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
    """Per label set q (|q| ≥ 2), the (L,) sum of ``weights`` over the rows carrying q and
    each label c: one sparse product per set size, the rows found by multiplying the
    labels' membership columns."""
    found = {}
    for size in sorted({len(q) for q in sets}):
        group = [q for q in sets if len(q) == size]
        holds = by_label[:, [q[0] for q in group]]
        for j in range(1, size):
            holds = holds.multiply(by_label[:, [q[j] for q in group]])
        holds = sp.csc_matrix(holds, dtype=np.float64)
        holds.data *= weights[holds.indices]
        sums = (holds.T.tocsr() @ member).toarray()
        found.update(zip(group, sums, strict=True))
    return found


class LayerTables:
    """The unit-independent tables of one layer: label membership per signature (labels
    merged by name, as formulas name them), label areas and pair co-occurrence."""

    def __init__(self, partial: SignaturePartial, names: list[str]) -> None:
        self.names = list(dict.fromkeys(names))
        column = {name: i for i, name in enumerate(self.names)}
        name_of = np.array([-1] + [column[n] for n in names], dtype=np.int64)
        table = partial.table
        rows = np.repeat(np.arange(len(table)), table.shape[1])
        cols = name_of[table.reshape(-1)]
        keep = cols >= 0
        n_labels, n_sig = len(self.names), len(table)
        member = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])),
                               shape=(n_sig, n_labels))
        member.sum_duplicates()
        member.data[:] = 1.0
        self.member = member
        self.by_label = member.tocsc()
        self.counts = partial.counts.astype(np.float64)
        self.area = np.asarray(member.T @ self.counts).ravel()
        self.pair_area = (member.T @ sp.diags(self.counts) @ member).toarray()
        self.total = float(self.counts.sum())
        order = np.argsort(partial.unit, kind="stable")
        self._unit_sig, self._unit_val = partial.sig[order], partial.unit_counts[order]
        self._unit_start = np.searchsorted(partial.unit[order], np.arange(int(partial.units) + 1))
        self._cooccurrence: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def n_units(self) -> int:
        return len(self._unit_start) - 1

    def unit_signatures(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._unit_start[unit], self._unit_start[unit + 1]
        return self._unit_sig[lo:hi], self._unit_val[lo:hi].astype(np.float64)

    def cooccurrence(self, sets: list[tuple[int, ...]], count: bool = True) -> list:
        """Per label set q, the (L,) pixels over the dataset carrying q and each
        label c; shared by every unit, so kept.  The slowest table of the search (its rows
        are the dataset's), so ``count=False`` answers None where it is not kept; None for
        |q| < 2, which the pair tables hold."""
        missing = [q for q in dict.fromkeys(sets) if len(q) >= 2 and q not in self._cooccurrence]
        if count and missing:
            self._cooccurrence.update(set_sums(self.by_label, self.member, self.counts,
                                               missing))
        return [self._cooccurrence.get(q) for q in sets]


class UnitTables:
    """One unit's tables: the same co-occurrences counted inside its masks (I) and weighted
    by the positive part of u − b·w (P, for the bound at incumbent b)."""

    def __init__(self, layer: LayerTables, unit: int) -> None:
        self.layer = layer
        sig, self.u = layer.unit_signatures(unit)
        self.sig = sig
        self.member = layer.member[sig]
        self.by_label = self.member.tocsc()
        self.signature_outside = layer.counts[sig] - self.u
        self.area = float(self.u.sum())
        self.inter = np.asarray(self.member.T @ self.u).ravel()
        self.pair_inter = self._pairs(self.u)
        self.pair_outside = layer.pair_area - self.pair_inter
        self._inside: dict[tuple[int, ...], np.ndarray] = {}
        self._positive: dict[tuple[int, ...], np.ndarray] = {}

    def _pairs(self, weights: np.ndarray) -> np.ndarray:
        return (self.member.T @ sp.diags(weights) @ self.member).toarray()

    def set_incumbent(self, iou: float) -> None:
        """P tables at incumbent IoU ``iou`` (a larger incumbent only shrinks them, so nodes
        bounded with older tables stay soundly bounded)."""
        self.incumbent = iou
        self.weight = np.maximum(self.u - iou * self.signature_outside, 0.0)
        self.pos = np.asarray(self.member.T @ self.weight).ravel()
        self.pair_pos = self._pairs(self.weight)
        self.top_pos = np.concatenate([[0.0], np.cumsum(np.sort(self.pos)[::-1])])
        self.top_inter = np.concatenate([[0.0], np.cumsum(np.sort(self.inter)[::-1])])
        value = self.inter - iou * (self.layer.area - self.inter)
        pair_value = self.pair_inter - iou * (self.layer.pair_area - self.pair_inter)
        negative = self.pair_pos - pair_value  # pixels' negative parts, per label pair
        self.value, self.pair_negative = value, negative
        self.single_negative = self.pos - value
        off = pair_value.copy()
        np.fill_diagonal(off, -np.inf)
        self.most_pair_value = off.max(axis=1)  # max over c ≠ a of V(a ∧ c)
        self.most = {}
        for repeats in (False, True):  # may c be a label the formula already has?
            pos, neg, gain = self.pair_pos.copy(), negative.copy(), value[None, :] + negative
            if not repeats:
                for m in (pos, neg, gain):
                    np.fill_diagonal(m, -np.inf)
            self.most[repeats] = (pos.max(axis=1), neg.max(axis=1), gain.max(axis=1))
        self._positive.clear()

    def inside(self, sets: list[tuple[int, ...]]) -> np.ndarray:
        """(len(sets), L) I: the unit's pixels carrying q ∪ {c}, for every label c."""
        return self._table(sets, self._inside, self.u, self.inter, self.pair_inter)

    def positive(self, sets: list[tuple[int, ...]]) -> np.ndarray:
        """(len(sets), L) P: the positive parts of u − b·w over signatures carrying q ∪ {c}."""
        return self._table(sets, self._positive, self.weight, self.pos, self.pair_pos)

    def _table(self, sets, kept: dict, weights, single, pair) -> np.ndarray:
        missing = [q for q in dict.fromkeys(sets) if len(q) >= 2 and q not in kept]
        if missing:
            kept.update(set_sums(self.by_label, self.member, weights, missing))
        return np.stack([single if len(q) == 0 else pair[q[0]] if len(q) == 1 else kept[q]
                         for q in sets])

    def outside(self, sets: list[tuple[int, ...]], inside: np.ndarray,
                count: bool = True) -> np.ndarray:
        """(len(sets), 2, L) W, pixels outside the unit's masks carrying q ∪ {c}, for every
        label c, as (low, high), given the sets' :meth:`inside` table: equal where known,
        or where it needs a dataset count and ``count`` is False, bounded from the pair
        tables — below by Bonferroni inside c's outside pixels, above by every pair (x, c),
        x ∈ q."""
        single = self.layer.area - self.inter
        out = np.empty((len(sets), 2, len(single)))
        areas = self.layer.cooccurrence(sets, count)
        for i, (q, area) in enumerate(zip(sets, areas, strict=True)):
            if len(q) < 2:
                out[i] = single if len(q) == 0 else self.pair_outside[q[0]]
            elif area is not None:
                out[i] = area - inside[i]
            else:
                pairs = self.pair_outside[list(q)]
                out[i, 0] = np.maximum(pairs.sum(axis=0) - (len(q) - 1) * single, 0.0)
                out[i, 1] = pairs.min(axis=0)
        return out
