"""Stage ``extract``: run the model once and cache every requested layer in Zarr.

Image blocks are Dask tasks (one writer per chunk); inside a task a thread decodes the next
mini-batch while the model runs on the current one.  A killed run resumes at the first block
whose ``blocks_done`` marker is unset, and gives the same store as an uninterrupted run.
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

from stages.models import (
    ModelSpec,
    build_model,
    cached_model,
    pick_device,
    preprocess,
    record_layers,
    weights_identity,
)
from stages.reduction import map_blocks
from storage import activations as astore
from storage.broden import ImageRecord, load_image
from storage.errors import UserError

log = logging.getLogger("netdissect")
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExtractConfig:
    images_dir: Path
    store_path: Path
    model: ModelSpec
    dataset_fingerprint: str  # hash of index.csv
    dtype: str = "float32"
    block_size: int = 64
    batch_size: int = 32
    device: str = "auto"
    progress: bool = True


def extract_fingerprint(cfg: ExtractConfig, image_size: tuple[int, int]) -> dict:
    return {
        "model": cfg.model.name,
        "arch": cfg.model.arch or cfg.model.factory,
        "weights": weights_identity(cfg.model),
        "layers": list(cfg.model.layers),
        "preprocess": cfg.model.preprocess,
        "dataset_index": cfg.dataset_fingerprint,
        "dtype": cfg.dtype,
        "image_size": list(image_size),
    }


def forward_layers(
    model: torch.nn.Module, layers: tuple[str, ...], images: np.ndarray, mode: str, device: str
) -> dict[str, np.ndarray]:
    """One forward pass; every layer's output as float32 numpy (B, C, h, w)."""
    with torch.inference_mode(), record_layers(model, layers) as outputs:
        model(preprocess(images, mode, device))
        return {name: outputs[name].float().cpu().numpy() for name in layers}


def _decode(images_dir: Path, records: list[ImageRecord]) -> np.ndarray:
    return np.stack([load_image(images_dir / r.image, r.line) for r in records])


def extract_block(cfg: ExtractConfig, item: tuple[int, list[ImageRecord]]) -> int:
    """Compute and write one image block (a Dask task)."""
    block, records = item
    device = pick_device(cfg.device)
    model, lock = cached_model(cfg.model.to_json(), device)
    batches = [records[i : i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in cfg.model.layers}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode, cfg.images_dir, batches[0])
        for i in range(len(batches)):
            images = pending.result()
            if i + 1 < len(batches):  # decode the next batch while this one runs
                pending = pool.submit(_decode, cfg.images_dir, batches[i + 1])
            with lock:
                outputs = forward_layers(model, cfg.model.layers, images, cfg.model.preprocess, device)
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


def layer_shapes(cfg: ExtractConfig, sample: ImageRecord) -> dict[str, tuple[int, int, int]]:
    """Probe the model on one image to learn each layer's (units, h, w)."""
    model = build_model(cfg.model)
    out = forward_layers(
        model, cfg.model.layers, _decode(cfg.images_dir, [sample]), cfg.model.preprocess, "cpu"
    )
    return {name: tuple(int(s) for s in v.shape[1:]) for name, v in out.items()}


def run_extract(cfg: ExtractConfig, records: list[ImageRecord], scheduler: Any = "threads") -> Path:
    """Create, resume or reuse the activation store at ``cfg.store_path``."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"extract.dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if not records:
        raise UserError("extract: the dataset has no images")
    fingerprint = extract_fingerprint(cfg, (records[0].ih, records[0].iw))
    state = astore.store_state(cfg.store_path, fingerprint)
    if state == "complete":
        log.info("extract: skipped, %s is current", cfg.store_path)
        return cfg.store_path
    if state == "missing":
        shapes = layer_shapes(cfg, records[0])
        astore.create_store(
            cfg.store_path, [r.image for r in records], shapes, cfg.block_size, cfg.dtype, fingerprint
        )
        log.info("extract: %s -> %s", ", ".join(f"{k} {v}" for k, v in shapes.items()), cfg.store_path)
    else:
        log.info("extract: resuming %s", cfg.store_path)
    block_size = astore.stored_block_size(cfg.store_path)  # a resumed store keeps its own
    todo = astore.missing_blocks(cfg.store_path)
    items = [(b, records[b * block_size : (b + 1) * block_size]) for b in todo]
    map_blocks(
        partial(extract_block, cfg), items, scheduler=scheduler, desc="extract",
        progress=cfg.progress, unit_scale=block_size,
    )
    astore.mark_complete(cfg.store_path)
    return cfg.store_path
