"""Stages that make what every score is computed from: dataset, concepts, model, extract,
and ``cache`` (the cached activations, never extracted: re-scoring needs no model run)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from pipeline.graph import NotReady, Run, Target
from pipeline.identity import (
    ModelIdentity,
    dataset_id,
    is_demo,
    model_identity,
    model_spec,
    moved_labels,
    perturbation,
    registered_weights,
)
from stages import synthetic
from stages.concepts import ConceptsConfig, build_concept_store
from stages.network.spec import ModelSpec
from storage import activations as astore
from storage.activations import ActivationStore
from storage.artifacts import Artifact, atomic_file, digest
from storage.broden import BrodenDataset, LabelTable, index_fingerprint, read_broden
from storage.concepts import store_artifact
from storage.errors import StoreMismatchError, UserError

log = logging.getLogger("netdissect")


class DatasetInfo:
    """The probe dataset: its id, directory and (parsed once) Broden tables; ``generated``
    is the synthetic set's artifact (its tables exist only once it is built)."""

    def __init__(self, id: str, root: Path, generated: Artifact | None = None):
        self.id, self.root, self.generated = id, root, generated

    def _ready(self) -> None:
        if self.generated is not None and not self.generated.is_current():
            raise NotReady("dataset")

    @cached_property
    def broden(self) -> BrodenDataset:
        self._ready()
        return read_broden(self.root)

    @cached_property
    def index_fingerprint(self) -> str:
        self._ready()
        return index_fingerprint(self.root)

    @property
    def label_table(self) -> LabelTable:
        return self.broden.label_table


@dataclass(frozen=True)
class ModelInfo:
    spec: ModelSpec
    identity: ModelIdentity


@dataclass(frozen=True)
class Activations:
    """The layers a run scores, in one activation store (a description: the store is opened
    only by the builds that read it)."""

    path: Path
    layers: tuple[str, ...]
    fingerprint: dict
    dataset: DatasetInfo
    model: ModelInfo

    @property
    def store(self) -> ActivationStore:
        return ActivationStore(self.path)

    def layer_artifact(self, layer: str) -> Artifact:
        return astore.layer_artifact(self.path, self.fingerprint, layer)

    def layer_key(self, layer: str) -> str:
        return self.layer_artifact(layer).key


# ---------------------------------------------------------------- dataset
def _synthetic_artifact(run: Run) -> Artifact | None:
    d = run.cfg.dataset
    if d.release or d.path:
        return None
    return synthetic.dataset_artifact(run.layout.dataset_root(run.cfg), **asdict(d.synthetic))


def dataset_targets(run: Run) -> list[Target]:
    d = run.cfg.dataset
    root = run.layout.dataset_root(run.cfg)
    if d.release and not (root / "index.csv").is_file():
        raise UserError(f"dataset {d.release} is not in {root.parent}; fetch it first: "
                        f"python -m pipeline.run stage=fetch dataset={d.release} "
                        "(or point dataset.path at your copy)")
    artifact = _synthetic_artifact(run)
    if artifact is None:
        return []
    params = asdict(d.synthetic)

    def build(_missing: list[Artifact]) -> None:
        synthetic.generate(root, progress=run.cfg.progress, **params)

    return [Target(f"synthetic dataset {root}", (artifact,), build)]


def dataset_value(run: Run) -> DatasetInfo:
    ds = DatasetInfo(dataset_id(run.cfg), run.layout.dataset_root(run.cfg), _synthetic_artifact(run))
    if not ds.broden.images:
        raise UserError(f"{ds.root / 'index.csv'}: lists no images; nothing to dissect")
    return ds


# ---------------------------------------------------------------- concepts
def concept_store_target(run: Run, what: str, dataset: BrodenDataset, path: Path) -> Target:
    """Build the concept store of ``dataset`` at ``path`` (labels moved with the run's
    geometric perturbation, if any) unless it is current."""
    artifact = store_artifact(path, dataset.fingerprint(), moved_labels(run.cfg))
    cfg = ConceptsConfig(dataset.root, path, run.cfg.dataset.block_size, run.cfg.progress,
                         perturbation(run.cfg))
    return Target(f"{what} {path}", (artifact,),
                  lambda _missing: build_concept_store(cfg, run.scheduler(), dataset))


def check_perturbation(run: Run, ds: DatasetInfo) -> None:
    """The input perturbation fits the dataset's sizes (before labels or images move)."""
    first = ds.broden.images[0]
    perturbation(run.cfg).check_sizes(first.ih, first.iw, first.sh, first.sw)


def concepts_targets(run: Run) -> list[Target]:
    ds = run.value("dataset")
    check_perturbation(run, ds)
    return [concept_store_target(run, "concept store", ds.broden, concepts_value(run))]


def concepts_value(run: Run) -> Path:
    """Where the probe dataset's concept store is."""
    return run.layout.concept_store(run.value("dataset").id, moved_labels(run.cfg))


# ---------------------------------------------------------------- model
def weights_target(run: Run) -> Target:
    """A registered checkpoint (Places365) downloaded by checksum into the torch hub cache."""
    from stages.fetch import fetch_weights, weights_cache_path

    name, f = str(run.cfg.model.weights), run.cfg.fetch
    path = weights_cache_path(name)
    artifact = Artifact(path, {"release": name})

    def build(_missing: list[Artifact]) -> None:
        result = fetch_weights(name, urls=f.urls, mirrors=f.mirrors, progress=run.cfg.progress,
                               timeout=f.timeout, attempts=f.attempts)
        log.info("%s", result.message)
        artifact.commit(md5=result.md5, md5_verified=result.md5_verified)

    return Target(f"weights {name} {path}", (artifact,), build)


