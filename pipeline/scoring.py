"""Stages that score the cache: quantile and iou."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.concept_set import ConceptSet, label_space_of
from pipeline.data import Activations
from pipeline.graph import Run, Target
from pipeline.layout import Layout
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Pass, reduce_blocks
from stages.explain import Signatures
from stages.iou import ScoringConfig, Tally, iou_frame, layers_frame, units_frame
from stages.quantile import threshold_pass
from stages.tally.labels import LabelSpace
from stages.thresholds.statistics import top_images
from storage.artifacts import Artifact, digest, scratch_path
from storage.tables import partition_artifact, write_partition
from storage.thresholds import load_thresholds, save_arrays, save_thresholds

log = logging.getLogger("netdissect")


def blocks(run: Run, acts: Activations, layer: str) -> LayerBlocks:
    """Blocks of one cached layer for the kernels, through the run's basis transform, on the
    worker's GPU when it has one (``extract.device=auto``), else CPU."""
    return LayerBlocks(str(acts.store.path), layer, run.get("basis")[layer].map(),
                       run.cfg.extract.device)


def transform_of(run: Run, layer: str) -> str:
    return run.get("basis")[layer].text


# ---------------------------------------------------------------- quantile
TOP_IMAGES_KEPT = 8  # top images per unit found with the thresholds (the report's default)


def _threshold_artifact(run: Run, acts: Activations, layer: str) -> Artifact:
    fingerprint = {"activations": acts.layer_key(layer), "quantile": run.cfg.scoring.quantile,
                   "transform": transform_of(run, layer)}
    path = run.layout.statistic("thresholds", acts.dataset.id, acts.model.identity.model_id,
                                layer, digest(fingerprint), ".parquet")
    return Artifact(path, fingerprint)


def top_images_artifact(layout: Layout, dataset: str, model_id: str, layer: str,
                        layer_key: str, transform: str, top_n: int) -> Artifact:
    """Per unit, the top images of a cached layer (under a transform): the report's strips."""
    fingerprint = {"activations": layer_key, "transform": transform, "top_n": top_n}
    return Artifact(layout.statistic("thresholds", dataset, model_id, layer,
                                     f"top-{digest(fingerprint)}", ".npz"), fingerprint)


def plan_quantile(run: Run) -> list[Target]:
    """Per layer, exact thresholds and (from the same read of every block) top images."""
    acts = run.get("extract")
    q = run.cfg.scoring.quantile
    ident = acts.model.identity.model_id

    def target(layer: str) -> Target:
        thresholds = _threshold_artifact(run, acts, layer)
        top = top_images_artifact(run.layout, acts.dataset.id, ident, layer,
                                  acts.layer_key(layer), transform_of(run, layer),
                                  TOP_IMAGES_KEPT)

        def build(missing: list[Artifact]) -> None:
            if thresholds not in missing:  # only the top images are missing
                found = top_images(acts.store.path, layer, TOP_IMAGES_KEPT, run.scheduler(),
                                   run.cfg.progress, run.get("basis")[layer].map(),
                                   scratch_path(missing))
                save_arrays(top, found.state_dict())
                return
            values, found = threshold_pass(blocks(run, acts, layer), q, run.scheduler(),
                                           progress=run.cfg.progress,
                                           top_n=TOP_IMAGES_KEPT if top in missing else None,
                                           checkpoint=scratch_path(missing))
            save_thresholds(thresholds, values)
            if top in missing:
                save_arrays(top, found.state_dict())
            log.info("quantile: %s %s: %d exact thresholds (q=%g)", ident, layer, len(values), q)

        return Target(f"{ident} {layer} thresholds (q={q:g})", (thresholds, top), build)

    return [target(layer) for layer in acts.layers]


@dataclass(frozen=True)
class Thresholds:
    values: dict[str, np.ndarray]
    keys: dict[str, str]


def quantile_value(run: Run) -> Thresholds:
    acts = run.get("extract")
    artifacts = {layer: _threshold_artifact(run, acts, layer) for layer in acts.layers}
    return Thresholds({k: load_thresholds(a.path) for k, a in artifacts.items()},
                      {k: a.key for k, a in artifacts.items()})


def row_keys(run: Run, layer: str) -> dict:
    """Row keys every result table shares (beside the model/layer partition columns)."""
    acts, cs = run.get("extract"), run.get("concept_set")
    ident = acts.model.identity
    return {"model_id": ident.model_id, "weights": ident.weights,
            "perturbation": ident.perturbation, "dataset": acts.dataset.id,
            "concept_set": cs.name, "transform": transform_of(run, layer)}


