"""Stage ``concept_set``: the labels a run scores against (the dataset's own concept store,
or ``concepts.path``), checked against the cache and matched to its image rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import concept_store_target
from pipeline.graph import Run, Target
from pipeline.layout import concept_set_id, moved_labels
from stages.tally.labels import LabelSpace, label_space
from storage.broden import read_broden
from storage.concepts import ConceptStore, store_artifact
from storage.errors import UserError

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class ConceptSet:
    """The labels a run scores against, matched to the cache's image rows."""

    name: str
    store: ConceptStore
    key: str  # the concept store's artifact key
    rows: np.ndarray | None  # activation row -> concept row (-1 = absent); None = same order


def _set_source(run: Run) -> tuple[Path, str, Path] | None:
    c = run.cfg.concepts
    if not c.path:
        return None
    name = concept_set_id(run.cfg)
    return (Path(c.path).expanduser().resolve(), name,
            run.layout.concept_set_store(name, moved_labels(run.cfg)))


def _check_set_against_cache(run: Run, root: Path, images: list) -> None:
    """Before a concept set's labels are decoded: its images (index.csv rows) are in the
    cache, at the size the activations were made from."""
    acts = run.get("extract")
    cached = set(acts.store.image_paths())
    missing = [r.image for r in images if r.image not in cached]
    if missing:
        raise UserError(f"{root}: {len(missing)} concept-set image(s) are not in the activation "
                        f"cache {acts.store.path} (first: {', '.join(missing[:3])})")
    size = acts.fingerprint.get("image_size")
    wrong = next((r for r in images if size and [r.ih, r.iw] != list(size)), None)
    if wrong is not None:
        raise UserError(f"{root / 'index.csv'} line {wrong.line}: image {wrong.image} is "
                        f"{wrong.ih}x{wrong.iw} but the cache was made from {size[0]}x{size[1]} "
                        "images; a concept set must label the same images")


def plan_concept_set(run: Run) -> list[Target]:
    source = _set_source(run)
    if source is None:
        return []
    root, name, path = source
    dataset = read_broden(root)
    _check_set_against_cache(run, root, dataset.images)
    return [concept_store_target(run, f"concept set {name}", dataset, path)]


def match_rows(cached: list[str], concepts: ConceptStore) -> np.ndarray | None:
    """Activation row -> concept row (-1 = not in the set); None when in identical order.
    (That every concept-set image is cached was checked when the set was planned.)"""
    wanted = concepts.image_paths()
    if cached == wanted:
        return None
    position = {path: i for i, path in enumerate(wanted)}
    return np.array([position.get(p, -1) for p in cached], dtype=np.int64)


def concept_set_value(run: Run) -> ConceptSet:
    acts = run.get("extract")
    source = _set_source(run)
    if source is None:
        store, name = run.get("concepts"), acts.dataset.id
    else:
        store, name = ConceptStore(source[2]), source[1]
    rows = match_rows(acts.store.image_paths(), store)
    if rows is not None:
        log.info("%s: %d of %d cached images are in concept set %s", run.cfg.stage,
                 int((rows >= 0).sum()), len(rows), name)
    return ConceptSet(name, store,
                      store_artifact(store.path, store.fingerprint, store.perturbation).key, rows)


def label_space_of(run: Run, cs: ConceptSet) -> LabelSpace:
    space = label_space(cs.store, run.cfg.scoring.categories)
    if space.n_labels == 0:
        raise UserError(f"{cs.store.path}: no labels to score in categories "
                        f"{run.cfg.scoring.categories}")
    return space
