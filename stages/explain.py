"""Formula concepts and compositional explanations over label *signatures*.

A pixel's signature is the set of labels it carries (pixel planes plus the image's
image-level labels, set semantics).  Any formula of AND, OR and NOT over labels is a
function of the signature alone, so one block reduction that counts

- every signature over the whole dataset (for |F|), and
- every (unit, signature) pair inside the unit's masks (for |M_k ∩ F| and |M_k|)

answers every formula exactly, for every unit, without another pass over the data.  Scoring a
formula is then a dot product over the (small) signature table; the beam search of Mu &
Andreas (2020) runs entirely on these tables.  IoU uses ``union=global`` (SEMANTICS.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from stages.engine.blocks import Block, LayerBlocks, ScoringBlocks
from stages.engine.reduction import Arrays, Pass
from stages.signatures.formulas import And, Formula, Label, Not, Or, format_formula, formula_length
from stages.tally.compiled import class_signatures
from stages.tally.kernels import float32_below, masked_pixels, skip_bound, tally_plan
from stages.tally.labels import LabelSpace, tally_inputs


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class SignaturePartial(Arrays):
    table: np.ndarray  # (n_sig, W) int64 signatures (sorted dense labels, 0-padded)
    counts: np.ndarray  # (n_sig,) int64 pixels per signature
    unit: np.ndarray  # (M,) int64 unit of each (unit, signature) count
    sig: np.ndarray  # (M,) int64 signature row of each count
    unit_counts: np.ndarray  # (M,) int64 pixels of the signature inside the unit's masks
    units: np.ndarray  # () int64 number of units


@dataclass(frozen=True)
class Signatures:
    """Statistic: signature counts and (unit, signature) counts inside unit masks."""

    thresholds: np.ndarray  # (K,) float64
    space: LabelSpace
    pair_chunk: int = 4096
    partial_type = SignaturePartial

    def chunk(self, block: Block) -> SignaturePartial:
        acts = block.acts.cpu()
        if block.labels is None:
            return self._empty(acts.shape[1])
        inputs = tally_inputs(block.labels, self.space, "set", "cpu")
        pixel_class, class_rows = class_signatures(
            inputs.stored_pixel.numpy(), inputs.stored_image.numpy(), inputs.lut.numpy())
        table, class_sig = _unique_rows(class_rows)
        sig_id = torch.from_numpy(class_sig[pixel_class])  # (B, S) signature of every pixel
        counts = np.bincount(sig_id.view(-1).numpy(), minlength=len(table)).astype(np.int64)
        k, h, w = acts.shape[1:]
        t32 = float32_below(torch.from_numpy(np.asarray(self.thresholds, np.float64)))
        n_sig = max(len(table), 1)
        plan = tally_plan(acts.device, (h, w, *block.seg_size))
        if plan is not None:  # the compiled loop: mask pixels per class, then per signature
            unit, klass, pixels = plan.unit_class_counts(
                acts.numpy(), t32.numpy(), skip_bound(t32).numpy(), pixel_class)
            keys, inverse = np.unique(unit * n_sig + class_sig[klass], return_inverse=True)
            totals = np.bincount(inverse.reshape(-1), weights=pixels, minlength=len(keys))
        else:
            keys, totals = self._mask_signature_counts(acts, t32, sig_id, n_sig, block.seg_size)
        return SignaturePartial(table.astype(np.int64), counts, keys // n_sig, keys % n_sig,
                                totals.astype(np.int64), np.array(k))

    def _mask_signature_counts(self, acts: torch.Tensor, t32: torch.Tensor, sig_id: torch.Tensor,
                               n_sig: int, seg_size: tuple[int, int]
                               ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted (unit · n_sig + signature) keys and their pixels, from every mask pixel (the
        torch kernels: where the compiled loop is not exact)."""
        active = acts.amax(dim=(2, 3)) > skip_bound(t32)[None, :]
        bi_all, ki_all = torch.nonzero(active, as_tuple=True)
        keys = []
        for i in range(0, len(bi_all), self.pair_chunk):
            bi, ki = bi_all[i : i + self.pair_chunk], ki_all[i : i + self.pair_chunk]
            pair, pix = masked_pixels(acts[bi, ki], t32[ki], seg_size)
            keys.append(ki[pair] * n_sig + sig_id[bi[pair], pix])
        flat = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        uk, uc = torch.unique(flat, return_counts=True)
        return uk.numpy(), uc.numpy()

    def _empty(self, k: int) -> SignaturePartial:
        return SignaturePartial(np.zeros((0, 1), np.int64), np.zeros(0, np.int64),
                                np.zeros(0, np.int64), np.zeros(0, np.int64),
                                np.zeros(0, np.int64), np.array(k))

    def combine(self, partials) -> SignaturePartial:
        width = max(p.table.shape[1] for p in partials)
        tables = [np.pad(p.table, ((0, 0), (width - p.table.shape[1], 0))) for p in partials]
        table, inverse = _unique_rows(np.concatenate(tables))
        offsets = np.cumsum([0] + [len(t) for t in tables])
        counts = np.bincount(inverse, weights=np.concatenate([p.counts for p in partials]),
                             minlength=len(table)).astype(np.int64)
        n = max(len(table), 1)
        keys = np.concatenate([
            p.unit * n + inverse[offsets[i] + p.sig] for i, p in enumerate(partials)
        ]).astype(np.int64)
        weights = np.concatenate([p.unit_counts for p in partials])
        uk, inv = np.unique(keys, return_inverse=True)
        uc = np.bincount(inv.reshape(-1), weights=weights, minlength=len(uk)).astype(np.int64)
        return SignaturePartial(table, counts, uk // n, uk % n, uc, partials[0].units)

    def finish(self, partial: SignaturePartial) -> dict[str, np.ndarray]:
        return partial.state_dict()


class SignatureReduction(Pass):
    """Signature counts of one layer against one concept store, as a pass of its own."""

    def __init__(self, blocks: LayerBlocks, concept_path: str, thresholds: np.ndarray,
                 space: LabelSpace, rows: np.ndarray | None = None):
        super().__init__(ScoringBlocks(blocks, concept_path, rows),
                         (Signatures(thresholds, space),), single=True)


@dataclass
class SignatureCounts:
    """The finished reduction as dense matrices over signatures."""

    membership: torch.Tensor  # (n_sig, L + 1) bool: signature carries dense label l
    counts: torch.Tensor  # (n_sig,) float64 pixels per signature over the dataset
    unit_counts: torch.Tensor  # (K, n_sig) float64 pixels per signature inside unit masks

    @staticmethod
    def from_partial(partial: dict, n_labels: int) -> SignatureCounts:
        table = torch.from_numpy(partial["table"])
        n_sig = table.shape[0]
        member = torch.zeros((n_sig, n_labels + 1), dtype=torch.bool)
        if n_sig:
            rows = torch.arange(n_sig)[:, None].expand_as(table)
            member[rows.reshape(-1), table.reshape(-1)] = True
        member[:, 0] = False
        k = int(partial["units"])
        unit_counts = torch.zeros((k, n_sig), dtype=torch.float64)
        unit_counts[torch.from_numpy(partial["unit"]), torch.from_numpy(partial["sig"])] = (
            torch.from_numpy(partial["unit_counts"]).double()
        )
        return SignatureCounts(member, torch.from_numpy(partial["counts"]).double(), unit_counts)

    def evaluate(self, formula: Formula, index: dict[str, list[int]]) -> torch.Tensor:
        """(n_sig,) bool: does each signature satisfy the formula (labels by name)."""
        if isinstance(formula, Label):
            return self.membership[:, index[formula.name]].any(dim=1)
        if isinstance(formula, Not):
            return ~self.evaluate(formula.operand, index)
        left = self.evaluate(formula.left, index)
        right = self.evaluate(formula.right, index)
        return left & right if isinstance(formula, And) else left | right

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


def formula_frame(sc: SignatureCounts, formulas: dict[str, Formula], index, meta: dict) -> pd.DataFrame:
    """Rows for formula concepts in the iou table's schema (category 'formula')."""
    frames = []
    for i, (name, formula) in enumerate(formulas.items()):
        r = sc.score(sc.evaluate(formula, index))
        k = len(r["iou"])
        frames.append(pd.DataFrame({
            "unit": np.arange(k), "label": -(i + 1), "concept": name, "category": "formula",
            "intersection": r["intersection"], "label_area": r["label_area"],
            "unit_area": r["unit_area"], "union_area": r["union_area"], "iou": r["iou"],
        }))
    frame = pd.concat(frames, ignore_index=True)
    frame["label_area"] = frame["label_area"].astype(np.int64)
    for key, value in meta.items():
        frame.insert(0, key, value)
    return frame


def explanation_frame(found: list[tuple[Formula | None, float]], meta: dict) -> pd.DataFrame:
    """The explanations table: per unit its best formula, IoU and formula length."""
    frame = pd.DataFrame({
        "unit": np.arange(len(found)),
        "formula": [format_formula(f) if f is not None else "" for f, _ in found],
        "iou": [score for _, score in found],
        "length": [formula_length(f) if f is not None else 0 for f, _ in found],
    })
    for key, value in meta.items():
        frame.insert(0, key, value)
    return frame


def beam_search(
    sc: SignatureCounts, names: list[str], max_length: int = 3, beam: int = 5
) -> list[tuple[Formula, float]]:
    """Best formula per unit (Mu & Andreas 2020): labels joined by AND, OR, AND NOT.

    names[i] is the name of dense label i + 1.  Returns, per unit, (formula, iou).
    Each candidate is scored with two matrix products over the signature table: for a
    formula f and every label l at once, |f AND l| gives |f OR l| and |f AND NOT l|.
    """
    member = sc.membership[:, 1:].double()  # (n_sig, L)
    area_l = sc.counts @ member  # (L,)
    unit_area = sc.unit_counts.sum(dim=1)  # (K,)
    inter_l = sc.unit_counts @ member  # (K, L)
    results = []
    for k in range(sc.unit_counts.shape[0]):
        def iou(inter, area, k=k):
            union = unit_area[k] + area - inter
            return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))

        single = iou(inter_l[k], area_l)
        order = torch.argsort(single, descending=True, stable=True)[:beam]
        current = [(Label(names[i]), member[:, i] > 0, float(single[i])) for i in order.tolist()]
        best = max(current, key=lambda c: c[2]) if current else (None, None, 0.0)
        for _ in range(max_length - 1):
            candidates = []
            for formula, truth, _score in current:
                f = truth.double()
                both_area = (sc.counts * f) @ member
                both_inter = (sc.unit_counts[k] * f) @ member
                f_area = float(sc.counts @ f)
                f_inter = float(sc.unit_counts[k] @ f)
                ops = {
                    "and": (both_inter, both_area),
                    "or": (f_inter + inter_l[k] - both_inter, f_area + area_l - both_area),
                    "and_not": (f_inter - both_inter, f_area - both_area),
                }
                for op, (inter, area) in ops.items():
                    scores = iou(inter, area)
                    for i in torch.argsort(scores, descending=True, stable=True)[:beam].tolist():
                        candidates.append((float(scores[i]), op, formula, truth, i))
            candidates.sort(key=lambda c: -c[0])
            seen, nxt = set(), []
            for score, op, formula, truth, i in candidates:
                lab = member[:, i] > 0
                if op == "and":
                    new, t = And(formula, Label(names[i])), truth & lab
                elif op == "or":
                    new, t = Or(formula, Label(names[i])), truth | lab
                else:
                    new, t = And(formula, Not(Label(names[i]))), truth & ~lab
                text = format_formula(new)
                if text in seen:
                    continue
                seen.add(text)
                nxt.append((new, t, score))
                if len(nxt) == beam:
                    break
            if not nxt:
                break
            current = nxt
            top = max(current, key=lambda c: c[2])
            if top[2] > best[2] + 1e-12:
                best = top
        results.append((best[0], float(best[2])))
    return results
