"""Stages built on pixel signatures: formula concepts (in the iou stage) and explain."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.graph import Run, Target, realize
from pipeline.scoring import (
    label_space_of,
    row_keys,
    scoring_pass,
    signature_artifact,
    upstream,
)
from stages.explain import SignatureCounts, beam_search, explanation_frame, formula_frame
from stages.signatures.formulas import Formula, format_formula, load_formulas
from storage.artifacts import Artifact
from storage.tables import partition_artifact, write_partition
from storage.thresholds import load_arrays, save_arrays

log = logging.getLogger("netdissect")

# ---------------------------------------------------------------- signatures, formulas
def signatures(run: Run, layer: str) -> SignatureCounts:
    """Pixel-signature counts of one layer: computed once (with the tally when formulas are
    scored with it), then read by formulas and explain."""
    artifact = signature_artifact(run, layer)

    def build(missing: list[Artifact]) -> None:
        (found,) = scoring_pass(run, layer, tally=False, signatures=True, missing=missing)
        save_arrays(artifact, found)

    realize(str(run.cfg.stage), [Target(f"{layer} signatures", (artifact,), build)])
    space = label_space_of(run, run.get("concept_set"))
    return SignatureCounts.from_partial(load_arrays(artifact.path), space.n_labels)


def _formulas(run: Run) -> dict[str, Formula]:
    space = label_space_of(run, run.get("concept_set"))
    return load_formulas(Path(run.cfg.concepts.formulas).expanduser(), space.names)


def plan_formulas(run: Run) -> list[Target]:
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    formulas = _formulas(run)
    space = label_space_of(run, cs)
    index: dict[str, list[int]] = {}
    for i, label_name in enumerate(space.names):
        index.setdefault(label_name, []).append(i + 1)

    def params(layer: str) -> dict:
        return {**row_keys(run, layer), "quantile": run.cfg.scoring.quantile,
                "union_mode": "global", "planes": "set", "categories": "formula",
                "formulas": {k: format_formula(v) for k, v in sorted(formulas.items())}}

    def build(layer: str, missing: list[Artifact]) -> None:
        columns = {k: v for k, v in params(layer).items() if k != "formulas"}
        frame = formula_frame(signatures(run, layer), formulas, index, columns)
        write_partition(missing[0], frame)
        best = frame.sort_values("iou", ascending=False).head(3)
        log.info("%s: %s formulas: %s", run.cfg.stage, layer, ", ".join(
            f"unit {r.unit} {r.concept} {r.iou:.3f}" for r in best.itertuples()))

    targets = []
    for layer in acts.layers:
        fp = upstream(thr, cs, layer, space)
        artifact = partition_artifact(run.layout.results, "iou", acts.model.identity.name, layer,
                                      params(layer), fp)
        targets.append(Target(f"{acts.model.identity.model_id} {layer} formula rows",
                              (artifact,), partial(build, layer)))
    return targets


# ---------------------------------------------------------------- explain
def _explain_artifact(run: Run, layer: str) -> tuple[Artifact, dict]:
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    e = run.cfg.explain
    space = label_space_of(run, cs)
    params = {**row_keys(run, layer), "quantile": run.cfg.scoring.quantile, "union_mode": "global",
              "planes": "set", "categories": ",".join(space.categories), "beam": e.beam,
              "max_length": e.max_length}
    fp = upstream(thr, cs, layer, space)
    return partition_artifact(run.layout.results, "explanations", acts.model.identity.name,
                              layer, params, fp), params


def plan_explain(run: Run) -> list[Target]:
    acts, cs = run.get("extract"), run.get("concept_set")
    e = run.cfg.explain

    def build(layer: str, missing: list[Artifact]) -> None:
        artifact, params = _explain_artifact(run, layer)
        found = beam_search(signatures(run, layer), list(label_space_of(run, cs).names), e.max_length,
                            e.beam)
        write_partition(artifact, explanation_frame(found, params))

    return [Target(f"{acts.model.identity.model_id} {layer} explanations",
                   (_explain_artifact(run, layer)[0],), partial(build, layer))
            for layer in acts.layers]


def explain_value(run: Run) -> dict[str, pd.DataFrame]:
    acts = run.get("extract")
    return {layer: pd.read_parquet(_explain_artifact(run, layer)[0].path) for layer in acts.layers}

