"""compexp's formula grammar as the optimal search writes it (SEMANTICS.md §12): search keys,
the one canonical writing of each formula, and the Möbius coefficients of a formula's count.

A key is ``(label, op, label, op, label…)`` for the left-deep formula ``((a op b) op c) …``
over distinct labels, op in AND, OR, AND NOT.  Commuting labels within a run of AND / AND NOT
steps or within a run of ORs gives the same formula, so the search extends only the writing in
which each run lists its labels in increasing order (positive labels first): every formula is
searched once.
"""

from __future__ import annotations

import numpy as np

from stages.signatures.formulas import And, Formula, Label, Not, Or

AND, OR, AND_NOT = 0, 1, 2
OPERATORS = (AND, OR, AND_NOT)
START, AND_RUN, OR_RUN = 0, 1, 2  # the family of a key's last step (START: one label)

State = tuple[int, int, int, int]  # family, last positive label, last negated label, last OR
Mobius = dict[tuple[int, ...], float]  # label set q -> its coefficient μ(q)


def formula_of(key: tuple[int, ...], names: list[str]) -> Formula | None:
    """The formula tree of a search key."""
    if not key:
        return None
    formula: Formula = Label(names[key[0]])
    for op, label in zip(key[1::2], key[2::2], strict=True):
        leaf = Label(names[label])
        formula = (And(formula, leaf) if op == AND else Or(formula, leaf) if op == OR
                   else And(formula, Not(leaf)))
    return formula


def canonical_labels(state: State, op: int, n_labels: int) -> np.ndarray:
    """Labels c for which ``node op c`` is the canonical writing of its formula: a run of
    AND / AND NOT steps lists its positive labels first, each run in increasing order, and a
    run of ORs in increasing order (the other orders are the same formula)."""
    family, last_pos, last_neg, last_or = state
    c = np.arange(n_labels)
    if op == AND:
        if family == OR_RUN:
            return np.ones(n_labels, bool)
        return (c > last_pos) if last_neg < 0 else np.zeros(n_labels, bool)
    if op == AND_NOT:
        return np.ones(n_labels, bool) if family == OR_RUN else c > last_neg
    return np.ones(n_labels, bool) if family == AND_RUN else c > last_or


def next_state(state: State, op: int, c: int) -> State:
    """The state of ``node op c``, for :func:`canonical_labels` at the next step."""
    family, last_pos, last_neg, _ = state
    fresh = family == OR_RUN
    if op == AND:
        return (AND_RUN, c, -1 if fresh else last_neg, -1)
    if op == AND_NOT:
        return (AND_RUN, -1 if fresh else last_pos, c, -1)
    return (OR_RUN, -1, -1, c)


def child_mobius(mobius: Mobius, op: int, c: int) -> Mobius:
    """μ of ``f op c`` from μ of f: |f ∧ c| joins c to every set, OR and AND NOT combine that
    with f's own terms by inclusion–exclusion."""
    joined: Mobius = {}
    for q, v in mobius.items():
        union = tuple(sorted(set(q) | {c}))
        joined[union] = joined.get(union, 0.0) + v
    if op == AND:
        return joined
    out = dict(mobius)
    if op == OR:
        out[(c,)] = out.get((c,), 0.0) + 1.0
    for q, v in joined.items():
        out[q] = out.get(q, 0.0) - v
    return {q: v for q, v in out.items() if v != 0.0}
