"""Stages that score the cache: quantile, iou and signatures, over a per-layer context made
once per run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from pipeline.basis import Basis
from pipeline.concept_set import ConceptSet
from pipeline.config import NullKind
from pipeline.data import Activations
from pipeline.graph import Run, Target, realize
from storage.artifacts import Artifact, digest, scratch_path
from storage.tables import partition_artifact, write_partition

if TYPE_CHECKING:  # the passes and their kernels load when a build runs, not to plan
    import pandas as pd

    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.iou import LayerPass
    from stages.tally.compiled import VerifiedForm
    from stages.tally.labels import LabelSpace
    from stages.tally.statistic import TallyRule

log = logging.getLogger("netdissect")


# ---------------------------------------------------------------- quantile
def threshold_artifact(run: Run, acts: Activations, layer: str, transform: str) -> Artifact:
    fingerprint = {"activations": acts.layer_key(layer), "quantile": run.cfg.scoring.quantile,
                   "transform": transform}
    path = run.layout.statistic("thresholds", acts.dataset.id, acts.model.identity.model_id,
                                layer, digest(fingerprint), ".parquet")
    return Artifact(path, fingerprint)


def top_images_artifact(run: Run, dataset: str, model_id: str, layer: str, layer_key: str,
                        transform: str) -> Artifact:
    """Per unit, the top images of a cached layer (under a transform): the report's strips."""
    fingerprint = {"activations": layer_key, "transform": transform,
                   "top_n": run.cfg.report.top_n}
    return Artifact(run.layout.statistic("thresholds", dataset, model_id, layer,
                                         f"top-{digest(fingerprint)}", ".npz"), fingerprint)


def layer_blocks(run: Run, acts: Activations, basis: Basis, layer: str) -> LayerBlocks:
    """Blocks of one cached layer for the kernels, through the run's basis transform, on the
    worker's GPU when it has one (``extract.device=auto``), else CPU."""
    from stages.engine.blocks import LayerBlocks

    return LayerBlocks(str(acts.path), layer, basis.map(), run.cfg.extract.device)


def quantile_value(run: Run) -> dict[str, Artifact]:
    """Per layer, its thresholds' artifact."""
    acts, bases = run.value("extract"), run.value("basis")
    return {layer: threshold_artifact(run, acts, layer, bases[layer].text)
            for layer in acts.layers}


def quantile_targets(run: Run) -> list[Target]:
    """Per layer, exact thresholds and (from the same read of every block) top images."""
    acts, bases = run.value("extract"), run.value("basis")
    q, top_n = run.cfg.scoring.quantile, run.cfg.report.top_n
    ident = acts.model.identity.model_id

    def target(layer: str, thresholds: Artifact) -> Target:
        basis = bases[layer]
        top = top_images_artifact(run, acts.dataset.id, ident, layer, acts.layer_key(layer),
                                  basis.text)

        def build(missing: list[Artifact]) -> None:
            from stages.quantile import threshold_pass
            from stages.thresholds.top_images import top_images
            from storage.arrays import save_arrays, save_thresholds

            if thresholds not in missing:  # only the top images are missing
                found = top_images(acts.path, layer, top_n, run.scheduler(), run.cfg.progress,
                                   basis.map(), scratch_path(missing))
                save_arrays(top, found.state_dict())
                return
            values, found = threshold_pass(layer_blocks(run, acts, basis, layer), q,
                                           run.scheduler(), progress=run.cfg.progress,
                                           top_n=top_n if top in missing else None,
                                           checkpoint=scratch_path(missing))
            save_thresholds(thresholds, values)
            if top in missing:
                save_arrays(top, found.state_dict())
            log.info("quantile: %s %s: %d exact thresholds (q=%g)", ident, layer, len(values), q)

        return Target(f"{ident} {layer} thresholds (q={q:g})", (thresholds, top), build)

    return [target(layer, artifact) for layer, artifact in quantile_value(run).items()]


