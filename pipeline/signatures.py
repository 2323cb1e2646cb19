"""Stages that read pixel-signature counts: formula concepts (rows of the iou table, made
with the iou stage) and explain."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.graph import Run, Target
from pipeline.scoring import LayerContext, layer_contexts
from stages.signatures.formulas import Formula, format_formula
from stages.signatures.parsing import load_formulas
from storage.artifacts import Artifact
from storage.tables import write_partition

if TYPE_CHECKING:  # the counts and the search load when a build runs, not to plan
    import pandas as pd

    from stages.signatures.statistic import SignatureCounts, SignaturePartial

log = logging.getLogger("netdissect")


def signature_partial(artifact: Artifact) -> SignaturePartial:
    """The layer's signature counts as stored (sparse), read from their artifact."""
    from stages.signatures.statistic import SignaturePartial
    from storage.arrays import load_arrays

    return SignaturePartial.from_state_dict(load_arrays(artifact.path))


def signature_counts(ctx: LayerContext, artifact: Artifact) -> SignatureCounts:
    """The layer's signature counts as dense tables."""
    return signature_partial(artifact).counts_table(ctx.space.n_labels)


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
            from stages.iou import formula_frame, label_index

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
            "planes": "set", "categories": ",".join(ctx.space.categories),
            "search": str(e.search), "max_length": e.max_length,
            "beam": e.beam if e.search == "beam" else 0,
            "max_nodes": e.max_nodes or 0, "time_limit": float(e.time_limit or 0.0)}
    return ctx.result(run, "explanations", keys, with_categories=True), keys


def explain_targets(run: Run) -> list[Target]:
    e, signatures = run.cfg.explain, run.value("signatures")

    def target(ctx: LayerContext) -> Target:
        artifact, keys = _explanations(run, ctx)

        def build(_missing: list[Artifact]) -> None:
            from stages.explain import explain_layer

            partial = signature_partial(signatures[ctx.layer])
            frame = explain_layer(partial, list(ctx.space.names), e, keys)
            write_partition(artifact, frame)
            if e.search == "optimal":
                log.info("%s: %s: %d of %d units proven optimal, %.3f s per unit",
                         run.cfg.stage, ctx.layer, int(frame["optimal"].sum()), len(frame),
                         float(frame["seconds"].mean()))

        return Target(f"{ctx.acts.model.identity.model_id} {ctx.layer} explanations",
                      (artifact,), build)

    return [target(ctx) for ctx in layer_contexts(run).values()]


def explain_value(run: Run) -> dict[str, pd.DataFrame]:
    import pandas as pd

    return {layer: pd.read_parquet(_explanations(run, ctx)[0].path)
            for layer, ctx in layer_contexts(run).items()}
