"""Compositional explanations by beam search (Mu & Andreas 2020) over signature counts.

A formula joins labels with AND, OR and AND NOT, left-deep, as compexp does.  Every candidate
is scored with two matrix products over the signature table: for a formula f and every label
l at once, |f AND l| gives |f OR l| and |f AND NOT l|, inside each unit's masks and over the
dataset.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stages.signatures.formulas import And, Formula, Label, Not, Or, format_formula
from stages.signatures.statistic import SignatureCounts

OPERATORS = ("and", "or", "and_not")


class Candidate(NamedTuple):
    formula: Formula
    truth: torch.Tensor  # (n_sig,) bool: the signatures the formula holds on
    iou: float


def _iou(unit_area: torch.Tensor, inter: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    union = unit_area + area - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def _extend(c: Candidate, op: str, label: str, member: torch.Tensor) -> Candidate:
    """``c.formula`` joined with one label (truth ``member``) by ``op``; iou filled later."""
    if op == "and":
        return Candidate(And(c.formula, Label(label)), c.truth & member, 0.0)
    if op == "or":
        return Candidate(Or(c.formula, Label(label)), c.truth | member, 0.0)
    return Candidate(And(c.formula, Not(Label(label))), c.truth & ~member, 0.0)


def beam_search(sc: SignatureCounts, names: list[str], max_length: int = 3, beam: int = 5
                ) -> list[tuple[Formula | None, float]]:
    """Best formula per unit of at most ``max_length`` labels, and its IoU (union=global).

    names[i] is the name of dense label i + 1.  Each step keeps the ``beam`` best distinct
    formulas (ties by the order candidates were found, which is deterministic).
    """
    member = sc.membership[:, 1:].double()  # (n_sig, L)
    area_l = sc.counts @ member  # (L,)
    unit_area = sc.unit_counts.sum(dim=1)  # (K,)
    inter_l = sc.unit_counts @ member  # (K, L)
    results: list[tuple[Formula | None, float]] = []
    for k in range(sc.unit_counts.shape[0]):
        single = _iou(unit_area[k], inter_l[k], area_l)
        order = torch.argsort(single, descending=True, stable=True)[:beam]
        current = [Candidate(Label(names[i]), member[:, i] > 0, float(single[i]))
                   for i in order.tolist()]
        best = max(current, key=lambda c: c.iou) if current else None
        for _ in range(max_length - 1):
            scored = []
            for c in current:
                f = c.truth.double()
                both_area, both_inter = (sc.counts * f) @ member, (sc.unit_counts[k] * f) @ member
                f_area, f_inter = float(sc.counts @ f), float(sc.unit_counts[k] @ f)
                ops = {"and": (both_inter, both_area),
                       "or": (f_inter + inter_l[k] - both_inter, f_area + area_l - both_area),
                       "and_not": (f_inter - both_inter, f_area - both_area)}
                for op in OPERATORS:
                    scores = _iou(unit_area[k], *ops[op])
                    for i in torch.argsort(scores, descending=True, stable=True)[:beam].tolist():
                        scored.append((float(scores[i]), op, c, i))
            scored.sort(key=lambda s: -s[0])
            seen, following = set(), []
            for score, op, c, i in scored:
                new = _extend(c, op, names[i], member[:, i] > 0)._replace(iou=score)
                text = format_formula(new.formula)
                if text in seen:
                    continue
                seen.add(text)
                following.append(new)
                if len(following) == beam:
                    break
            if not following:
                break
            current = following
            top = max(current, key=lambda c: c.iou)
            if best is None or top.iou > best.iou + 1e-12:
                best = top
        results.append((best.formula, best.iou) if best is not None else (None, 0.0))
    return results
