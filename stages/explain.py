"""Stage ``explain``: per unit, its best compositional explanation — a formula of labels joined
by AND, OR and AND NOT — found by beam search over the layer's signature counts
(:mod:`stages.signatures`), into the ``explanations`` table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.signatures.formulas import format_formula, formula_length
from stages.signatures.search import beam_search
from stages.signatures.statistic import SignatureCounts
from storage.tables import with_row_keys


def explain_layer(counts: SignatureCounts, names: list[str], max_length: int, beam: int,
                  keys: dict) -> pd.DataFrame:
    """The explanations table of one layer: per unit its best formula, IoU and length."""
    found = beam_search(counts, names, max_length, beam)
    return with_row_keys(pd.DataFrame({
        "unit": np.arange(len(found)),
        "formula": [format_formula(f) if f is not None else "" for f, _ in found],
        "iou": [score for _, score in found],
        "length": [formula_length(f) if f is not None else 0 for f, _ in found],
    }), keys)
