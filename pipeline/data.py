"""Stages that make what every score is computed from: dataset, concepts, model, extract."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from pipeline.config import Stage
from pipeline.graph import Run, Target
from pipeline.layout import (
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
from stages.extract import ExtractConfig, run_extract
from stages.network.models import ModelSpec
from storage import activations as astore
from storage.activations import ActivationStore
from storage.artifacts import Artifact, atomic_file, digest
from storage.broden import BrodenDataset, index_fingerprint, read_broden
from storage.concepts import ConceptStore, store_artifact
from storage.errors import StoreMismatchError, UserError

log = logging.getLogger("netdissect")


class DatasetInfo:
    """The probe dataset: its id, directory and (parsed once) Broden tables."""

    def __init__(self, id: str, root: Path):
        self.id, self.root = id, root

    @cached_property
    def broden(self) -> BrodenDataset:
        return read_broden(self.root)

    @cached_property
    def index_fingerprint(self) -> str:
        return index_fingerprint(self.root)


@dataclass(frozen=True)
class ModelInfo:
    spec: ModelSpec
    identity: ModelIdentity


@dataclass(frozen=True)
class Activations:
    """The layers a run scores, in one activation store."""

    store: ActivationStore
    layers: tuple[str, ...]
    fingerprint: dict
    dataset: DatasetInfo
    model: ModelInfo

    def layer_key(self, layer: str) -> str:
        return astore.layer_artifact(self.store.path, self.fingerprint, layer).key


# ---------------------------------------------------------------- dataset
def plan_dataset(run: Run) -> list[Target]:
    d = run.cfg.dataset
    root = run.layout.dataset_root(run.cfg)
    if d.release:
        if not (root / "index.csv").is_file():
            raise UserError(f"dataset {d.release} is not in {root.parent}; fetch it first: "
                            f"python -m pipeline.run stage=fetch dataset={d.release} "
                            "(or point dataset.path at your copy)")
        return []
    if d.path:
        return []
    params = asdict(d.synthetic)

    def build(_missing: list[Artifact]) -> None:
        synthetic.generate(root, progress=run.cfg.progress, **params)

    return [Target(f"synthetic dataset {root}", (synthetic.dataset_artifact(root, **params),),
                   build)]


def dataset_value(run: Run) -> DatasetInfo:
    ds = DatasetInfo(dataset_id(run.cfg), run.layout.dataset_root(run.cfg))
    if not ds.broden.images:
        raise UserError(f"{ds.root / 'index.csv'}: lists no images; nothing to dissect")
    return ds


# ---------------------------------------------------------------- concepts
def _concepts_path(run: Run) -> Path:
    return run.layout.concept_store(run.get("dataset").id, moved_labels(run.cfg))


def concept_store_target(run: Run, what: str, dataset: BrodenDataset, path: Path) -> Target:
    """Build the concept store of ``dataset`` at ``path`` (labels moved with the run's
    geometric perturbation, if any) unless it is current."""
    artifact = store_artifact(path, dataset.fingerprint(), moved_labels(run.cfg))
    cfg = ConceptsConfig(dataset.root, path, run.cfg.dataset.block_size, run.cfg.progress,
                         perturbation(run.cfg))
    return Target(f"{what} {path}", (artifact,),
                  lambda _missing: build_concept_store(cfg, run.scheduler(), dataset))


def plan_concepts(run: Run) -> list[Target]:
    return [concept_store_target(run, "concept store", run.get("dataset").broden,
                                 _concepts_path(run))]


def concepts_value(run: Run) -> ConceptStore:
    return ConceptStore(_concepts_path(run))


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
    ds = run.get("dataset")
    fingerprint = {"dataset": ds.broden.fingerprint(), "train": asdict(run.cfg.model.train)}
    path = run.layout.demo_checkpoint(ds.id, digest(fingerprint, 8))
    return Artifact(path, fingerprint), path.with_suffix(".json")


def plan_model(run: Run) -> list[Target]:
    if registered_weights(run.cfg.model):
        return [weights_target(run)]
    if not is_demo(run.cfg.model):
        return []
    from stages.demo_model import DemoTrainConfig, train_demo_model

    artifact, info_path = _demo_checkpoint(run)
    ds = run.get("dataset")

    def build(_missing: list[Artifact]) -> None:
        info = train_demo_model(ds.root, DemoTrainConfig(**asdict(run.cfg.model.train)),
                                run.cfg.progress)
        with atomic_file(artifact.path) as tmp:
            info.save(tmp)
        with atomic_file(info_path) as tmp:
            tmp.write_text(json.dumps(info.summary, indent=2))
        artifact.commit(val_accuracy=info.summary["val_accuracy"])

    return [Target(f"demo model {artifact.path}", (artifact,), build)]


def model_value(run: Run) -> ModelInfo:
    m = run.cfg.model
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
            "dataset": ds.id, "dataset_index": ds.index_fingerprint, "image_size": [first.ih, first.iw],
            "dtype": dtype}


def _extract_setup(run: Run) -> tuple[ExtractConfig, DatasetInfo, ModelInfo]:
    ds, model = run.get("dataset"), run.get("model")
    dtype = str(run.cfg.extract.dtype)
    fingerprint = store_fingerprint(ds, model, dtype)
    path = run.layout.activations(ds.id, model.identity.model_id, dtype)
    e = run.cfg.extract
    cfg = ExtractConfig(
        images_dir=ds.root / "images", store_path=path, model=model.spec,
        fingerprint=fingerprint, dtype=dtype, block_size=run.cfg.dataset.block_size,
        batch_size=e.batch_size, device=e.device, progress=run.cfg.progress,
        perturbation=perturbation(run.cfg),
    )
    if astore.store_artifact(path, fingerprint).state() == "stale":
        raise StoreMismatchError(
            f"{path}: this cache of {model.identity.model_id} was extracted from another "
            f"dataset also named {ds.id!r} (its index.csv differs from {ds.root / 'index.csv'}); "
            "give this dataset its own id with dataset.name=..."
        )
    return cfg, ds, model


def plan_extract(run: Run) -> list[Target]:
    cfg, ds, model = _extract_setup(run)
    first = ds.broden.images[0]
    cfg.perturbation.check_sizes(first.ih, first.iw, first.sh, first.sw)
    layers = tuple(astore.layer_artifact(cfg.store_path, cfg.fingerprint, layer)
                   for layer in cfg.model.layers)
    if run.cfg.stage == Stage.rescore:  # re-scoring never runs the model
        missing = [a.member for a in layers if not a.is_current()]
        if missing:
            raise UserError(
                f"{cfg.store_path}: no activation cache of layer(s) {', '.join(missing)} for "
                f"model {model.identity.model_id} on dataset {ds.id!r}; run stage=extract "
                "(or stage=iou) first"
            )
        return []

    def build(missing: list[Artifact]) -> None:
        todo = replace(cfg, model=replace(cfg.model, layers=tuple(a.member for a in missing)))
        run_extract(todo, ds.broden.images, run.scheduler())

    name = f"{model.identity.model_id} {', '.join(cfg.model.layers)} activations"
    return [Target(name, layers, build)]


def extract_value(run: Run) -> Activations:
    cfg, ds, model = _extract_setup(run)
    return Activations(ActivationStore(cfg.store_path), cfg.model.layers, cfg.fingerprint, ds,
                       model)
