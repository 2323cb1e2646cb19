"""What a run's inputs are called: dataset, concept set and model identities, and the
input perturbation (every id that keys stores, paths and rows).

A model's id is its readable name plus a short hash of everything that determines its
activations — architecture or factory, kwargs, weights (a checkpoint's content hash, a
torchvision weights name, or ``random(seed)``) and preprocessing — so two checkpoints of one
architecture, or one name reused for another model, never share a cache or a row set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import DEMO_WEIGHTS, Config, ModelOptions, SyntheticOptions
from stages.network.perturb import Perturbation
from stages.network.spec import ModelSpec, weights_identity
from storage.artifacts import digest
from storage.tables import safe_name


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the readable `model` column
    model_id: str  # name-<hash>: keys stores and rows
    weights: str  # readable weights: file name#content hash, torchvision name, random(seed=N)
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
        # two checkpoints can share a file name (run1/A.pt, run2/A.pt): the content tells
        readable = f"{Path(str(w)).name}#{fingerprint['weights'].removeprefix('sha256:')[:8]}"
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
    return perturbation(cfg).moved_labels


def is_demo(m: ModelOptions) -> bool:
    return m.weights == DEMO_WEIGHTS