def _demo_checkpoint(run: Run) -> tuple[Artifact, Path]:
    ds = run.value("dataset")
    fingerprint = {"dataset": ds.broden.fingerprint(), "train": asdict(run.cfg.model.train)}
    path = run.layout.demo_checkpoint(ds.id, digest(fingerprint, 8))
    return Artifact(path, fingerprint), path.with_suffix(".json")


def model_targets(run: Run) -> list[Target]:
    if registered_weights(run.cfg.model):
        return [weights_target(run)]
    if not is_demo(run.cfg.model):
        return []
    artifact, info_path = _demo_checkpoint(run)
    ds = run.value("dataset")

    def build(_missing: list[Artifact]) -> None:
        from stages.demo_model import DemoTrainConfig, train_demo_model  # torch: to train

        info = train_demo_model(ds.root, DemoTrainConfig(**asdict(run.cfg.model.train)),
                                run.cfg.progress)
        with atomic_file(artifact.path) as tmp:
            info.save(tmp)
        with atomic_file(info_path) as tmp:
            tmp.write_text(json.dumps(info.summary, indent=2))
        artifact.commit(val_accuracy=info.summary["val_accuracy"])

    return [Target(f"demo model {artifact.path}", (artifact,), build)]


def model_value(run: Run) -> ModelInfo:
    """The model's spec and identity (a checkpoint's identity is its content: known once
    the checkpoint is there)."""
    m = run.cfg.model
    if any(not a.is_current() for t in model_targets(run) for a in t.artifacts):
        raise NotReady("model")
    if is_demo(m):
        artifact, info_path = _demo_checkpoint(run)
        info = json.loads(info_path.read_text())
        kwargs = {"num_classes": info["num_classes"], "width": m.train.width, **m.kwargs}
        spec = model_spec(m, weights=str(artifact.path), kwargs=kwargs)
    else:
        spec = model_spec(m)
    return ModelInfo(spec, model_identity(spec, str(perturbation(run.cfg))))


# ---------------------------------------------------------------- extract
def store_fingerprint(ds: DatasetInfo, model: ModelInfo, dtype: str) -> dict:
    """What a store's activations depend on besides the model: the dataset and the dtype
    (a dataset lists at least one image: ``dataset_value`` refuses an empty one)."""
    first = ds.broden.images[0]
    return {"model_id": model.identity.model_id, "model": model.identity.fingerprint,
            "dataset": ds.id, "dataset_index": ds.index_fingerprint,
            "image_size": [first.ih, first.iw], "dtype": dtype}


def extract_value(run: Run) -> Activations:
    """The activations a run scores (of stage extract, and of stage cache alike)."""
    return run.shared("activations", lambda: _activations(run))


def _activations(run: Run) -> Activations:
    ds, model = run.value("dataset"), run.value("model")
    dtype = str(run.cfg.extract.dtype)
    fingerprint = store_fingerprint(ds, model, dtype)
    path = run.layout.activations(ds.id, model.identity.model_id, dtype)
    if astore.store_artifact(path, fingerprint).state() == "stale":
        raise StoreMismatchError(
            f"{path}: this cache of {model.identity.model_id} was extracted from another "
            f"dataset also named {ds.id!r} (its index.csv differs from {ds.root / 'index.csv'}); "
            "give this dataset its own id with dataset.name=..."
        )
    return Activations(path, tuple(model.spec.layers), fingerprint, ds, model)


def extract_targets(run: Run) -> list[Target]:
    acts = extract_value(run)
    ds, e = acts.dataset, run.cfg.extract
    check_perturbation(run, ds)
    perturb = perturbation(run.cfg)
    layers = tuple(acts.layer_artifact(layer) for layer in acts.layers)

    def build(missing: list[Artifact]) -> None:
        from stages.extract import ExtractConfig, run_extract  # torch: only to extract

        spec = replace(acts.model.spec, layers=tuple(a.member for a in missing))
        cfg = ExtractConfig(
            images_dir=ds.root / "images", store_path=acts.path, model=spec,
            fingerprint=acts.fingerprint, dtype=str(e.dtype),
            block_size=run.cfg.dataset.block_size, batch_size=e.batch_size, device=e.device,
            progress=run.cfg.progress, perturbation=perturb)
        run_extract(cfg, ds.broden.images, run.scheduler())

    todo = [a.member for a in layers if not a.is_current()] or list(acts.layers)
    name = f"{acts.model.identity.model_id} {', '.join(todo)} activations"
    return [Target(name, layers, build)]


def cache_targets(run: Run) -> list[Target]:
    """Nothing to make: the cached layers must all be there (re-scoring never runs the
    model), else one line says how to make them."""
    acts = extract_value(run)
    missing = [layer for layer in acts.layers if not acts.layer_artifact(layer).is_current()]
    if missing:
        raise UserError(
            f"{acts.path}: no activation cache of layer(s) {', '.join(missing)} for "
            f"model {acts.model.identity.model_id} on dataset {acts.dataset.id!r}; run "
            "stage=extract (or stage=iou) first")
    return []
