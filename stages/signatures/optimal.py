"""Provably optimal compositional explanations (SEMANTICS.md §12) by branch and bound over
the signature counts.

The grammar is compexp's (:mod:`stages.signatures.grammar`): left-deep formulas
``((a op b) op c) …`` with op in AND, OR, AND NOT, over distinct labels.  Every count a
formula needs is an inclusion–exclusion sum of *co-occurrences* (pixels carrying every label
of a set q), so a node keeps its Möbius coefficients μ(q) and |f ∧ c| for every label c at
once is Σ_q μ(q)·C(q ∪ {c}): singles and pairs come from dense tables, larger sets from the
few signatures that hold them.

Pruning is additive.  With b the incumbent's IoU, a formula beats it iff
V(g) = I(g) − b·W(g) > b·U (I inside the unit's masks, W outside, U the unit's area), and
V is a sum over signatures; P(g), the sum of its positive terms, bounds V of every subset of
g.  A node g with r steps left reaches sets inside g ∪ c₁ ∪ … ∪ c_r, so every formula below
it has V ≤ max(P(g) + top_{r−1} P, V(g) + top_r P), P over single labels — an admissible
bound that needs no expansion.  The incumbent is seeded by scoring the children of the
best two-label formulas first (:meth:`_Search._seed`).  Ties go to the shorter formula, then
to the smallest (label, operator, label, …) sequence, operators ordered AND < OR < AND NOT.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from stages.signatures.cooccurrence import LayerTables, UnitTables
from stages.signatures.grammar import (
    AND,
    AND_NOT,
    OPERATORS,
    OR,
    START,
    Mobius,
    State,
    canonical_labels,
    child_mobius,
    next_state,
)


@dataclass
class Explanation:
    """One unit's answer and its certificate."""

    key: tuple[int, ...]  # (label, op, label, op, label…) in written order; () = none
    iou: float
    bound: float  # every formula of the grammar has IoU ≤ bound
    optimal: bool
    nodes: int  # nodes whose children were scored
    seconds: float


@dataclass(order=True)
class _Node:
    priority: float
    key: tuple[int, ...] = field(compare=True)
    mobius: Mobius = field(compare=False)
    inter: float = field(compare=False)
    area: float = field(compare=False)
    pos: float = field(compare=False)
    state: State = field(compare=False)  # family, last +, last −, last OR
    cover: tuple[int, ...] = field(compare=False)  # labels whose union holds the formula


_BATCH = 32  # nodes expanded together (one product each), at the incumbent before them
_SEED = 64  # two-label formulas whose children are scored before the search (see _seed)


def _iou(inter, area, unit_area):
    union = unit_area + area - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