# ---------------------------------------------------------------- the per-layer context
@dataclass(frozen=True)
class LayerContext:
    """What every scoring stage of one layer reads, made once per run."""

    layer: str
    acts: Activations
    basis: Basis
    thresholds: Artifact
    concepts: ConceptSet

    @property
    def space(self) -> LabelSpace:
        return self.concepts.space

    @cached_property
    def threshold_values(self) -> np.ndarray:
        from storage.arrays import load_thresholds

        return load_thresholds(self.thresholds.path)

    def row_keys(self) -> dict:
        """Row keys every result table shares (beside the model/layer partition columns)."""
        ident = self.acts.model.identity
        return {"model_id": ident.model_id, "weights": ident.weights,
                "perturbation": ident.perturbation, "dataset": self.acts.dataset.id,
                "concept_set": self.concepts.name, "basis": self.basis.text}

    def made_from(self, with_categories: bool = False) -> dict:
        """What the layer's scores are made from (and the categories scored)."""
        rows = None if self.concepts.rows is None else digest(self.concepts.rows.tolist())
        made = {"thresholds": self.thresholds.key, "concepts": self.concepts.key, "rows": rows}
        return {**made, "categories": list(self.space.categories)} if with_categories else made

    def shape(self) -> tuple[int, int, int, int]:
        """(h, w) of the layer's maps and (sh, sw) of the concept set's masks."""
        return (*self.acts.store.shape(self.layer)[2:], *self.concepts.dataset.uniform_sizes()[2:])

    def source(self, device: str, rows: np.ndarray | None = None) -> ScoringBlocks:
        """The layer's blocks with their labels (those of concept rows ``rows``: default, the
        concept set's match)."""
        from stages.engine.blocks import LayerBlocks, ScoringBlocks

        return ScoringBlocks(LayerBlocks(str(self.acts.path), self.layer, self.basis.map(),
                                         device), str(self.concepts.path),
                             self.concepts.rows if rows is None else rows)

    def result(self, run: Run, table: str, params: dict, made: dict | None = None,
               with_categories: bool = False) -> Artifact:
        return partition_artifact(run.layout.results, table, self.acts.model.identity.name,
                                  self.layer, params,
                                  {**self.made_from(with_categories), **(made or {})})

    def signature_artifact(self, run: Run) -> Artifact:
        """Pixel-signature counts of the layer against the run's concept set."""
        fingerprint = self.made_from(with_categories=True)
        return Artifact(run.layout.statistic(
            "signatures", self.acts.dataset.id, self.acts.model.identity.model_id, self.layer,
            digest(fingerprint), ".npz"), fingerprint)

    def scoring_pass(self, run: Run, rule: TallyRule | None, signatures: bool,
                     missing: list[Artifact], tops: int = 0,
                     verified: tuple[VerifiedForm, ...] = ()) -> LayerPass:
        from stages.iou import scoring_pass

        return scoring_pass(self.source(run.cfg.extract.device), self.threshold_values,
                            self.space, rule, signatures, run.scheduler(),
                            f"{run.cfg.stage} {self.layer}", run.cfg.progress,
                            scratch_path(missing), tops, verified)

    def positions(self) -> int:
        """Values per image of one unit: the §1 quantile's share of an image."""
        h, w = self.shape()[:2]
        return h * w


def layer_contexts(run: Run) -> dict[str, LayerContext]:
    """Per scored layer its context (a stage that calls this needs extract, basis, quantile
    and concept_set)."""
    def make() -> dict[str, LayerContext]:
        acts, bases, thresholds = run.value("extract"), run.value("basis"), run.value("quantile")
        concepts = run.value("concept_set")
        return {layer: LayerContext(layer, acts, bases[layer], thresholds[layer], concepts)
                for layer in acts.layers}

    return run.shared("layers", make)


