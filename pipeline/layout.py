"""Every path and id of a workdir, in one place (the pipeline, the report and pipeline.api).

Identity: a model's id is its readable name plus a short hash of everything that determines
its activations — architecture or factory, kwargs, weights (a checkpoint's content hash, a
torchvision weights name, or ``random(seed)``) and preprocessing — so two checkpoints of one
architecture, or one name reused for another model, never share a cache or a row set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import DEMO_WEIGHTS, Config, ModelOptions, SyntheticOptions
from stages.network.models import ModelSpec, weights_identity
from stages.network.perturb import Perturbation
from storage.artifacts import digest
from storage.tables import safe_name


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the readable `model` column
    model_id: str  # name-<hash>: keys stores and rows
    weights: str  # readable weights: checkpoint file name, torchvision name, random(seed=N)
    fingerprint: dict  # what the hash covers
    perturbation: str = "none"  # the input perturbation the activations were made under


def registered_weights(m: ModelOptions) -> str | None:
    """The registry name when model.weights names a registered checkpoint (Places365)."""
    from storage.registry import RELEASES

    entry = RELEASES.get(str(m.weights))
    return entry.name if entry is not None and entry.kind == "weights" else None


def model_spec(m: ModelOptions, weights: str | None = None, kwargs: dict | None = None) -> ModelSpec:
    """The stage-level model description (``weights``/``kwargs`` override, for the demo); a
    registered checkpoint's name becomes its file in the torch hub cache."""
    if weights is None and registered_weights(m):
        from stages.fetch import weights_cache_path

        weights = str(weights_cache_path(str(m.weights)))
    name = m.name or m.arch or str(m.factory).rsplit(":", 1)[-1]
    return ModelSpec(
        name=name, layers=tuple(m.layers), arch=m.arch, factory=m.factory,
        weights=m.weights if weights is None else weights, seed=m.seed,
        preprocess=str(m.preprocess), input_size=m.input_size,
        kwargs=dict(m.kwargs if kwargs is None else kwargs),
    )


def model_identity(spec: ModelSpec, perturbation: str = "none") -> ModelIdentity:
    """The model as it makes activations: with an input perturbation it is another identity
    (its own cache, its own rows), named in the ``perturbation`` column."""
    fingerprint = {
        "architecture": spec.arch or spec.factory,
        "kwargs": spec.kwargs,
        "weights": weights_identity(spec),
        "preprocess": spec.preprocess,
        **({"input_size": spec.input_size} if spec.input_size else {}),
        **({"perturbation": perturbation} if perturbation != "none" else {}),
    }
    w = spec.weights
    if w is None or str(w).lower() == "none":
        readable = f"random(seed={spec.seed})"
    elif fingerprint["weights"].startswith("sha256:"):
        readable = Path(str(w)).name
    else:
        readable = str(w)
    name = safe_name(spec.name)
    return ModelIdentity(name, f"{name}-{digest(fingerprint, 8)}", readable, fingerprint,
                         perturbation)


def dataset_id(cfg: Config) -> str:
    """The dataset's id in paths and tables: dataset.name, the directory's name, or
    ``synthetic`` (with a hash of its parameters when they are not the defaults)."""
    d = cfg.dataset
    if d.name:
        return safe_name(d.name)
    if d.release:
        return safe_name(d.release)
    if d.path:
        return safe_name(Path(d.path).expanduser().resolve().name)
    params = asdict(d.synthetic)
    return "synthetic" if params == asdict(SyntheticOptions()) else f"synthetic-{digest(params, 8)}"


def concept_set_id(cfg: Config) -> str:
    """The concept_set column of a run: concepts.name, concepts.path's directory name, or
    the probe dataset's own id."""
    c = cfg.concepts
    if c.path:
        return safe_name(c.name or Path(c.path).expanduser().resolve().name)
    return dataset_id(cfg)


def perturbation(cfg: Config) -> Perturbation:
    return Perturbation.parse(cfg.extract.perturb, cfg.extract.perturb_seed)


def moved_labels(cfg: Config) -> str:
    """The perturbation label planes go through: a geometric one, else none."""
    p = perturbation(cfg)
    return str(p) if p.geometric else "none"


def is_demo(m: ModelOptions) -> bool:
    return m.weights == DEMO_WEIGHTS


@dataclass(frozen=True)
class Layout:
    workdir: Path

    @staticmethod
    def of(cfg: Config) -> Layout:
        return Layout(Path(cfg.workdir).expanduser().resolve())

    @property
    def results(self) -> Path:
        return self.workdir / "results"

    @property
    def report(self) -> Path:
        return self.workdir / "report"

    def synthetic_dataset(self, dataset: str) -> Path:
        return self.workdir / "datasets" / dataset

    def data_dir(self, cfg: Config) -> Path:
        """Where fetched releases are unpacked: fetch.data_dir, else <workdir>/datasets."""
        d = cfg.fetch.data_dir
        return Path(d).expanduser().resolve() if d else self.workdir / "datasets"

    def dataset_root(self, cfg: Config) -> Path:
        """The probe dataset's directory: dataset.path, a fetched release, or the synthetic set."""
        d = cfg.dataset
        if d.path:
            return Path(d.path).expanduser().resolve()
        if d.release:
            return self.data_dir(cfg) / d.release
        return self.synthetic_dataset(dataset_id(cfg))

    def concept_store(self, dataset: str, moved: str = "none") -> Path:
        """A dataset's labels (``moved``: the geometric perturbation they went through)."""
        suffix = "" if moved == "none" else f"~{safe_name(moved)}"
        return self.workdir / "concepts" / f"{dataset}{suffix}.zarr"

    def concept_set_store(self, name: str, moved: str = "none") -> Path:
        suffix = "" if moved == "none" else f"~{safe_name(moved)}"
        return self.workdir / "concepts" / f"set-{name}{suffix}.zarr"

    def demo_checkpoint(self, dataset: str, key: str) -> Path:
        return self.workdir / "models" / f"demo-{dataset}-{key}.pt"

    def activations(self, dataset: str, model_id: str, dtype: str) -> Path:
        suffix = "" if dtype == "float32" else f"-{dtype}"
        return self.workdir / "activations" / dataset / f"{model_id}{suffix}.zarr"

    def statistic(self, kind: str, dataset: str, model_id: str, layer: str, key: str,
                  suffix: str) -> Path:
        """Per-layer statistics of a cache: thresholds, top images, signatures."""
        return self.workdir / kind / dataset / model_id / safe_name(layer) / f"{key}{suffix}"
