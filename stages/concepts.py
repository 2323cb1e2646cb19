"""Stage ``concepts``: decode a Broden directory's label planes once into a concept store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from stages.engine.dask import map_blocks
from stages.network.perturb import Perturbation
from storage import concepts as cstore
from storage.artifacts import remove
from storage.broden import BrodenDataset, read_broden

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class ConceptsConfig:
    dataset_path: Path
    store_path: Path
    block_size: int = 64
    progress: bool = True
    perturbation: Perturbation = Perturbation()  # geometric ones move the label planes


def _write(cfg: ConceptsConfig, images_dir: Path, categories, listed, item) -> int:
    block, records = item
    hook = cfg.perturbation.planes if cfg.perturbation.geometric else None
    return cstore.write_block(cfg.store_path, images_dir, records, block, categories, listed,
                              hook)


def _readable(path: Path) -> bool:
    try:
        cstore.ConceptStore(path)
    except Exception:  # noqa: BLE001 - any damage to a derived store means: rebuild it
        return False
    return True


def build_concept_store(cfg: ConceptsConfig, scheduler: Any = "threads",
                        dataset: BrodenDataset | None = None) -> cstore.ConceptStore:
    """Build, resume or reuse the concept store of ``cfg.dataset_path``.

    A complete store made from the same CSVs is returned untouched; a partial one resumes at
    its first unwritten block (keeping its own block size); one made from other CSVs, or
    damaged, is rebuilt.  ``dataset``: the directory already read, if the caller has it.
    """
    dataset = dataset or read_broden(cfg.dataset_path)
    moved = cfg.perturbation.moved_labels
    artifact = cstore.store_artifact(cfg.store_path, dataset.fingerprint(), moved)
    state = artifact.state()
    if state in ("complete", "partial") and not _readable(cfg.store_path):
        log.info("concepts: %s is unreadable; rebuilding", cfg.store_path)
        state = "stale"
    if state == "complete":
        return cstore.ConceptStore(cfg.store_path)
    if state == "stale":
        log.info("concepts: %s was built from other label files; rebuilding", cfg.store_path)
    if state == "partial":
        log.info("concepts: resuming %s", cfg.store_path)
    else:
        artifact.forget()
        remove(cfg.store_path)
        cfg.store_path.parent.mkdir(parents=True, exist_ok=True)
        cstore.create_store(cfg.store_path, dataset, cfg.block_size, moved)
    block_size = cstore.ConceptStore(cfg.store_path).block_size
    todo = cstore.missing_blocks(cfg.store_path)
    listed = cstore.listed_labels(dataset)
    items = [(b, dataset.images[b * block_size : (b + 1) * block_size]) for b in todo]
    map_blocks(
        partial(_write, cfg, dataset.images_dir, dataset.all_categories, listed),
        items, scheduler=scheduler, desc="concepts", progress=cfg.progress,
    )
    artifact.commit(images=len(dataset.images))
    log.info(
        "concepts: built %s (%d images, %d blocks)", cfg.store_path, len(dataset.images), len(todo)
    )
    return cstore.ConceptStore(cfg.store_path)