# ---------------------------------------------------------------- iou
def verified_form(run: Run, shape: tuple[int, int, int, int]) -> VerifiedForm:
    """Which compiled form equals torch's CPU upsampling for ``shape`` on this machine,
    checked once (with torch) and recorded in the workdir, so that later tallies here need
    no torch (:mod:`stages.tally.compiled`)."""
    from stages.tally.compiled import VerifiedForm, machine_digest, machine_identity
    from storage.artifacts import write_text_atomic

    fingerprint = {"machine": machine_identity(), "shape": list(shape)}
    artifact = Artifact(run.layout.kernel_form(digest(fingerprint)), fingerprint)

    def build(missing: list[Artifact]) -> None:  # noqa: ARG001 - one artifact
        from stages.tally.compiled import verified_variant

        write_text_atomic(artifact.path, json.dumps({"variant": verified_variant(*shape)}))
        artifact.commit()

    realize("iou", [Target(f"compiled tally form {shape}", (artifact,), build)])
    variant = json.loads(artifact.path.read_text())["variant"]
    return VerifiedForm(machine_digest(), shape, int(variant))


def evidence_params(run: Run) -> dict:
    """The columns that say which evidence (SEMANTICS.md §8) units and layers rows carry:
    every one in every row set, null where a setting does not apply (one schema for all)."""
    s = run.cfg.scoring
    boot, null = s.bootstrap > 0, s.null != NullKind.none
    return {"bootstrap_replicates": s.bootstrap, "bootstrap_ci": s.ci if boot else None,
            "bootstrap_candidates": s.candidates if boot else None, "null_model": str(s.null),
            "null_draws": s.null_draws if null else None,
            "null_level": s.null_level if null else None,
            "evidence_seed": s.seed if boot or null else None}


