"""What a model is, without building it: its spec and the identity of its weights.

Kept apart from ``stages.network.models`` so that planning a run (which fingerprints the
model) never imports torch; building, loading and running models happen there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage.artifacts import file_digest
from storage.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a torchvision ``arch`` or a ``factory``, plus weights and layers."""

    name: str
    layers: tuple[str, ...]
    arch: str | None = None
    factory: str | None = None
    weights: str | None = None  # torchvision weights name, checkpoint path, or "none"
    seed: int = 0
    preprocess: str = "imagenet"
    input_size: int | None = None  # images resized to this square size; None = native
    kwargs: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ModelSpec:
        data = json.loads(text)
        data["layers"] = tuple(data["layers"])
        return ModelSpec(**data)


def is_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or Path(weights).suffix in (".pt", ".pth", ".tar", ".ckpt")


def weights_identity(spec: ModelSpec) -> str:
    """A stable identity of the weights: file hash, torchvision weights name, or random seed."""
    w = spec.weights
    if w is None or str(w).lower() == "none":
        return f"random(seed={spec.seed})"
    if is_path(str(w)):
        path = Path(w).expanduser()
        if not path.is_file():
            raise UserError(f"model.weights: checkpoint {path} not found")
        return "sha256:" + file_digest(path)
    return f"torchvision:{w}"
