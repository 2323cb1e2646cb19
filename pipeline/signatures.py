"""Stages that read pixel-signature counts: formula concepts (rows of the iou table, made
with the iou stage) and explain."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.graph import Run, Target
from pipeline.scoring import LayerContext, layer_contexts
from stages.explain import explain_layer
from stages.iou import formula_frame, label_index
from stages.signatures.formulas import Formula, format_formula
from stages.signatures.parsing import load_formulas
from stages.signatures.statistic import SignatureCounts, SignaturePartial
from storage.arrays import load_arrays
from storage.artifacts import Artifact
from storage.tables import write_partition

log = logging.getLogger("netdissect")


def signature_counts(ctx: LayerContext, artifact: Artifact) -> SignatureCounts:
    """The layer's signature counts, read from their artifact."""
    partial = SignaturePartial.from_state_dict(load_arrays(artifact.path))
    return partial.counts_table(ctx.space.n_labels)


def _formulas(run: Run, ctx: LayerContext) -> dict[str, Formula]:
    return load_formulas(Path(run.cfg.concepts.formulas).expanduser(), ctx.space.names)


def formula_targets(run: Run) -> list[Target]:
    """Per layer, the formula concepts' rows of the iou table (from the signature counts
    the iou stage makes in its pass; none without ``concepts.formulas``)."""
    if not run.cfg.concepts.formulas:
        return []

    def target(ctx: LayerContext) -> Target:
        formulas = _formulas(run, ctx)
        keys = {**ctx.row_keys(), "threshold_quantile": run.cfg.scoring.quantile,
                "union_mode": "global",
                "planes": "set", "categories": "formula"}
        params = {**keys, "formulas": {k: format_formula(v) for k, v in sorted(formulas.items())}}
        artifact = ctx.result(run, "iou", params, with_categories=True)

        def build(missing: list[Artifact]) -> None:
            counts = signature_counts(ctx, ctx.signature_artifact(run))
            frame = formula_frame(counts, formulas, label_index(ctx.space), keys)
            write_partition(missing[0], frame)
            best = frame.sort_values("iou", ascending=False).head(3)
            log.info("%s: %s formulas: %s", run.cfg.stage, ctx.layer, ", ".join(
                f"unit {r.unit} {r.concept} {r.iou:.3f}" for r in best.itertuples()))

        return Target(f"{ctx.acts.model.identity.model_id} {ctx.layer} formula rows",
                      (artifact,), build)

    return [target(ctx) for ctx in layer_contexts(run).values()]


def _explanations(run: Run, ctx: LayerContext) -> tuple[Artifact, dict]:
    e = run.cfg.explain
    keys = {**ctx.row_keys(), "threshold_quantile": run.cfg.scoring.quantile,
            "union_mode": "global",
            "planes": "set", "categories": ",".join(ctx.space.categories), "beam": e.beam,
            "max_length": e.max_length}
    return ctx.result(run, "explanations", keys, with_categories=True), keys


def explain_targets(run: Run) -> list[Target]:
    e, signatures = run.cfg.explain, run.value("signatures")

    def target(ctx: LayerContext) -> Target:
        artifact, keys = _explanations(run, ctx)

        def build(_missing: list[Artifact]) -> None:
            counts = signature_counts(ctx, signatures[ctx.layer])
            write_partition(artifact, explain_layer(counts, list(ctx.space.names),
                                                    e.max_length, e.beam, keys))

        return Target(f"{ctx.acts.model.identity.model_id} {ctx.layer} explanations",
                      (artifact,), build)

    return [target(ctx) for ctx in layer_contexts(run).values()]


def explain_value(run: Run) -> dict[str, pd.DataFrame]:
    return {layer: pd.read_parquet(_explanations(run, ctx)[0].path)
            for layer, ctx in layer_contexts(run).items()}
