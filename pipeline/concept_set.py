"""Stage ``concept_set``: the labels a run scores against (the dataset's own concept store,
or ``concepts.path``), checked against the cache and matched to its image rows — all from
the label directory's tables, so a run can be planned before any store is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data import DatasetInfo, concept_store_target
from pipeline.graph import Run, Target
from pipeline.identity import concept_set_id, moved_labels
from stages.tally.labels import LabelSpace, label_space
from storage.broden import BrodenDataset, ImageRecord, read_broden
from storage.concepts import store_artifact
from storage.errors import UserError

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class ConceptSet:
    """The labels a run scores against, matched to the cache's image rows."""

    name: str
    dataset: BrodenDataset  # the label directory's tables
    path: Path  # its concept store
    key: str  # the concept store's artifact key
    rows: np.ndarray | None  # activation row -> concept row (-1 = absent); None = same order
    categories: tuple[str, ...] | None  # scoring.categories

    @cached_property
    def space(self) -> LabelSpace:
        """The scored labels (SEMANTICS.md §3), as the concept store will hold them."""
        space = label_space(self.dataset.label_table, self.categories)
        if space.n_labels == 0:
            raise UserError(f"{self.path}: no labels to score in categories "
                            f"{list(self.categories or [])}")
        return space


def _source(run: Run) -> tuple[BrodenDataset, str, Path]:
    """The label directory's tables, the set's name and its concept store's path."""
    c = run.cfg.concepts
    if not c.path:
        ds: DatasetInfo = run.value("extract").dataset
        return ds.broden, ds.id, run.value("concepts")
    name = concept_set_id(run.cfg)
    root = Path(c.path).expanduser().resolve()
    return (read_broden(root), name,
            run.layout.concept_set_store(name, moved_labels(run.cfg)))


def _check_against_cache(root: Path, images: list[ImageRecord], cached: list[str],
                         size: list[int] | None, cache: Path) -> None:
    """A concept set's images (index.csv rows) are in the cache, at the size the
    activations were made from."""
    known = set(cached)
    missing = [r.image for r in images if r.image not in known]
    if missing:
        raise UserError(f"{root}: {len(missing)} concept-set image(s) are not in the activation "
                        f"cache {cache} (first: {', '.join(missing[:3])})")
    wrong = next((r for r in images if size and [r.ih, r.iw] != list(size)), None)
    if wrong is not None:
        raise UserError(f"{root / 'index.csv'} line {wrong.line}: image {wrong.image} is "
                        f"{wrong.ih}x{wrong.iw} but the cache was made from {size[0]}x{size[1]} "
                        "images; a concept set must label the same images")


def match_rows(cached: list[str], wanted: list[str]) -> np.ndarray | None:
    """Activation row -> concept row (-1 = not in the set); None when in identical order."""
    if cached == wanted:
        return None
    position = {path: i for i, path in enumerate(wanted)}
    return np.array([position.get(p, -1) for p in cached], dtype=np.int64)


def concept_set_value(run: Run) -> ConceptSet:
    def make() -> ConceptSet:
        acts = run.value("extract")
        dataset, name, path = _source(run)
        cached = [r.image for r in acts.dataset.broden.images]
        if run.cfg.concepts.path:
            _check_against_cache(dataset.root, dataset.images, cached,
                                 acts.fingerprint.get("image_size"), acts.path)
        rows = match_rows(cached, [r.image for r in dataset.images])
        if rows is not None:
            log.info("%s: %d of %d cached images are in concept set %s", run.cfg.stage,
                     int((rows >= 0).sum()), len(rows), name)
        key = store_artifact(path, dataset.fingerprint(), moved_labels(run.cfg)).key
        categories = run.cfg.scoring.categories
        return ConceptSet(name, dataset, path, key, rows,
                          None if categories is None else tuple(categories))

    return run.shared("concept_set", make)


def concept_set_targets(run: Run) -> list[Target]:
    if not run.cfg.concepts.path:
        return []
    cs = concept_set_value(run)
    return [concept_store_target(run, f"concept set {cs.name}", cs.dataset, cs.path)]
