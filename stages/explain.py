"""Stage ``explain``: per unit, its best compositional explanation — a formula of labels joined
by AND, OR and AND NOT — found over the layer's signature counts (:mod:`stages.signatures`)
by beam search or by the optimal search with its certificate (SEMANTICS.md §12), into the
``explanations`` table."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from stages.signatures.formulas import format_formula, formula_length
from stages.signatures.grammar import formula_of
from stages.signatures.optimal import Explanation, LayerTables, optimal_search
from stages.signatures.search import beam_search
from stages.signatures.statistic import SignaturePartial
from storage.tables import with_row_keys

_UNITS_PER_WORKER = 32  # fewer units than this per process are searched in this one


def beam_explanations(partial: SignaturePartial, names: list[str], max_length: int,
                      beam: int) -> pd.DataFrame:
    """Beam search's answer per unit, in the explanations table's columns (no bound: beam
    search proves nothing; no time per unit: the table stays the same on every run)."""
    found = beam_search(partial.counts_table(len(names)), names, max_length, beam)
    return pd.DataFrame({
        "unit": np.arange(len(found)),
        "formula": [format_formula(f) if f is not None else "" for f, _ in found],
        "iou": [score for _, score in found],
        "length": [formula_length(f) if f is not None else 0 for f, _ in found],
        "gap": np.nan, "bound": np.nan, "optimal": False,
        "nodes": pd.array([pd.NA] * len(found), dtype="Int64"), "seconds": np.nan})


def optimal_explanations(partial: SignaturePartial, names: list[str], max_length: int,
                         max_nodes: int | None = None, time_limit: float | None = None,
                         workers: int | None = None) -> pd.DataFrame:
    """The optimal search's answer and certificate per unit; units are split over
    ``workers`` processes (the answers do not depend on the split)."""
    layer = LayerTables(partial, names)
    units = np.arange(layer.n_units)
    workers = min(workers or os.cpu_count() or 1, max(1, len(units) // _UNITS_PER_WORKER))
    if workers == 1:
        found = optimal_search(layer, max_length, max_nodes, time_limit)
    else:
        parts = [part.tolist() for part in np.array_split(units, workers)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            found = [e for chunk in pool.map(_search_chunk, [(partial, names, max_length,
                                                              max_nodes, time_limit, part)
                                                             for part in parts])
                     for e in chunk]
    return _frame(found, layer.names)


def _search_chunk(args) -> list[Explanation]:
    """One process's units, its BLAS on one thread (the processes already fill the cores:
    more threads each would only contend)."""
    partial, names, max_length, max_nodes, time_limit, units = args
    with threadpool_limits(1):
        return optimal_search(LayerTables(partial, names), max_length, max_nodes, time_limit,
                              units)


def _frame(found: list[Explanation], names: list[str]) -> pd.DataFrame:
    formulas = [formula_of(e.key, names) for e in found]
    return pd.DataFrame({
        "unit": np.arange(len(found)),
        "formula": [format_formula(f) if f is not None else "" for f in formulas],
        "iou": [e.iou for e in found],
        "length": [(len(e.key) + 1) // 2 for e in found],
        "gap": [e.bound - e.iou for e in found], "bound": [e.bound for e in found], "optimal": [e.optimal for e in found],
        "nodes": pd.array([e.nodes for e in found], dtype="Int64"), "seconds": [e.seconds for e in found]})


def explain_layer(partial: SignaturePartial, names: list[str], options, keys: dict
                  ) -> pd.DataFrame:
    """The explanations table of one layer under ``options`` (``ExplainOptions``)."""
    if options.search == "optimal":
        frame = optimal_explanations(partial, names, options.max_length, options.max_nodes,
                                     options.time_limit, options.workers)
    else:
        frame = beam_explanations(partial, names, options.max_length, options.beam)
    return with_row_keys(frame, keys)
