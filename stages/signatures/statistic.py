"""Pixel *signatures* (SEMANTICS.md §6): the set of labels a pixel carries (its pixel planes
plus its image's image-level labels, set semantics).

Any formula of AND, OR and NOT over labels is a function of the signature alone, so one
block reduction that counts

- every signature over the whole dataset (for |F|), and
- every (unit, signature) pair inside the unit's masks (for |M_k ∩ F| and |M_k|)

answers every formula exactly, for every unit, without another pass over the data.  Per
block these are a readout of the product the tally counts from (each pixel class has one
signature: :func:`stages.tally.statistic.scored_block`).  Scoring a formula is then a dot
product over the (small) signature table; IoU uses ``union=global``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.engine.blocks import Block
from stages.engine.reduction import Partial, Statistic
from stages.signatures.formulas import Formula, evaluate
from stages.tally.labels import LabelSpace
from stages.tally.statistic import scored_block


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows (int64) and each row's index among them.  Rows are compared as raw
    bytes of the narrowest integer type that holds them: several times faster than
    ``np.unique(axis=0)``, which compares rows column by column."""
    width = rows.shape[1] if rows.ndim == 2 else 0
    if len(rows) == 0:
        return rows.reshape(0, width).astype(np.int64), np.zeros(0, np.int64)
    top = int(rows.max(initial=0))
    narrow = np.int16 if top < 2**15 else np.int32 if top < 2**31 else np.int64
    packed = np.ascontiguousarray(rows, dtype=narrow)
    keys = packed.view(np.dtype((np.void, packed.itemsize * width))).ravel()
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq.view(narrow).reshape(-1, width).astype(np.int64), inverse.reshape(-1)


def _summed_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and the sum of the weights of each."""
    distinct, inverse = np.unique(keys, return_inverse=True)
    totals = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(distinct))
    return distinct, totals.astype(np.int64)


@dataclass(frozen=True)
class SignaturePartial(Partial):
    table: np.ndarray  # (n_sig, W) int64 signatures (sorted dense labels, 0-padded)
    counts: np.ndarray  # (n_sig,) int64 pixels per signature
    unit: np.ndarray  # (M,) int64 unit of each (unit, signature) count
    sig: np.ndarray  # (M,) int64 signature row of each count
    unit_counts: np.ndarray  # (M,) int64 pixels of the signature inside the unit's masks
    units: np.ndarray  # () int64 number of units

    def counts_table(self, n_labels: int) -> SignatureCounts:
        """The signatures as dense matrices, ready to score formulas."""
        return SignatureCounts.from_partial(self, n_labels)


@dataclass(frozen=True)
class Signatures(Statistic):
    """Signature counts and (unit, signature) counts inside unit masks."""

    thresholds: np.ndarray  # (K,) float64
    space: LabelSpace
    kernel: str = "auto"
    partial_type = SignaturePartial

    def chunk(self, block: Block) -> SignaturePartial:
        k = block.acts.shape[1]
        if block.labels is None:
            empty = np.zeros(0, np.int64)
            return SignaturePartial(np.zeros((0, 1), np.int64), empty, empty, empty, empty,
                                    np.array(k))
        classes, masks = scored_block(block, self.thresholds, self.space, self.kernel)
        table, class_sig = unique_rows(classes.labels)
        counts = np.bincount(class_sig, weights=classes.size, minlength=len(table))
        n_sig = max(len(table), 1)
        keys, totals = _summed_by_key(masks.unit * n_sig + class_sig[masks.klass],
                                      masks.pixels)
        return SignaturePartial(table, counts.astype(np.int64), keys // n_sig, keys % n_sig,
                                totals, np.array(k))

    def combine(self, partials) -> SignaturePartial:
        width = max(p.table.shape[1] for p in partials)
        tables = [np.pad(p.table, ((0, 0), (width - p.table.shape[1], 0))) for p in partials]
        table, inverse = unique_rows(np.concatenate(tables))
        offsets = np.cumsum([0] + [len(t) for t in tables])
        counts = np.bincount(inverse, weights=np.concatenate([p.counts for p in partials]),
                             minlength=len(table)).astype(np.int64)
        n = max(len(table), 1)
        keys = np.concatenate([
            p.unit * n + inverse[offsets[i] + p.sig] for i, p in enumerate(partials)
        ]).astype(np.int64)
        uk, uc = _summed_by_key(keys, np.concatenate([p.unit_counts for p in partials]))
        return SignaturePartial(table, counts, uk // n, uk % n, uc, partials[0].units)


@dataclass
class SignatureCounts:
    """Finished signature counts as dense matrices over signatures."""

    membership: torch.Tensor  # (n_sig, L + 1) bool: signature carries dense label l
    counts: torch.Tensor  # (n_sig,) float64 pixels per signature over the dataset
    unit_counts: torch.Tensor  # (K, n_sig) float64 pixels per signature inside unit masks

    @staticmethod
    def from_partial(partial: SignaturePartial, n_labels: int) -> SignatureCounts:
        table = torch.from_numpy(partial.table)
        n_sig = table.shape[0]
        member = torch.zeros((n_sig, n_labels + 1), dtype=torch.bool)
        if n_sig:
            rows = torch.arange(n_sig)[:, None].expand_as(table)
            member[rows.reshape(-1), table.reshape(-1)] = True
        member[:, 0] = False
        unit_counts = torch.zeros((int(partial.units), n_sig), dtype=torch.float64)
        unit_counts[torch.from_numpy(partial.unit), torch.from_numpy(partial.sig)] = (
            torch.from_numpy(partial.unit_counts).double()
        )
        return SignatureCounts(member, torch.from_numpy(partial.counts).double(), unit_counts)

    def truth(self, formula: Formula, index: dict[str, list[int]]) -> torch.Tensor:
        """(n_sig,) bool: does each signature satisfy the formula (labels by name; a name
        may stand for several dense labels)."""
        return evaluate(formula, lambda name: self.membership[:, index[name]].any(dim=1))

    def score(self, truth: torch.Tensor) -> dict[str, np.ndarray]:
        """Counts and IoU (union=global) of one formula for every unit."""
        f = truth.double()
        inter = self.unit_counts @ f
        area = float(self.counts @ f)
        unit_area = self.unit_counts.sum(dim=1)
        union = unit_area + area - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
        return {"intersection": inter.round().long().numpy(), "label_area": int(round(area)),
                "unit_area": unit_area.round().long().numpy(),
                "union_area": union.round().long().numpy(), "iou": iou.numpy()}