class _Search:
    """The search for one unit."""

    def __init__(self, unit: UnitTables, max_length: int, max_nodes: int | None,
                 time_limit: float | None, trace: list | None = None) -> None:
        self.t, self.m, self.trace = unit, max_length, trace
        self.n = len(unit.layer.names)
        self.max_nodes, self.deadline = max_nodes, (
            None if time_limit is None else time.perf_counter() + time_limit)
        self.best_key: tuple[int, ...] = ()
        self.best = -1.0
        self.nodes = 0
        self.unbuilt: float | None = None  # bound of open pairs a budget left unbuilt
        self.margin = 1e-9 * (unit.area + unit.layer.total)  # far above float rounding

    def offer(self, key: tuple[int, ...], iou: float) -> None:
        if iou > self.best or (iou == self.best and (len(key), key) < (len(self.best_key),
                                                                      self.best_key)):
            self.best, self.best_key = iou, key

    def offer_vector(self, prefix: tuple[int, ...], op: int, iou: np.ndarray,
                     allowed: np.ndarray) -> None:
        if not allowed.any():
            return
        masked = np.where(allowed, iou, -1.0)
        top = masked.max()
        if top >= self.best:
            self.offer(prefix + (op, int(np.flatnonzero(masked == top)[0])), float(top))

    def value(self, inter, area):
        return inter - self.t.incumbent * (area - inter)

    def bound(self, value, pos, steps: int, cover_terms=None):
        """A bound on V of every formula ``steps`` steps below nodes with these counts:
        inside g ∪ c₁ ∪ … (top P over labels), and for one step the label-level terms of
        :meth:`cover_terms` (AND: P(g ∧ c); AND NOT: V(g) + N(g ∧ c); OR: V(g) + V(c) +
        N(g ∧ c), each through the labels covering g)."""
        t = self.t
        generic = np.maximum(pos + t.top_pos[min(steps - 1, self.n)],
                             value + t.top_pos[min(steps, self.n)])
        if steps != 1 or cover_terms is None:
            return generic
        most_pos, most_neg, most_gain = cover_terms
        one = np.maximum(np.minimum(pos, most_pos), value + np.maximum(most_neg, most_gain))
        return np.minimum(generic, one)

    def cover_terms(self, cover: tuple[int, ...], repeats: bool):
        """Bounds over all labels c of P(g ∧ c), N(g ∧ c) and V(c) + N(g ∧ c) for a formula
        g inside the union of the labels ``cover``."""
        pos, neg, gain = self.t.most[repeats]
        total_neg = sum(neg[a] for a in cover)
        return (sum(pos[a] for a in cover), total_neg,
                min(gain[a] + total_neg - neg[a] for a in cover))

    def iou_bound(self, inter, steps: int) -> np.ndarray:
        """An IoU-valued bound below a node (for a stopped search's certificate)."""
        t = self.t
        return np.minimum(inter + t.top_inter[min(steps, self.n)], t.area) / max(t.area, 1.0)

    def survives(self, value) -> np.ndarray:
        return value >= self.t.incumbent * self.t.area - self.margin

    def raise_incumbent(self) -> None:
        """Rebuild the P tables at the incumbent once it has grown by 1% (tables of a
        smaller incumbent bound soundly, only less tightly)."""
        if self.best > 1.01 * self.t.incumbent:
            self.t.set_incumbent(self.best)

    def run(self) -> Explanation:
        start, t, n = time.perf_counter(), self.t, self.n
        if n == 0:
            return Explanation((), 0.0, 0.0, True, 0, 0.0)
        self.nodes = 1
        single = _iou(t.inter, t.layer.area, t.area)
        self.best_key, self.best = (int(np.argmax(single)),), float(single.max())
        if self.m == 1 or t.inter.max() <= 0:  # nothing overlaps the unit: every IoU is 0
            return self._done(start, [])
        self.nodes += n
        labels = np.arange(n)
        pair_i, pair_a = t.pair_inter, t.layer.pair_area
        ci, ca = t.inter, t.layer.area
        upper = labels[None, :] > labels[:, None]
        distinct = labels[None, :] != labels[:, None]
        level = {AND: (pair_i, pair_a, upper),
                 OR: (ci[:, None] + ci[None, :] - pair_i, ca[:, None] + ca[None, :] - pair_a,
                      upper),
                 AND_NOT: (ci[:, None] - pair_i, ca[:, None] - pair_a, distinct)}
        ious = []
        for op in OPERATORS:
            inter, area, allowed = level[op]
            ious.append(np.where(allowed, _iou(inter, area, t.area), -1.0))
            top = ious[-1].max()
            if top >= self.best:
                a, c = np.argwhere(ious[-1] == top)[0]
                self.offer((int(a), op, int(c)), float(top))
        if self.m == 2:
            return self._done(start, [])
        t.set_incumbent(self.best)
        self._seed(level, np.stack(ious).ravel())
        return self._branch(self._second_level(level), start)

    def _seed(self, level, flat: np.ndarray) -> None:
        """Score the children of the ``_SEED`` best two-label formulas (IoUs ``flat``, by
        operator, label, label) first: the incumbent they give is at or near the optimum for
        most units, and every pair the second level opens and every node the search expands
        is then bounded against it (started at the best pair's IoU, the search expanded
        about twice the nodes on the benchmark's layer)."""
        n2, seeds = self.n * self.n, _SEED
        if self.max_nodes is not None:
            seeds = min(seeds, self.max_nodes - self.nodes)
        if seeds <= 0 or self._out_of_budget():
            return
        top = np.argpartition(-flat, seeds)[:seeds] if flat.size > seeds else range(flat.size)
        nodes = [self._pair_node(level, int(i) // n2, *divmod(int(i) % n2, self.n), 0.0)
                 for i in top if flat[i] >= 0]
        if not nodes:  # one label: no two-label formula
            return
        self.nodes += len(nodes)
        self._expand(nodes, [])  # their subtrees stay in the search: only the offers count
        self.t.set_incumbent(self.best)

    def _pair_node(self, level, op: int, a: int, c: int, value: float) -> _Node:
        t = self.t
        inter, area, _ = level[op]
        pos = {AND: t.pair_pos[a, c], OR: t.pos[a] + t.pos[c] - t.pair_pos[a, c],
               AND_NOT: t.pos[a] - t.pair_pos[a, c]}[op]
        cover = (a,) if op == AND_NOT else (a, c) if op == OR else (
            (a,) if t.most[False][0][a] <= t.most[False][0][c] else (c,))
        return _Node(-value, (a, op, c), child_mobius({(a,): 1.0}, op, c),
                     float(inter[a, c]), float(area[a, c]), float(pos),
                     next_state((START, a, -1, a), op, c), cover)

    def _second_level(self, level) -> list[_Node]:
        """Every two-label formula whose subtree may hold a better one, as open nodes."""
        t, steps = self.t, self.m - 2
        cp, pair_p = t.pos, t.pair_pos
        pos_of = {AND: pair_p, OR: cp[:, None] + cp[None, :] - pair_p,
                  AND_NOT: cp[:, None] - pair_p}
        terms = self._pair_terms(level, pos_of)
        heap: list[_Node] = []
        found = []  # per operator, its open pairs: op, a, c, bound, inter
        for op in OPERATORS:
            inter, area, allowed = level[op]
            value = self.bound(self.value(inter, area), pos_of[op], steps, terms[op])
            if self.trace is not None:
                self.trace.extend(((int(a), op, int(c)), t.incumbent, float(value[a, c]))
                                  for a, c in np.argwhere(allowed))
            a, c = np.nonzero(allowed & self.survives(value))
            found.append((np.full(a.size, op), a, c, value[a, c], inter[a, c]))
        ops, firsts, seconds, values, inters = (np.concatenate(column)
                                                for column in zip(*found, strict=True))
        for built in range(ops.size):  # op by op, each pair table in row order
            if built % 4096 == 4095 and self._out_of_budget():  # the rest stay unbuilt
                self.unbuilt = float(self.iou_bound(inters[built:].max(), steps))
                break
            heap.append(self._pair_node(level, int(ops[built]), int(firsts[built]),
                                        int(seconds[built]), float(values[built])))
        heapq.heapify(heap)
        return heap

    def _pair_terms(self, level, pos_of):
        """Per two-label formula g, :meth:`cover_terms` tightened with g's own counts:
        for g ⊆ a, V(g ∧ c) ≤ V(a ∧ c) + N(a) − N(g); for g = a ∨ b, V(g ∧ c) ≤ V(a ∧ c)
        + V(b ∧ c) + N(a ∧ b); N(g ∧ c) ≤ N(g); V(c) + N(g ∧ c) ≤ max V(c) + N(g)."""
        t = self.t
        p, ng, gn = (x[:, None] for x in t.most[False])
        pt, nt, gt = (x[None, :] for x in t.most[False])
        vm, n1 = t.most_pair_value, t.single_negative
        within = {AND: np.minimum((vm + n1)[:, None], (vm + n1)[None, :]),
                  AND_NOT: (vm + n1)[:, None], OR: None}
        terms = {}
        for op, (most_pos, most_neg, most_gain) in {
                AND: (np.minimum(p, pt), np.minimum(ng, nt), np.minimum(gn, gt)),
                AND_NOT: (p, ng, gn),
                OR: (p + pt, ng + nt, np.minimum(gn + nt, gt + ng))}.items():
            inter, area, _ = level[op]
            negative = pos_of[op] - self.value(inter, area)  # N(g)
            tighter = (vm[:, None] + vm[None, :] + t.pair_negative if op == OR
                       else within[op] - negative)
            terms[op] = (np.minimum(most_pos, tighter), np.minimum(most_neg, negative),
                         np.minimum(most_gain, t.value.max() + negative))
        return terms

    def _node_bound(self, node: _Node) -> float:
        steps = self.m - (len(node.key) + 1) // 2
        terms = self.cover_terms(node.cover, (len(node.key) + 1) // 2 >= 3)
        fresh = float(self.bound(self.value(node.inter, node.area), node.pos, steps, terms))
        return min(fresh, -node.priority)  # the bound at push time stays valid

    def _branch(self, heap: list[_Node], start: float) -> Explanation:
        while heap:
            if self._out_of_budget():
                return self._done(start, heap)
            batch = []
            while heap and len(batch) < _BATCH and not self._out_of_budget(len(batch)):
                node = heapq.heappop(heap)
                limit = self._node_bound(node)
                if self.trace is not None:
                    self.trace.append((node.key, self.t.incumbent, limit))
                if self.survives(limit):
                    batch.append(node)
            self.nodes += len(batch)
            for depth in sorted({len(node.key) for node in batch}):
                self._expand([node for node in batch if len(node.key) == depth], heap)
            self.raise_incumbent()
        return self._done(start, [])

    def _and_part(self, nodes: list[_Node], positive: bool, count: bool):
        """Per node, Σ_q μ(q)·(I, P, W) of q ∪ {c} for every label c — the counts of
        ``node AND c`` — with W as (low, high): equal where every table is at hand, or,
        with ``count`` False, bounded from the pair tables where a dataset count would be
        needed.  One product over the nodes' distinct sets q."""
        t = self.t
        sets = list(dict.fromkeys(q for node in nodes for q in node.mobius))
        column = {q: j for j, q in enumerate(sets)}
        mobius = np.zeros((len(nodes), len(sets)))
        for i, node in enumerate(nodes):
            for q, v in node.mobius.items():
                mobius[i, column[q]] = v
        inside_table = t.inside(sets)
        inside = mobius @ inside_table
        positive_part = mobius @ t.positive(sets) if positive else np.zeros_like(inside)
        ranges = t.outside(sets, inside_table, count)
        plus, minus = np.maximum(mobius, 0.0), np.maximum(-mobius, 0.0)
        return (inside, positive_part, plus @ ranges[:, 0] - minus @ ranges[:, 1],
                plus @ ranges[:, 1] - minus @ ranges[:, 0])

    def _children(self, nodes: list[_Node], inside, positive, outside):
        """Per operator, the children's (I, P, W) from the AND part's (one W of its range)."""
        t = self.t
        inter, pos = (np.array([[getattr(n, f)] for n in nodes]) for f in ("inter", "pos"))
        own = np.array([[n.area - n.inter] for n in nodes])
        return {AND: (inside, positive, outside[0]),
                OR: (inter + t.inter - inside, pos + t.pos - positive,
                     own + t.layer.area - t.inter - outside[1]),
                AND_NOT: (inter - inside, pos - positive, own - outside[1])}

    def _expand(self, nodes: list[_Node], heap: list[_Node]) -> None:
        """Score every child of nodes of one depth, push those that may lead higher."""
        t, n = self.t, self.n
        depth = (len(nodes[0].key) + 1) // 2
        steps = self.m - depth - 1
        fresh = np.ones((len(nodes), n), bool)
        if depth < 3:  # a label used twice in ≤ 3 steps always gives a shorter formula
            for row, node in zip(fresh, nodes, strict=True):
                row[list(node.key[0::2])] = False
        allowed = {op: fresh & np.stack([canonical_labels(node.state, op, n) for node in nodes])
                   for op in OPERATORS}
        inside, positive, low, high = self._and_part(nodes, steps > 0, count=False)
        loose = (low != high).any(axis=1)
        if loose.any():  # some dataset counts are not at hand: are they needed?
            wide = self._children(nodes, inside, positive, (low, high))
            needed = np.zeros(len(nodes), bool)
            for op, (i, p, w) in wide.items():
                needed |= (self._survivors(i - t.incumbent * w, p, steps) & allowed[op]).any(1)
            skip = loose & ~needed
            self._trace([node for node, s in zip(nodes, skip, strict=True) if s],
                        {op: tuple(x[skip] for x in v) for op, v in wide.items()},
                        {op: a[skip] for op, a in allowed.items()}, steps)
            keep = ~skip
            nodes = [node for node, k in zip(nodes, keep, strict=True) if k]
            if not nodes:
                return
            allowed = {op: a[keep] for op, a in allowed.items()}
            inside, positive = inside[keep], positive[keep]
            low, high = self._and_part(nodes, False, count=True)[2:]
        children = self._children(nodes, inside, positive, (high, low))
        self._trace(nodes, children, allowed, steps)
        for op, (inter, pos, outside) in children.items():
            area = inter + outside
            iou = np.where(allowed[op], _iou(inter, area, t.area), -1.0)
            top = iou.max(axis=1)
            for i in np.flatnonzero(top >= self.best):
                self.offer(nodes[i].key + (op, int(np.argmax(iou[i]))), float(top[i]))
            if steps == 0:
                continue
            value = self.bound(inter - t.incumbent * outside, pos, steps)
            for i, c in np.argwhere(allowed[op] & self.survives(value)):
                node, c = nodes[i], int(c)
                cover = (node.cover + (c,) if op == OR else node.cover if op == AND_NOT
                         else min(node.cover, (c,), key=len))
                heapq.heappush(heap, _Node(-float(value[i, c]), node.key + (op, c),
                                           child_mobius(node.mobius, op, c),
                                           float(inter[i, c]), float(area[i, c]),
                                           float(pos[i, c]), next_state(node.state, op, c),
                                           cover))

    def _survivors(self, value, pos, steps: int) -> np.ndarray:
        """Children whose formula (last step) or subtree may beat the incumbent."""
        return self.survives(value if steps == 0 else self.bound(value, pos, steps))

    def _trace(self, nodes: list[_Node], children, allowed, steps: int) -> None:
        if self.trace is None or steps == 0:
            return
        for op, (inter, pos, outside) in children.items():
            value = self.bound(inter - self.t.incumbent * outside, pos, steps)
            for i, c in np.argwhere(allowed[op]):
                self.trace.append((nodes[i].key + (op, int(c)), self.t.incumbent,
                                   float(value[i, c])))

    def _out_of_budget(self, pending: int = 0) -> bool:
        if self.max_nodes is not None and self.nodes + pending >= self.max_nodes:
            return True
        return self.deadline is not None and time.perf_counter() > self.deadline

    def _done(self, start: float, open_nodes: list[_Node]) -> Explanation:
        bound = self.best if self.unbuilt is None else max(self.best, self.unbuilt)
        for node in open_nodes:
            steps = self.m - (len(node.key) + 1) // 2
            bound = max(bound, float(self.iou_bound(np.float64(node.inter), steps)))
        proven = not open_nodes and self.unbuilt is None
        return Explanation(self.best_key, self.best, bound, proven, self.nodes,
                           time.perf_counter() - start)


def optimal_search(layer: LayerTables, max_length: int = 3, max_nodes: int | None = None,
                   time_limit: float | None = None, units: list[int] | None = None,
                   trace: list | None = None) -> list[Explanation]:
    """Per unit, the formula of at most ``max_length`` labels with the highest IoU
    (union=global), with its certificate; ``max_nodes`` and ``time_limit`` (seconds) bound
    each unit's search, and a unit they stop reports its open bound instead of optimality.
    ``trace`` (for the tests of admissibility) receives, per unit, a list of every bound the
    search computed: (node key, incumbent IoU, bound on V below the node)."""
    chosen = range(layer.n_units) if units is None else units
    found = []
    for k in chosen:
        seen = None if trace is None else []
        found.append(_Search(UnitTables(layer, k), max_length, max_nodes, time_limit,
                             seen).run())
        if trace is not None:
            trace.append(seen)
    return found