def evidence(run: Run, ctx: LayerContext, rule: TallyRule, found: LayerPass, frames: dict,
             missing: list[Artifact]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The units and layers rows with the bootstrap's and the null's evidence, as asked."""
    from stages.evidence.null import permuted_rows
    from stages.iou import (
        bootstrap_pass,
        evidence_columns,
        null_best_iou,
        with_bootstrap,
        with_null,
    )

    s, units, layers = run.cfg.scoring, frames["units"], frames["layers"]
    if s.bootstrap:
        from stages.evidence.bootstrap import candidate_labels, replicate_thresholds

        labels_of = candidate_labels(found.counts.iou(ctx.space), s.candidates)
        log.info("iou: %s: bootstrap, %d replicates", ctx.layer, s.bootstrap)
        thresholds = replicate_thresholds(found.tops, ctx.acts.store.n_images, ctx.positions(),
                                          s.quantile, s.bootstrap, s.seed)
        counts = bootstrap_pass(ctx.source(run.cfg.extract.device), thresholds, ctx.space,
                                rule, labels_of, s.seed, run.scheduler(),
                                f"bootstrap {ctx.layer}", run.cfg.progress,
                                scratch_path(missing, "bootstrap.npz"))
        units, layers = with_bootstrap(units, layers, counts, ctx.space, labels_of, s.ci)
    if s.null != NullKind.none:
        log.info("iou: %s: null model, %d permutations", ctx.layer, s.null_draws)
        n_rows = ctx.acts.store.n_images
        sources = [ctx.source(run.cfg.extract.device,
                              permuted_rows(ctx.concepts.rows, n_rows, s.seed, draw))
                   for draw in range(s.null_draws)]
        null = null_best_iou(sources, ctx.threshold_values, ctx.space, rule, run.scheduler(),
                             f"null {ctx.layer}", run.cfg.progress)
        units, layers = with_null(units, layers, null, s.null_level)
    return evidence_columns(units, layers, evidence_params(run))


def iou_artifacts(run: Run, ctx: LayerContext) -> dict[str, Artifact]:
    """The layer's iou, units and layers files.  The evidence settings are not part of a row
    set's key but of its fingerprint: asking for evidence replaces the row set with one that
    has it, and a run that asks for none keeps the evidence a current row set has."""
    s = run.cfg.scoring
    params = {**ctx.row_keys(), "threshold_quantile": s.quantile, "union_mode": str(s.union),
              "planes": str(s.planes), "categories": ",".join(ctx.space.categories)}
    with_threshold = {**params, "iou_threshold": s.iou_threshold}
    asked = evidence_params(run)
    tables = {name: ctx.result(run, name, with_threshold, {"evidence": asked})
              for name in ("units", "layers")}
    if s.bootstrap == 0 and s.null == NullKind.none:
        recorded = [(t.manifest() or {}).get("fingerprint", {}).get("evidence")
                    for t in tables.values()]
        kept = {name: replace(t, fingerprint={**t.fingerprint, "evidence": recorded[0]})
                for name, t in tables.items()}
        if recorded[0] and recorded[0] == recorded[1] and all(
                t.is_current() for t in kept.values()):
            tables = kept
    return {"iou": ctx.result(run, "iou", params), **tables}


def iou_targets(run: Run) -> list[Target]:
    """Per layer its tables and, when formulas are asked for, its signature counts, from one
    pass over the blocks."""
    s = run.cfg.scoring
    targets = []
    for layer, ctx in layer_contexts(run).items():
        tables = iou_artifacts(run, ctx)
        signature = ctx.signature_artifact(run) if run.cfg.concepts.formulas else None

        def build(missing: list[Artifact], ctx=ctx, tables=tables, signature=signature) -> None:
            from stages.iou import score_tables
            from stages.tally.statistic import TallyRule, describe_kernel
            from storage.arrays import save_arrays

            rule = TallyRule(str(s.union), str(s.planes))
            tally = any(a in missing for a in tables.values())
            verified = (verified_form(run, ctx.shape()),) if tally else ()
            if tally:
                log.info("iou: %s: tally by the %s", ctx.layer,
                         describe_kernel(ctx.shape(), verified))
            rows = tables["units"] in missing or tables["layers"] in missing
            tops = 0
            if rows and s.bootstrap:
                from stages.evidence.bootstrap import entries_needed

                tops = entries_needed(ctx.acts.store.n_images, ctx.positions(), s.quantile)
            found = ctx.scoring_pass(run, rule if tally else None, signature in missing,
                                     missing, tops, verified)
            if found.signatures is not None:
                save_arrays(signature, found.signatures.state_dict())
            if found.counts is None:
                return
            frames = score_tables(found.counts, ctx.space, ctx.threshold_values,
                                  s.iou_threshold, tables["iou"].fingerprint["params"])
            if rows:
                frames["units"], frames["layers"] = evidence(run, ctx, rule, found, frames,
                                                             missing)
            for name, frame in frames.items():
                if tables[name] in missing:
                    write_partition(tables[name], frame)

        artifacts = (*tables.values(), *([signature] if signature else []))
        targets.append(Target(f"{ctx.acts.model.identity.model_id} {layer} tables", artifacts,
                              build))
    return targets


def iou_value(run: Run) -> dict[str, pd.DataFrame]:
    """Per layer, the `layers` rows of this run (for the summary)."""
    import pandas as pd

    return {layer: pd.read_parquet(iou_artifacts(run, ctx)["layers"].path)
            for layer, ctx in layer_contexts(run).items()}


# ---------------------------------------------------------------- signatures
def signatures_value(run: Run) -> dict[str, Artifact]:
    """Per layer, the artifact of its pixel-signature counts."""
    return {layer: ctx.signature_artifact(run) for layer, ctx in layer_contexts(run).items()}


def signatures_targets(run: Run) -> list[Target]:
    """Per layer its signature counts, in a pass of their own (unless the iou stage made
    them alongside the tally)."""
    def target(ctx: LayerContext, artifact: Artifact) -> Target:
        def build(missing: list[Artifact]) -> None:
            from storage.arrays import save_arrays

            found = ctx.scoring_pass(run, None, True, missing).signatures
            save_arrays(artifact, found.state_dict())

        return Target(f"{ctx.acts.model.identity.model_id} {ctx.layer} signatures", (artifact,),
                      build)

    return [target(layer_contexts(run)[layer], a) for layer, a in signatures_value(run).items()]
