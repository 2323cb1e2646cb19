"""The paper's other measurements on the cache (SEMANTICS.md §9): per-concept principal axes
(``stage=loadings``)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.graph import Run, Target
from pipeline.scoring import LayerContext, iou_artifacts, layer_contexts
from stages.loadings import concept_axes, dominance_frame, loadings_frame, most_frequent
from storage.artifacts import Artifact, scratch_path
from storage.errors import UserError
from storage.tables import write_partition

log = logging.getLogger("netdissect")


def chosen_concepts(run: Run, ctx: LayerContext, iou: pd.DataFrame) -> np.ndarray:
    """(C,) dense labels of ``loadings.concepts``, or of the ``loadings.top`` largest label
    areas of the concept set (from the layer's iou rows)."""
    names = run.cfg.loadings.concepts
    if names is None:
        area = iou.groupby("label", sort=True)["label_area"].first()
        return most_frequent(area.reindex(ctx.space.numbers).to_numpy(), run.cfg.loadings.top)
    index = {name: i + 1 for i, name in enumerate(ctx.space.names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UserError(f"loadings.concepts: {unknown[0]!r} is not a scored label of concept "
                        f"set {ctx.concepts.name} (see its label.csv)")
    return np.array(sorted({index[n] for n in names}), np.int64)


def _tables(run: Run, ctx: LayerContext) -> dict[str, Artifact]:
    o = run.cfg.loadings
    iou = iou_artifacts(run, ctx)["iou"]
    chosen = ",".join(o.concepts) if o.concepts is not None else f"top:{o.top}"
    params = {**iou.fingerprint["params"], "loadings_concepts": chosen,
              "coverage": o.coverage}
    made = {"iou": iou.key}
    return {"loadings": ctx.result(run, "loadings", {**params, "components": o.components},
                                   made),
            "dominance": ctx.result(run, "dominance", params, made)}


def loadings_targets(run: Run) -> list[Target]:
    """Per layer, its concepts' principal axes and dominance (one pass over the blocks)."""
    o = run.cfg.loadings
    targets = []
    for layer, ctx in layer_contexts(run).items():
        tables = _tables(run, ctx)

        def build(missing: list[Artifact], ctx=ctx, tables=tables) -> None:
            iou = pd.read_parquet(iou_artifacts(run, ctx)["iou"].path)
            dense = chosen_concepts(run, ctx, iou)
            iou = iou.sort_values(["unit", "label"])["iou"].to_numpy().reshape(
                -1, ctx.space.n_labels)
            axes = concept_axes(ctx.source(run.cfg.extract.device), ctx.space, dense,
                                o.coverage, run.scheduler(), f"loadings {ctx.layer}",
                                run.cfg.progress, scratch_path(missing))
            write_partition(tables["loadings"], loadings_frame(
                axes, ctx.space, dense, o.components, tables["loadings"].fingerprint["params"]))
            frame = dominance_frame(axes, ctx.space, dense, iou,
                                    tables["dominance"].fingerprint["params"])
            write_partition(tables["dominance"], frame)
            top = frame.sort_values("dominance", ascending=False).head(3)
            log.info("loadings: %s: %d concepts; most dominated: %s", ctx.layer, len(dense),
                     ", ".join(f"{r.concept} (unit {r.dominant_unit}, {r.dominance:.2f})"
                               for r in top.itertuples()))

        targets.append(Target(f"{ctx.acts.model.identity.model_id} {layer} loadings",
                              tuple(tables.values()), build))
    return targets


def loadings_value(run: Run) -> dict[str, pd.DataFrame]:
    """Per layer, the dominance rows of this run."""
    return {layer: pd.read_parquet(_tables(run, ctx)["dominance"].path)
            for layer, ctx in layer_contexts(run).items()}
