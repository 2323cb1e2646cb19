"""The stages of a run, declared once, and the checks made before any of them starts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import acquire, basis, concept_set, data, publish, scoring, signatures
from pipeline.cluster import dask_scheduler
from pipeline.config import Config, Stage, validate
from pipeline.graph import Run, StageDef, closure
from pipeline.layout import model_spec
from stages.network.models import check_layers
from stages.signatures.formulas import load_formulas
from storage.errors import UserError


def _all_value(run: Run) -> Any:
    run.get("iou")
    return run.get("report")


def _none(_run: Run) -> list:
    return []


GRAPH: dict[str, StageDef] = {s.name: s for s in (
    StageDef("dataset", (), ("dataset",), data.plan_dataset, data.dataset_value),
    StageDef("concepts", ("dataset",), ("dataset.block_size", "extract.perturb"),
             data.plan_concepts, data.concepts_value),
    StageDef("model", ("dataset",), ("model", "fetch"), data.plan_model, data.model_value),
    StageDef("extract", ("dataset", "model"), ("extract",), data.plan_extract, data.extract_value),
    StageDef("basis", ("extract",), ("transform",), basis.plan_basis, basis.basis_value),
    StageDef("quantile", ("extract", "basis"), ("scoring.quantile",), scoring.plan_quantile,
             scoring.quantile_value),
    StageDef("concept_set", ("extract", "concepts"), ("concepts.path", "concepts.name"),
             concept_set.plan_concept_set, concept_set.concept_set_value),
    StageDef("iou", ("extract", "basis", "quantile", "concept_set"),
             ("scoring", "concepts.formulas"), scoring.plan_iou, scoring.iou_value),
    StageDef("rescore", ("iou",), (), _none, lambda run: run.get("iou")),
    StageDef("explain", ("extract", "basis", "quantile", "concept_set"),
             ("explain", "scoring.categories"), signatures.plan_explain, signatures.explain_value),
    StageDef("report", (), ("report",), publish.plan_report, publish.report_value),
    StageDef("all", ("iou", "report"), (), _none, _all_value),
    StageDef("fetch", (), ("fetch", "dataset", "model.weights"), acquire.plan_fetch,
             acquire.fetch_value),
    StageDef("check", ("dataset",), ("check",), _none, acquire.check_value),
)}
ALWAYS_USED = ("stage", "workdir", "progress", "cluster", "hydra")


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
    if "model" in stages:
        check_layers(model_spec(cfg.model, weights="none"))
    if cfg.concepts.formulas and "iou" in stages:
        load_formulas(Path(cfg.concepts.formulas).expanduser(), _label_names(cfg))


def _label_names(cfg: Config) -> list[str]:
    """Label names of the concept set a run will score, from its label CSVs alone (not the
    whole index)."""
    from storage.broden import read_categories, read_labels

    root = cfg.concepts.path or cfg.dataset.path
    if root is None:
        from stages.synthetic import label_table

        return [lab["name"] for lab in label_table()]
    root = Path(root).expanduser()
    return [lab.name for lab in read_labels(root, read_categories(root)).values()]


def execute(cfg: Config) -> Any:
    """Run ``cfg.stage`` (and whatever it needs that is not current), then say what it made."""
    stage = str(cfg.stage)
    with dask_scheduler(cfg.cluster) as scheduler:
        run = Run(cfg, scheduler, GRAPH)
        value = run.get(stage)
        if stage in (Stage.iou, Stage.rescore, Stage.all):
            publish.print_summary(run, run.get("iou"))
        if stage == Stage.explain:
            publish.print_explanations(run, value)
        if stage in (Stage.report, Stage.all):
            print(f"Report: {run.get('report')}")
    return value
