"""The stage graph: each step makes sure its output exists and is current, runs what is
missing upstream first, and logs one line when it skips.

    dataset -> concepts ─────────────────────────────┐
    dataset -> model -> extract -> quantile -> iou ──┴─> tables -> report
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from stages.blocks import LayerBlocks
from stages.concepts import ConceptsConfig, build_concept_store
from stages.extract import ExtractConfig, run_extract
from stages.iou import (
    ScoringConfig,
    TallyReduction,
    iou_frame,
    label_space,
    layers_frame,
    units_frame,
)
from stages.models import ModelSpec
from stages.quantile import exact_thresholds
from stages.reduction import reduce_blocks
from storage.activations import ActivationStore
from storage.broden import BrodenDataset, index_fingerprint, read_broden
from storage.concepts import ConceptStore
from storage.errors import UserError
from storage.tables import safe_name, write_partition
from storage.thresholds import load_thresholds, save_thresholds, threshold_path

log = logging.getLogger("netdissect")
STAGES = (
    "dataset", "concepts", "model", "extract", "quantile", "iou", "rescore", "explain", "report",
    "all",
)


@dataclass
class Pipeline:
    """One run's configuration (a plain dict from Hydra) and its scheduler."""

    cfg: dict
    scheduler: Any = None
    outputs: dict = field(default_factory=dict)

    # ------------------------------------------------------------- paths and ids
    @property
    def workdir(self) -> Path:
        return Path(self.cfg["workdir"]).expanduser().resolve()

    @property
    def progress(self) -> bool:
        return bool(self.cfg.get("progress", True))

    @property
    def block_size(self) -> int:
        size = int(self.cfg["dataset"].get("block_size", 64))
        if size <= 0:
            raise UserError(f"dataset.block_size={size}: must be positive")
        return size

    @cached_property
    def dataset_root(self) -> Path:
        path = self.cfg["dataset"].get("path")
        if path:
            root = Path(path).expanduser().resolve()
            if not root.is_dir():
                raise UserError(f"dataset.path={path}: directory not found")
            return root
        return self.ensure_synthetic()

    @property
    def dataset_id(self) -> str:
        name = self.cfg["dataset"].get("name")
        if name:
            return safe_name(str(name))
        return "synthetic" if not self.cfg["dataset"].get("path") else safe_name(self.dataset_root.name)

    @property
    def model_id(self) -> str:
        return safe_name(str(self.cfg["model"]["name"]))

    @property
    def results_root(self) -> Path:
        return self.workdir / "results"

    @property
    def activation_path(self) -> Path:
        return self.workdir / "activations" / self.dataset_id / f"{self.model_id}.zarr"

    def concept_path(self, dataset_id: str) -> Path:
        return self.workdir / "concepts" / f"{dataset_id}.zarr"

    # ------------------------------------------------------------- stages
    def ensure_synthetic(self) -> Path:
        from stages import synthetic

        params = dict(self.cfg["dataset"].get("synthetic") or {})
        out = self.workdir / "datasets" / "synthetic"
        if synthetic.is_complete(out, **params):
            log.info("dataset: skipped, synthetic dataset %s is current", out)
            return out
        log.info("dataset: generating the synthetic Broden-format dataset in %s", out)
        synthetic.generate(out, progress=self.progress, **params)
        return out

    @cached_property
    def dataset(self) -> BrodenDataset:
        return read_broden(self.dataset_root)

    def ensure_concepts(self) -> ConceptStore:
        cfg = ConceptsConfig(
            self.dataset_root, self.concept_path(self.dataset_id), self.block_size, self.progress
        )
        return build_concept_store(cfg, self.scheduler)

    def model_spec(self) -> ModelSpec:
        m = self.cfg["model"]
        weights = m.get("weights")
        kwargs = dict(m.get("kwargs") or {})
        if m.get("name") == "demo" and m.get("factory") == "stages.demo_model:demo_net" and not weights:
            weights, kwargs = self.ensure_demo_model()
        layers = m.get("layers")
        if not layers:
            raise UserError("model.layers: give at least one layer name, e.g. model.layers=[layer4]")
        return ModelSpec(
            name=str(m["name"]),
            layers=tuple(str(x) for x in layers),
            arch=m.get("arch"),
            factory=m.get("factory"),
            weights=None if weights is None else str(weights),
            seed=int(m.get("seed", 0)),
            preprocess=str(m.get("preprocess", "imagenet")),
            kwargs=kwargs,
        )

    def ensure_demo_model(self) -> tuple[str, dict]:
        from stages.demo_model import DemoTrainConfig, demo_model_info, train_demo_model

        train_cfg = DemoTrainConfig(**dict(self.cfg["model"].get("train") or {}))
        path = self.workdir / "models" / f"demo-{self.dataset_id}.pt"
        info = demo_model_info(path)
        fingerprint = self.dataset.fingerprint()
        if info and info.get("dataset_fingerprint") == fingerprint and info.get("config") == asdict(train_cfg):
            log.info("model: skipped, demo model %s is current (val accuracy %.1f%%)",
                     path, 100 * info["val_accuracy"])
        else:
            log.info("model: training the demo model on %s scene labels", self.dataset_id)
            info = train_demo_model(self.dataset_root, path, train_cfg, self.progress)
        return str(path), {"num_classes": info["num_classes"], "width": train_cfg.width}

    def ensure_activations(self) -> ActivationStore:
        spec = self.model_spec()
        e = self.cfg.get("extract", {})
        cfg = ExtractConfig(
            images_dir=self.dataset.images_dir,
            store_path=self.activation_path,
            model=spec,
            dataset_fingerprint=index_fingerprint(self.dataset_root),
            dtype=str(e.get("dtype", "float32")),
            block_size=self.block_size,
            batch_size=int(e.get("batch_size", 32)),
            device=str(e.get("device", "auto")),
            progress=self.progress,
        )
        run_extract(cfg, self.dataset.images, self.scheduler)
        return ActivationStore(self.activation_path)

    @property
    def scoring(self) -> ScoringConfig:
        s = self.cfg["scoring"]
        cats = s.get("categories")
        scoring = ScoringConfig(
            quantile=float(s.get("quantile", 0.005)),
            union=str(s.get("union", "restricted")),
            planes=str(s.get("planes", "set")),
            categories=None if cats is None else tuple(str(c) for c in cats),
            iou_threshold=float(s.get("iou_threshold", 0.04)),
        )
        scoring.validate()
        return scoring

    def layer_blocks(self, layer: str, device: str | None = None) -> LayerBlocks:
        """Blocks for the threshold and tally kernels: on the worker's GPU when it has one
        (``extract.device=auto``), else CPU."""
        if device is None:
            device = str((self.cfg.get("extract") or {}).get("device", "auto"))
        return LayerBlocks(str(self.activation_path), layer, None, device)

    def ensure_thresholds(self, store: ActivationStore) -> dict[str, np.ndarray]:
        q = self.scoring.quantile
        root = self.workdir / "thresholds" / self.dataset_id / self.model_id
        result = {}
        for layer in store.layers:
            fingerprint = {"activations": store.fingerprint, "quantile": q, "transform": "none"}
            path = threshold_path(root, layer, fingerprint)
            cached = load_thresholds(path, fingerprint)
            if cached is not None:
                log.info("quantile: skipped, %s %s thresholds are current (q=%g)", self.model_id, layer, q)
                result[layer] = cached
                continue
            thresholds = exact_thresholds(
                self.layer_blocks(layer), q, self.scheduler, progress=self.progress
            )
            save_thresholds(path, thresholds, fingerprint)
            log.info("quantile: %s %s: %d exact thresholds (q=%g) -> %s",
                     self.model_id, layer, len(thresholds), q, path)
            result[layer] = thresholds
        return result

    def tally(self, reduction, n_blocks: int, desc: str) -> dict:
        return reduce_blocks(reduction, n_blocks, self.scheduler, desc, self.progress)

    def run_iou(self) -> dict[str, Any]:
        """Score every cached layer against the probe dataset's own labels."""
        concepts = self.ensure_concepts()
        store = self.ensure_activations()
        thresholds = self.ensure_thresholds(store)
        return self.score(store, concepts, thresholds, concept_set=self.dataset_id, rows=None)

    def score(self, store, concepts, thresholds, concept_set: str, rows) -> dict[str, Any]:
        scoring = self.scoring
        space = label_space(concepts, scoring.categories)
        if space.n_labels == 0:
            raise UserError(f"{concepts.path}: no labels to score in categories {scoring.categories}")
        summaries = {}
        for layer in store.layers:
            reduction = TallyReduction(
                self.layer_blocks(layer), str(concepts.path), np.array(thresholds[layer]), space,
                scoring, rows,
            )
            counts = self.tally(reduction, store.n_blocks(), f"iou {layer}")
            meta = {
                "model": self.model_id, "layer": layer, "dataset": self.dataset_id,
                "concept_set": concept_set, "quantile": scoring.quantile,
                "union_mode": scoring.union, "planes": scoring.planes, "transform": "none",
                "categories": ",".join(space.categories),
            }
            params = {k: v for k, v in meta.items() if k not in ("model", "layer")}
            iou = iou_frame(counts, space, meta)
            units = units_frame(iou, thresholds[layer], scoring.iou_threshold)
            layers = layers_frame(units, space.categories, {**meta, "iou_threshold": scoring.iou_threshold})
            params_units = {**params, "iou_threshold": scoring.iou_threshold}
            write_partition(self.results_root, "iou", self.model_id, layer, iou, params)
            write_partition(self.results_root, "units", self.model_id, layer, units, params_units)
            write_partition(self.results_root, "layers", self.model_id, layer, layers, params_units)
            summaries[layer] = layers
        self.print_summary(summaries, concept_set)
        return summaries

    def print_summary(self, summaries: dict, concept_set: str) -> None:
        lines = [f"Network dissection of {self.model_id} on {self.dataset_id} (concepts: {concept_set})"]
        for layer, frame in summaries.items():
            overall = frame[frame["category"] == "all"].iloc[0]
            per_cat = ", ".join(
                f"{r.category} {r.unique_concepts}" for r in frame.itertuples() if r.category != "all"
            )
            lines.append(
                f"  {layer}: {overall.units} units, {overall.detectors} detectors, "
                f"{overall.unique_concepts} unique concepts ({per_cat})"
            )
        lines.append(f"Tables: {self.results_root}/{{iou,units,layers}} (Parquet, hive-partitioned)")
        print("\n".join(lines))

    def run_report(self) -> Path:
        from stages.report import ReportConfig, build_report

        r = self.cfg.get("report") or {}
        top_n = int(r.get("top_n", 8))
        if top_n < 1:
            raise UserError(f"report.top_n={top_n}: must be >= 1")
        index = build_report(
            ReportConfig(self.workdir, self.dataset_root, top_n, self.progress, r.get("concept_set")),
            self.scheduler,
        )
        print(f"Report: {index}")
        return index

    # ------------------------------------------------------------- re-scoring
    def open_cache(self) -> ActivationStore:
        """The activation cache alone: re-scoring never loads the model."""
        path = self.activation_path
        if not (path / "zarr.json").is_file():
            raise UserError(
                f"{path}: no activation cache for model {self.model_id!r} on dataset "
                f"{self.dataset_id!r}; run stage=extract (or stage=iou) first"
            )
        return ActivationStore(path)

    def concept_set(self) -> tuple[ConceptStore, str]:
        """The concept store to score against: concepts.path, else the probe dataset."""
        c = self.cfg.get("concepts") or {}
        if not c.get("path"):
            return self.ensure_concepts(), self.dataset_id
        root = Path(c["path"]).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"concepts.path={c['path']}: directory not found")
        name = safe_name(str(c.get("name") or root.name))
        cfg = ConceptsConfig(root, self.workdir / "concepts" / f"set-{name}.zarr", self.block_size,
                             self.progress)
        return build_concept_store(cfg, self.scheduler), name

    def match_rows(self, store: ActivationStore, concepts: ConceptStore) -> np.ndarray | None:
        """Activation row -> concept row (-1 = not in the set); None when identical order."""
        cached = store.image_paths()
        wanted = concepts.image_paths()
        if cached == wanted:
            return None
        position = {path: i for i, path in enumerate(wanted)}
        cached_set = set(cached)
        missing = [p for p in wanted if p not in cached_set]
        if missing:
            raise UserError(
                f"{concepts.attrs.get('source')}: {len(missing)} concept-set image(s) are not in "
                f"the activation cache {store.path} (first: {', '.join(missing[:3])})"
            )
        return np.array([position.get(p, -1) for p in cached], dtype=np.int64)

    def run_rescore(self) -> dict[str, Any]:
        store = self.open_cache()
        thresholds = self.ensure_thresholds(store)
        concepts, name = self.concept_set()
        rows = self.match_rows(store, concepts)
        if rows is not None:
            log.info("rescore: %d of %d cached images are in concept set %s",
                     int((rows >= 0).sum()), len(rows), name)
        summaries = self.score(store, concepts, thresholds, concept_set=name, rows=rows)
        formulas_file = (self.cfg.get("concepts") or {}).get("formulas")
        if formulas_file:
            self.score_formulas(store, concepts, thresholds, name, rows, Path(formulas_file))
        return summaries

    def signature_counts(self, store, concepts, thresholds, layer: str, rows, space):
        from stages.explain import SignatureCounts, SignatureReduction

        reduction = SignatureReduction(self.layer_blocks(layer, "cpu"), str(concepts.path),
                                       np.array(thresholds[layer]), space, rows)
        partial = self.tally(reduction, store.n_blocks(), f"signatures {layer}")
        return SignatureCounts.from_partial(partial, space.n_labels)

    def score_formulas(self, store, concepts, thresholds, name: str, rows, path: Path) -> None:
        from stages.explain import formula_frame
        from stages.formulas import load_formulas

        space = label_space(concepts, self.scoring.categories)
        formulas = load_formulas(path, space.names)
        index: dict[str, list[int]] = {}
        for i, label_name in enumerate(space.names):
            index.setdefault(label_name, []).append(i + 1)
        for layer in store.layers:
            sc = self.signature_counts(store, concepts, thresholds, layer, rows, space)
            meta = {
                "model": self.model_id, "layer": layer, "dataset": self.dataset_id,
                "concept_set": name, "quantile": self.scoring.quantile, "union_mode": "global",
                "planes": "set", "transform": "none", "categories": "formula",
            }
            frame = formula_frame(sc, formulas, index, meta)
            params = {k: v for k, v in meta.items() if k not in ("model", "layer")}
            params["formulas"] = {k: str(v) for k, v in sorted(formulas.items())}
            write_partition(self.results_root, "iou", self.model_id, layer, frame, params)
            best = frame.sort_values("iou", ascending=False).head(3)
            print(f"  {layer} formulas: " + ", ".join(
                f"unit {r.unit} {r.concept} {r.iou:.3f}" for r in best.itertuples()))
        log.info("rescore: %d formula concept(s) from %s scored", len(formulas), path)

    def run_explain(self) -> dict[str, Any]:
        import pandas as pd

        from stages.explain import beam_search
        from stages.formulas import format_formula, formula_length

        e = self.cfg.get("explain") or {}
        max_length, beam = int(e.get("max_length", 3)), int(e.get("beam", 5))
        if max_length < 1 or beam < 1:
            raise UserError(f"explain.max_length={max_length}, explain.beam={beam}: both must be >= 1")
        if (self.activation_path / "zarr.json").is_file():
            store = self.open_cache()
        else:
            self.ensure_concepts()
            store = self.ensure_activations()
        thresholds = self.ensure_thresholds(store)
        concepts, name = self.concept_set()
        rows = self.match_rows(store, concepts)
        space = label_space(concepts, self.scoring.categories)
        out = {}
        for layer in store.layers:
            sc = self.signature_counts(store, concepts, thresholds, layer, rows, space)
            found = beam_search(sc, list(space.names), max_length, beam)
            frame = pd.DataFrame({
                "unit": np.arange(len(found)),
                "formula": [format_formula(f) if f is not None else "" for f, _ in found],
                "iou": [score for _, score in found],
                "length": [formula_length(f) if f is not None else 0 for f, _ in found],
            })
            meta = {"dataset": self.dataset_id, "concept_set": name,
                    "quantile": self.scoring.quantile, "union_mode": "global", "planes": "set",
                    "categories": ",".join(space.categories), "beam": beam,
                    "max_length": max_length}
            for key, value in meta.items():
                frame.insert(0, key, value)
            write_partition(self.results_root, "explanations", self.model_id, layer, frame, meta)
            top = frame.sort_values("iou", ascending=False).head(3)
            print(f"{layer}: best explanations " + "; ".join(
                f"unit {r.unit}: {r.formula} ({r.iou:.3f})" for r in top.itertuples()))
            out[layer] = frame
        print(f"Table: {self.results_root}/explanations")
        return out

    # ------------------------------------------------------------- dispatch
    def validate(self) -> None:
        """Check every user-set value before any work starts (fail fast, write nothing)."""
        from pipeline.cluster import KINDS
        from stages.extract import DTYPES

        stage = str(self.cfg.get("stage"))
        if stage not in STAGES:
            raise UserError(f"stage={stage!r}: choose one of {', '.join(STAGES)}")
        self.scoring  # noqa: B018 - validates scoring.*
        kind = (self.cfg.get("cluster") or {}).get("kind", "local")
        if kind not in KINDS:
            raise UserError(f"cluster.kind={kind!r}: choose one of {', '.join(KINDS)}")
        dtype = str(self.cfg.get("extract", {}).get("dtype", "float32"))
        if dtype not in DTYPES:
            raise UserError(f"extract.dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.block_size  # noqa: B018 - validates dataset.block_size
        path = self.cfg["dataset"].get("path")
        if path and not Path(path).expanduser().is_dir():
            raise UserError(f"dataset.path={path}: directory not found")

    def run(self, stage: str) -> Any:
        if stage == "dataset":
            return self.dataset_root
        if stage == "concepts":
            return self.ensure_concepts()
        if stage == "model":
            return self.model_spec()
        if stage == "extract":
            return self.ensure_activations()
        if stage == "quantile":
            return self.ensure_thresholds(self.ensure_activations())
        if stage == "iou":
            return self.run_iou()
        if stage == "report":
            return self.run_report()
        if stage == "all":
            self.run_iou()
            return self.run_report()
        if stage == "rescore":
            return self.run_rescore()
        if stage == "explain":
            return self.run_explain()
        raise UserError(f"stage={stage!r}: choose one of {', '.join(STAGES)}")
