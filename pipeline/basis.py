"""Stage ``basis``: the transform each scored layer goes through before thresholds and IoU
(SEMANTICS.md §7) — a (W, b) per layer saved once as an artifact, applied block by block by
every pass that reads the layer; the transformed layer is never written to disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import TransformKind, TransformOptions
from pipeline.data import Activations
from pipeline.graph import Run, Target
from pipeline.layout import Layout
from storage.artifacts import Artifact, digest, file_digest, scratch_path

if TYPE_CHECKING:  # torch loads when a basis is built or applied, not to plan
    from stages.bases.transforms import LinearMap

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class Basis:
    """One layer's transform: its readable name (the ``transform`` column) and (W, b)."""

    text: str
    artifact: Artifact | None = None  # None: no transform
    activation: str = "none"

    def map(self) -> LinearMap | None:
        if self.artifact is None:
            return None
        from stages.bases.transforms import LinearMap  # torch: only where there is a transform

        return LinearMap(str(self.artifact.path), self.activation)


def transform_text(t: TransformOptions) -> str:
    """``none``, ``rotate(alpha=0.5,seed=0)``, ``pca(whiten=false)`` or
    ``linear(file=sae.pt,sha=1a2b3c4d,activation=relu)``."""
    if t.kind == TransformKind.rotate:
        return f"rotate(alpha={t.alpha:g},seed={t.seed})"
    if t.kind == TransformKind.pca:
        return f"pca(whiten={str(t.whiten).lower()})"
    if t.kind == TransformKind.linear:
        path = Path(str(t.path)).expanduser()
        return f"linear(file={path.name},sha={file_digest(path)[:8]},activation={t.activation})"
    return "none"


def basis_artifact(layout: Layout, dataset: str, model_id: str, layer: str, layer_key: str,
                   text: str, activation: str) -> Artifact:
    """Where a layer's (W, b) for a transform lives; the report finds it from the same keys."""
    fingerprint = {"activations": layer_key, "transform": text, "activation": activation}
    return Artifact(layout.statistic("bases", dataset, model_id, layer, digest(fingerprint),
                                     ".npz"), fingerprint)


def _layer_basis(run: Run, acts: Activations, layer: str) -> Basis:
    t = run.cfg.transform
    text = transform_text(t)
    if t.kind == TransformKind.none:
        return Basis(text)
    activation = t.activation if t.kind == TransformKind.linear else "none"
    return Basis(text, basis_artifact(run.layout, acts.dataset.id, acts.model.identity.model_id,
                                      layer, acts.layer_key(layer), text, activation), activation)


def basis_targets(run: Run) -> list[Target]:
    acts = run.value("extract")
    t = run.cfg.transform
    targets = []
    for layer, basis in basis_value(run).items():
        if basis.artifact is None:
            continue

        def build(missing: list[Artifact], layer=layer, basis=basis) -> None:
            from stages.bases.transforms import load_linear
            from stages.basis import pca_of_layer, rotation_basis
            from stages.engine.blocks import LayerBlocks
            from storage.arrays import save_arrays

            units = acts.store.shape(layer)[1]
            if t.kind == TransformKind.rotate:
                weight, bias = rotation_basis(units, t.alpha, t.seed)
            elif t.kind == TransformKind.pca:
                blocks = LayerBlocks(str(acts.path), layer, None, run.cfg.extract.device)
                weight, bias = pca_of_layer(blocks, t.whiten, run.scheduler(), run.cfg.progress,
                                            scratch_path(missing))
            else:
                weight, bias = load_linear(Path(str(t.path)).expanduser(), units)
            save_arrays(missing[0], {"weight": weight, "bias": bias})
            log.info("basis: %s %s: %s, %d -> %d units", acts.model.identity.model_id, layer,
                     basis.text, weight.shape[1], weight.shape[0])

        targets.append(Target(f"{acts.model.identity.model_id} {layer} {basis.text} basis",
                              (basis.artifact,), build))
    return targets


def basis_value(run: Run) -> dict[str, Basis]:
    acts = run.value("extract")
    return {layer: _layer_basis(run, acts, layer) for layer in acts.layers}
