"""Stage ``concepts``: decode a Broden directory's label planes once into a concept store."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from stages.reduction import map_blocks
from storage import concepts as cstore
from storage.broden import read_broden

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class ConceptsConfig:
    dataset_path: Path
    store_path: Path
    block_size: int = 64
    progress: bool = True


def _write(store_path: Path, images_dir: Path, categories, listed, item) -> int:
    block, records = item
    return cstore.write_block(store_path, images_dir, records, block, categories, listed)


def build_concept_store(cfg: ConceptsConfig, scheduler: Any = "threads") -> cstore.ConceptStore:
    """Build (or resume, or reuse) the concept store of ``cfg.dataset_path``.

    A finished store with the dataset's fingerprint is reused untouched; a partial one
    resumes at its first unwritten block; one made from other CSVs is rebuilt.
    """
    dataset = read_broden(cfg.dataset_path)
    fingerprint = dataset.fingerprint()
    state = cstore.store_state(cfg.store_path, fingerprint)
    if state == "complete":
        log.info("concepts: skipped, %s is current (fingerprint %s)", cfg.store_path, fingerprint[:12])
        return cstore.ConceptStore(cfg.store_path)
    if state == "stale":
        log.info("concepts: %s was built from other label files; rebuilding", cfg.store_path)
        shutil.rmtree(cfg.store_path)
    if state in ("stale", "missing"):
        cfg.store_path.parent.mkdir(parents=True, exist_ok=True)
        cstore.create_store(cfg.store_path, dataset, cfg.block_size)
    else:
        log.info("concepts: resuming %s", cfg.store_path)
    # The block size of an existing partial store wins, so its chunks stay aligned.
    block_size = int(cstore.ConceptStore(cfg.store_path).block_size)
    todo = cstore.missing_blocks(cfg.store_path)
    listed = cstore.listed_labels(dataset)
    items = [(b, dataset.images[b * block_size : (b + 1) * block_size]) for b in todo]
    map_blocks(
        partial(_write, cfg.store_path, dataset.images_dir, dataset.all_categories, listed),
        items,
        scheduler=scheduler,
        desc="concepts",
        progress=cfg.progress,
    )
    cstore.mark_complete(cfg.store_path)
    log.info(
        "concepts: built %s (%d images, %d blocks)", cfg.store_path, len(dataset.images), len(todo)
    )
    return cstore.ConceptStore(cfg.store_path)
