"""The stages of a run, declared once, and the checks made before any of them starts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import (
    acquire,
    basis,
    concept_set,
    data,
    measures,
    publish,
    rating,
    scoring,
    signatures,
)
from pipeline.cluster import dask_scheduler
from pipeline.config import Config, Stage, validate
from pipeline.graph import NotReady, Run, StageDef, Step, Target, closure
from pipeline.identity import model_spec
from stages.signatures.parsing import load_formulas
from storage.errors import UserError


def _iou_targets(run: Run) -> list[Target]:
    """The tables (with signature counts when formulas are scored) and the formula rows."""
    return scoring.iou_targets(run) + signatures.formula_targets(run)


# what every scoring stage reads, the concept set first: the labels are decoded before the
# model runs, so a broken label file stops a run before its forward pass
SCORED = ("concept_set", "extract", "basis", "quantile")
GRAPH: dict[str, StageDef] = {s.name: s for s in (
    StageDef("dataset", (), ("dataset",), data.dataset_targets, data.dataset_value),
    StageDef("concepts", ("dataset",), ("dataset.block_size", "extract.perturb"),
             data.concepts_targets, data.concepts_value),
    StageDef("model", ("dataset",), ("model", "fetch"), data.model_targets, data.model_value),
    StageDef("extract", ("dataset", "model"), ("extract",), data.extract_targets,
             data.extract_value),
    StageDef("cache", ("dataset", "model"), (), data.cache_targets, data.extract_value),
    StageDef("basis", ("extract",), ("transform",), basis.basis_targets, basis.basis_value),
    StageDef("quantile", ("extract", "basis"), ("scoring.quantile", "report.top_n"),
             scoring.quantile_targets, scoring.quantile_value),
    StageDef("concept_set", ("concepts", "extract"), ("concepts.path", "concepts.name"),
             concept_set.concept_set_targets, concept_set.concept_set_value),
    StageDef("iou", SCORED, ("scoring", "concepts.formulas"), _iou_targets, scoring.iou_value),
    StageDef("rescore", ("cache", "iou"), (), value=lambda run: run.value("iou")),
    StageDef("signatures", SCORED, ("scoring.categories",), scoring.signatures_targets,
             scoring.signatures_value),
    StageDef("explain", (*SCORED, "signatures"), ("explain",), signatures.explain_targets,
             signatures.explain_value),
    StageDef("loadings", (*SCORED, "iou"), ("loadings",), measures.loadings_targets,
             measures.loadings_value),
    StageDef("probe", SCORED, ("probe",), measures.probe_targets, measures.probe_value),
    StageDef("rate", (*SCORED, "iou"), ("rate", "report.top_n", "report.thumb_size"),
             value=rating.rate_value),
    StageDef("report", (), ("report",), publish.report_targets, publish.report_value,
             reads_results=True),
    StageDef("all", ("iou", "report"), (), value=publish.report_value),
    StageDef("fetch", (), ("fetch", "dataset", "model.weights"), acquire.fetch_targets,
             acquire.fetch_value),
    StageDef("check", ("dataset",), ("check",), value=acquire.check_value),
)}
ALWAYS_USED = ("stage", "workdir", "progress", "cluster", "hydra", "dry_run")


def check_overrides_used(cfg: Config, keys: Iterable[str]) -> None:
    """A value the user set that no stage of this run reads is an error naming who reads it."""
    stage = str(cfg.stage)
    used = [u for name in closure(GRAPH, stage) for u in GRAPH[name].uses] + list(ALWAYS_USED)

    def reads(prefixes: list[str], key: str) -> bool:
        return any(key == u or key.startswith(u + ".") or u.startswith(key + ".")
                   for u in prefixes)

    for key in keys:
        if reads(used, key):
            continue
        readers = [name for name, s in GRAPH.items() if reads(list(s.uses), key)]
        where = " or ".join(f"stage={r}" for r in readers) or "no stage"
        raise UserError(f"{key} is read by {where}, not by stage={stage} (or the stages it "
                        f"runs); drop it or run the stage that uses it")


def preflight(cfg: Config) -> None:
    """Everything checkable without the data or a cluster: config values, unused values,
    layer names (on an empty copy of the architecture), formula syntax and labels."""
    validate(cfg)
    stages = closure(GRAPH, str(cfg.stage))
    if "model" in stages and not _layers_cached(cfg, stages):
        from stages.network.models import check_layers  # torch: only when the model runs

        check_layers(model_spec(cfg.model, weights="none"))
    if cfg.concepts.formulas and "iou" in stages:
        load_formulas(Path(cfg.concepts.formulas).expanduser(), _label_names(cfg))


def _layers_cached(cfg: Config, stages: list[str]) -> bool:
    """Are the run's layers already cached (so they exist, and the model need not load)?"""
    run = Run(cfg, _no_cluster, GRAPH)
    try:
        targets = [t for s in ("extract", "cache") if s in stages for t in run.targets(s)]
    except NotReady:
        return False
    return bool(targets) and all(a.is_current() for t in targets for a in t.artifacts)


def _label_names(cfg: Config) -> list[str]:
    """Label names of the concept set a run will score, from its label CSVs alone (not the
    whole index)."""
    from storage.broden import read_categories, read_labels

    root = cfg.concepts.path or cfg.dataset.path
    if root is None:
        from stages.scenes.labels import label_table

        return [lab["name"] for lab in label_table()]
    root = Path(root).expanduser()
    return [lab.name for lab in read_labels(root, read_categories(root)).values()]


def _no_cluster() -> Any:
    raise RuntimeError("a dry run starts no cluster")


def plan(cfg: Config) -> list[Step]:
    """What running ``cfg`` would do, stage by stage; nothing is built, locked or started."""
    return Run(cfg, _no_cluster, GRAPH).plan(str(cfg.stage))


def execute(cfg: Config) -> Any:
    """Run ``cfg.stage`` (and whatever it needs that is not current), then say what it made."""
    stage = str(cfg.stage)
    with dask_scheduler(cfg.cluster) as scheduler:
        run = Run(cfg, scheduler, GRAPH)
        value = run.get(stage)
        if stage in (Stage.iou, Stage.rescore, Stage.all):
            publish.print_summary(run, run.value("iou"))
        if stage in (Stage.iou, Stage.rescore) and publish.report_is_stale(run):
            print(f"Report: {run.layout.report / 'index.html'} is older than the tables; "
                  "refresh it with stage=report (stage=all does both)")
        if stage == Stage.explain:
            publish.print_explanations(run, value)
        if stage in (Stage.report, Stage.all):
            print(f"Report: {run.value('report')}")
    return value