def upstream(thresholds: Thresholds, cs: ConceptSet, layer: str,
             space: LabelSpace | None = None) -> dict:
    """What a layer's scores were made from (with ``space``: and the categories scored)."""
    rows = None if cs.rows is None else digest(cs.rows.tolist())
    made = {"thresholds": thresholds.keys[layer], "concepts": cs.key, "rows": rows}
    return made if space is None else {**made, "categories": list(space.categories)}


# ---------------------------------------------------------------- iou
def _iou_artifacts(run: Run, layer: str) -> dict[str, Artifact]:
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    s = run.cfg.scoring
    space = label_space_of(run, cs)
    params = {**row_keys(run, layer), "quantile": s.quantile, "union_mode": str(s.union),
              "planes": str(s.planes), "categories": ",".join(space.categories)}
    fp = upstream(thr, cs, layer)
    with_threshold = {**params, "iou_threshold": s.iou_threshold}
    model = acts.model.identity.name
    root = run.layout.results
    return {"iou": partition_artifact(root, "iou", model, layer, params, fp),
            "units": partition_artifact(root, "units", model, layer, with_threshold, fp),
            "layers": partition_artifact(root, "layers", model, layer, with_threshold, fp)}


def signature_artifact(run: Run, layer: str) -> Artifact:
    """Pixel-signature counts of one layer against the run's concept set."""
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    space = label_space_of(run, cs)
    fingerprint = upstream(thr, cs, layer, space)
    path = run.layout.statistic("signatures", acts.dataset.id, acts.model.identity.model_id,
                                layer, digest(fingerprint), ".npz")
    return Artifact(path, fingerprint)


def scoring_pass(run: Run, layer: str, tally: bool, signatures: bool,
                 missing: list[Artifact]) -> tuple:
    """One read of every block of a layer feeding the tally and/or the signature counts."""
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    s = run.cfg.scoring
    space = label_space_of(run, cs)
    statistics = []
    if tally:
        scoring = ScoringConfig(s.quantile, str(s.union), str(s.planes),
                                None if s.categories is None else tuple(s.categories),
                                s.iou_threshold)
        statistics.append(Tally(thr.values[layer], space, scoring))
    if signatures:
        statistics.append(Signatures(thr.values[layer], space))
    source = ScoringBlocks(blocks(run, acts, layer), str(cs.store.path), cs.rows)
    return reduce_blocks(Pass(source, statistics), acts.store.n_blocks(), run.scheduler(),
                         f"{run.cfg.stage} {layer}", run.cfg.progress,
                         checkpoint=scratch_path(missing))


def _iou_target(run: Run, layer: str) -> Target:
    """The tables of one layer and, when formulas are asked for, its signature counts, from
    one pass over the blocks."""
    acts, thr, cs = run.get("extract"), run.get("quantile"), run.get("concept_set")
    tables = _iou_artifacts(run, layer)
    signature = signature_artifact(run, layer) if run.cfg.concepts.formulas else None
    artifacts = (*tables.values(), *([signature] if signature else []))

    def build(missing: list[Artifact]) -> None:
        tally = any(a in missing for a in tables.values())
        results = list(scoring_pass(run, layer, tally, signature in missing, missing))
        if signature in missing:
            save_arrays(signature, results.pop())
        if not tally:
            return
        counts = results[0]
        space = label_space_of(run, cs)
        iou = iou_frame(counts, space, tables["iou"].fingerprint["params"])
        units = units_frame(iou, thr.values[layer], run.cfg.scoring.iou_threshold)
        layers = layers_frame(units, space.categories, tables["units"].fingerprint["params"])
        for table, frame in (("iou", iou), ("units", units), ("layers", layers)):
            write_partition(tables[table], frame)

    return Target(f"{acts.model.identity.model_id} {layer} tables", artifacts, build)


def plan_iou(run: Run) -> list[Target]:
    acts = run.get("extract")
    targets = [_iou_target(run, layer) for layer in acts.layers]
    if run.cfg.concepts.formulas:
        from pipeline.signatures import plan_formulas

        targets += plan_formulas(run)
    return targets


def iou_value(run: Run) -> dict[str, pd.DataFrame]:
    """Per layer, the `layers` rows of this run (for the summary)."""
    acts = run.get("extract")
    return {layer: pd.read_parquet(_iou_artifacts(run, layer)["layers"].path)
            for layer in acts.layers}
