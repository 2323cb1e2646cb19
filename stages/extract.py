"""Stage ``extract``: run the model once over the images and cache the requested layers.

Each layer of a store is its own artifact: a request for layers that are not cached yet runs
one forward pass that captures and writes only those layers, never rewriting a chunk of a
cached one.  Image blocks are Dask tasks (one writer per chunk); inside a task a thread
decodes the next mini-batch while the model runs on the current one.  A killed run resumes,
per layer, at the blocks whose markers are unset, and ends equal to an uninterrupted run.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.engine.dask import map_blocks
from stages.network.models import (
    build_model,
    cached_model,
    pick_device,
    preprocess,
    record_layers,
)
from stages.network.perturb import Perturbation
from stages.network.spec import ModelSpec
from storage import activations as astore
from storage.blocks import missing_blocks
from storage.broden import ImageRecord
from storage.broden_images import dataset_file, load_image
from storage.errors import UserError

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class ExtractConfig:
    images_dir: Path
    store_path: Path
    model: ModelSpec
    fingerprint: dict  # what the activations depend on: model identity, dataset index, ...
    dtype: str = "float32"
    block_size: int = 64
    batch_size: int = 32
    device: str = "auto"
    progress: bool = True
    perturbation: Perturbation = Perturbation()  # applied to the images before the model


def forward_layers(
    model: torch.nn.Module, layers: tuple[str, ...], images: np.ndarray, mode: str, device: str,
    size: int | None = None,
) -> dict[str, np.ndarray]:
    """One forward pass; every layer's output as float32 numpy (B, C, h, w)."""
    with torch.inference_mode(), record_layers(model, layers) as outputs:
        model(preprocess(images, mode, device, size))
        return {name: outputs[name].float().cpu().numpy() for name in layers}


def _decode(images_dir: Path, records: list[ImageRecord],
            perturbation: Perturbation | None = None) -> np.ndarray:
    images = np.stack([load_image(dataset_file(images_dir, r.image, r.line), r.line)
                       for r in records])
    if perturbation is None or perturbation.kind == "none":
        return images
    return perturbation.images(images, np.array([r.row for r in records]))


def extract_block(cfg: ExtractConfig, item: tuple[int, list[ImageRecord], tuple[str, ...]]) -> int:
    """Compute and write one image block of the layers that still need it (a Dask task)."""
    block, records, layers = item
    device = pick_device(cfg.device)
    model, lock = cached_model(cfg.model.to_json(), device)
    batches = [records[i : i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode, cfg.images_dir, batches[0], cfg.perturbation)
        for i in range(len(batches)):
            images = pending.result()
            if i + 1 < len(batches):  # decode the next batch while this one runs
                pending = pool.submit(_decode, cfg.images_dir, batches[i + 1], cfg.perturbation)
            with lock:
                outputs = forward_layers(model, layers, images, cfg.model.preprocess, device,
                                         cfg.model.input_size)
            for name, values in outputs.items():
                parts[name].append(values)
    outputs = {name: np.concatenate(v) for name, v in parts.items()}
    for name, values in outputs.items():
        if not np.isfinite(values).all():
            bad = int(np.argwhere(~np.isfinite(values))[0][1])
            raise UserError(
                f"model {cfg.model.name!r} layer {name!r} unit {bad}: NaN or infinite activation "
                f"on {records[0].image} .. {records[-1].image}"
            )
    astore.write_block(cfg.store_path, block, records[0].row, outputs)
    return len(records)


def layer_shapes(cfg: ExtractConfig, sample: ImageRecord, layers: tuple[str, ...]
                 ) -> dict[str, tuple[int, int, int]]:
    """Probe the model on one image to learn each layer's (units, h, w)."""
    model = build_model(cfg.model)
    out = forward_layers(model, layers, _decode(cfg.images_dir, [sample], cfg.perturbation),
                         cfg.model.preprocess, "cpu", cfg.model.input_size)
    return {name: tuple(int(s) for s in v.shape[1:]) for name, v in out.items()}


def missing_layers(cfg: ExtractConfig) -> list[str]:
    """Requested layers whose cache is not complete, in request order."""
    return [layer for layer in cfg.model.layers
            if not astore.layer_artifact(cfg.store_path, cfg.fingerprint, layer).is_current()]


def run_extract(cfg: ExtractConfig, records: list[ImageRecord], scheduler: Any = "threads") -> list[str]:
    """Create or resume the missing layers of the store at ``cfg.store_path``; returns them.

    A store made from other inputs must not reach this point (the caller words that error);
    layers already complete are left alone, chunk for chunk.
    """
    if not records:
        raise UserError("extract: the dataset has no images")
    todo = missing_layers(cfg)
    if not todo:
        return []
    store = astore.store_artifact(cfg.store_path, cfg.fingerprint)
    # the group's metadata is shared by every layer: changed under the store's own lock, so
    # concurrent runs adding different layers never lose one another's
    with store.locked():
        if not store.is_current():
            astore.create_group(cfg.store_path, [r.image for r in records], cfg.block_size,
                                cfg.fingerprint, str(cfg.images_dir.parent))
        fresh = tuple(layer for layer in todo if astore.layer_artifact(
            cfg.store_path, cfg.fingerprint, layer).state() != "partial")
        if fresh:
            shapes = layer_shapes(cfg, records[0], fresh)
            for layer, shape in shapes.items():
                astore.add_layer(cfg.store_path, layer, shape, cfg.dtype)
            log.info("extract: %s -> %s", ", ".join(f"{k} {v}" for k, v in shapes.items()),
                     cfg.store_path)
    resumed = [layer for layer in todo if layer not in fresh]
    if resumed:
        log.info("extract: resuming %s in %s", ", ".join(resumed), cfg.store_path)
    needs: dict[int, list[str]] = {}
    for layer in todo:
        for block in missing_blocks(cfg.store_path, layer):
            needs.setdefault(block, []).append(layer)
    size = astore.ActivationStore(cfg.store_path).block_size  # a resumed store keeps its own
    items = [(b, records[b * size : (b + 1) * size], tuple(layers))
             for b, layers in sorted(needs.items())]
    map_blocks(
        partial(extract_block, cfg), items, scheduler=scheduler, desc="extract",
        progress=cfg.progress, unit_scale=size,
    )
    with store.locked():
        astore.mark_complete(cfg.store_path, todo)
    return todo
