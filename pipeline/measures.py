"""The paper's other measurements on the cache: per-concept principal axes
(``stage=loadings``, SEMANTICS.md §9) and a linear probe of each layer (``stage=probe``,
§10)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.graph import Run, Target
from pipeline.scoring import LayerContext, iou_artifacts, layer_contexts
from storage.artifacts import Artifact, file_digest, scratch_path
from storage.errors import UserError
from storage.tables import write_partition

if TYPE_CHECKING:  # pandas and the passes load when a build runs, not to plan
    import pandas as pd

log = logging.getLogger("netdissect")


def chosen_concepts(run: Run, ctx: LayerContext, iou: pd.DataFrame) -> np.ndarray:
    """(C,) dense labels of ``loadings.concepts``, or of the ``loadings.top`` largest label
    areas of the concept set (from the layer's iou rows)."""
    from stages.loadings import most_frequent

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
            import pandas as pd

            from stages.loadings import concept_axes, dominance_frame, loadings_frame

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
    import pandas as pd

    """Per layer, the dominance rows of this run."""
    return {layer: pd.read_parquet(_tables(run, ctx)["dominance"].path)
            for layer, ctx in layer_contexts(run).items()}


# ---------------------------------------------------------------- probe (SEMANTICS.md §10)
def probe_target(run: Run, ctx: LayerContext) -> tuple[str, dict]:
    """The target's name in the table and what it is made from."""
    p = run.cfg.probe
    if p.targets:
        path = Path(p.targets).expanduser()
        return f"file:{path.name}", {"targets": file_digest(path)}
    if p.category not in ctx.concepts.dataset.all_categories:
        raise UserError(f"probe.category={p.category}: not a category of the concept set "
                        f"({', '.join(ctx.concepts.dataset.all_categories)})")
    return p.category, {}


def target_classes(path: Path, image_paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """(n_images,) class index by cache row from a CSV of image,class (NO_CLASS: not
    listed), and the class names."""
    import pandas as pd

    from stages.probe import NO_CLASS

    table = pd.read_csv(path, dtype=str, keep_default_na=False)  # columns checked by validate
    row_of = {image: i for i, image in enumerate(image_paths)}
    unknown = [(i, image) for i, image in enumerate(table["image"]) if image not in row_of]
    if unknown:
        line, image = unknown[0]
        raise UserError(f"probe.targets={path}: row {line + 2}: image {image!r} is not an "
                        "image of the activation cache (give it as in the dataset's index.csv)")
    names = sorted(set(table["class"]))
    classes = np.full(len(image_paths), NO_CLASS, np.int64)
    classes[[row_of[i] for i in table["image"]]] = [names.index(c) for c in table["class"]]
    return classes, names


def _probe_table(run: Run, ctx: LayerContext) -> Artifact:
    p = run.cfg.probe
    target, made = probe_target(run, ctx)
    params = {**ctx.row_keys(), "target": target, "pool": str(p.pool), "c": p.c,
              "folds": p.folds, "probe_seed": p.seed}
    return ctx.result(run, "probes", params, {**made, "max_iter": p.max_iter})


def probe_targets(run: Run) -> list[Target]:
    """Per layer, the cross-validated accuracy of a linear classifier on pooled features."""
    p = run.cfg.probe
    targets = []
    for layer, ctx in layer_contexts(run).items():
        artifact = _probe_table(run, ctx)

        def build(missing: list[Artifact], ctx=ctx, artifact=artifact) -> None:
            from stages.engine.reduction import Pass, reduce_blocks
            from stages.probe import PooledFeatures, cross_validated, probe_frame

            if p.targets:
                path = Path(p.targets).expanduser()
                classes, _ = target_classes(path, ctx.acts.store.image_paths())
                statistic = PooledFeatures(str(p.pool), classes=classes)
            else:
                statistic = PooledFeatures(str(p.pool), ctx.concepts.dataset.all_categories.index(
                    p.category))
            source = ctx.source(run.cfg.extract.device)
            (found,) = reduce_blocks(Pass(source, [statistic]), source.n_blocks(),
                                     run.scheduler(), f"probe {ctx.layer}", run.cfg.progress,
                                     checkpoint=scratch_path(missing))
            try:
                result = cross_validated(found, p.c, p.folds, p.seed, p.max_iter)
            except ValueError as exc:
                target = artifact.fingerprint["params"]["target"]
                raise UserError(f"probe: {ctx.layer}: target {target}: {exc}; choose another "
                                "probe.category or probe.targets") from None
            frame = probe_frame(result, artifact.fingerprint["params"])
            write_partition(artifact, frame)
            log.info("probe: %s: accuracy %.3f ± %.3f over %d folds (%d images, %d classes, "
                     "chance %.3f)", ctx.layer, frame["accuracy"].item(),
                     frame["accuracy_std"].item(), p.folds, result.n_images, result.n_classes,
                     result.chance)

        targets.append(Target(f"{ctx.acts.model.identity.model_id} {layer} probe",
                              (artifact,), build))
    return targets


def probe_value(run: Run) -> dict[str, pd.DataFrame]:
    import pandas as pd

    return {layer: pd.read_parquet(_probe_table(run, ctx).path)
            for layer, ctx in layer_contexts(run).items()}
