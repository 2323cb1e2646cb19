"""Co-occurrence tables of one layer's signature counts (SEMANTICS.md §12), what the optimal
search scores formulas from: per label and label pair over the dataset and inside each
unit's masks, and for larger label sets from the few signatures that carry them all."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from stages.signatures.statistic import SignaturePartial


def rows_holding(by_label: sp.csc_matrix, labels: tuple[int, ...]) -> np.ndarray:
    """Rows of a (rows × labels) membership matrix that carry every label of ``labels``."""
    lists = sorted((by_label.indices[by_label.indptr[c]:by_label.indptr[c + 1]]
                    for c in labels), key=len)
    rows = lists[0]
    for other in lists[1:]:
        rows = np.intersect1d(rows, other, assume_unique=True)
    return rows


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

    def cooccurrence(self, labels: tuple[int, ...]) -> np.ndarray:
        """(L,) pixels over the dataset carrying ``labels`` and each label c (|labels| ≥ 2);
        shared by every unit, so kept."""
        found = self._cooccurrence.get(labels)
        if found is None:
            rows = rows_holding(self.by_label, labels)
            found = np.asarray(self.member[rows].T @ self.counts[rows]).ravel()
            self._cooccurrence[labels] = found
        return found


class UnitTables:
    """One unit's tables: the same co-occurrences counted inside its masks (I) and weighted
    by the positive part of u − b·w (P, for the bound at incumbent b)."""

    def __init__(self, layer: LayerTables, unit: int) -> None:
        self.layer = layer
        sig, self.u = layer.unit_signatures(unit)
        self.sig = sig
        self.member = layer.member[sig]
        self.by_label = self.member.tocsc()
        self.outside = layer.counts[sig] - self.u
        self.area = float(self.u.sum())
        self.inter = np.asarray(self.member.T @ self.u).ravel()
        self.pair_inter = self._pairs(self.u)
        self._triples: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def _pairs(self, weights: np.ndarray) -> np.ndarray:
        return (self.member.T @ sp.diags(weights) @ self.member).toarray()

    def set_incumbent(self, iou: float) -> None:
        """P tables at incumbent IoU ``iou`` (a larger incumbent only shrinks them, so nodes
        bounded with older tables stay soundly bounded)."""
        self.incumbent = iou
        self.weight = np.maximum(self.u - iou * self.outside, 0.0)
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
        self._triples.clear()

    def vectors(self, q: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(I, A, P) co-occurrence of q ∪ {c} for every label c."""
        if len(q) == 0:
            return self.inter, self.layer.area, self.pos
        if len(q) == 1:
            a = q[0]
            return self.pair_inter[a], self.layer.pair_area[a], self.pair_pos[a]
        found = self._triples.get(q)
        if found is None:
            rows = rows_holding(self.by_label, q)
            sub = self.member[rows].T
            found = (np.asarray(sub @ self.u[rows]).ravel(),
                     np.asarray(sub @ self.weight[rows]).ravel())
            self._triples[q] = found
        return found[0], self.layer.cooccurrence(q), found[1]
