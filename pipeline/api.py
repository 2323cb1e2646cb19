"""Python API for notebooks: the same runs as the command line, returning DataFrames."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.identity import concept_set_id, dataset_id
from pipeline.layout import Layout
from pipeline.run import compose_config, run
from storage.tables import read_table


def rescore(
    workdir: str | Path,
    concepts: str | Path | None = None,
    formulas: str | Path | None = None,
    name: str | None = None,
    dataset: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """Score cached activations against a concept set and/or formula concepts.

    The model is never loaded: thresholds and masks come from the activation cache in
    ``workdir``.  ``concepts`` is a Broden-format directory (default: the probe dataset's own
    labels); ``formulas`` a YAML file mapping names to formulas such as
    ``"(water OR sea) AND NOT boat"``.  ``dataset`` is the probe dataset the cache was made
    from (default: the built-in synthetic set), ``overrides`` any other Hydra overrides
    (``["model=resnet18", "scoring.union=global"]``).  Returns the ``iou`` rows of that
    concept set and model identity.

    >>> frame = rescore("workdir", concepts="/data/my_labels")           # doctest: +SKIP
    >>> frame.sort_values("iou", ascending=False).head()                 # doctest: +SKIP
    """
    args = [f"workdir={Path(workdir).resolve()}", "stage=rescore", "cluster=none", *overrides]
    if concepts is not None:
        args.append(f"concepts.path={Path(concepts).resolve()}")
    if name is not None:
        args.append(f"concepts.name={name}")
    if formulas is not None:
        args.append(f"concepts.formulas={Path(formulas).resolve()}")
    if dataset is not None:
        args.append(f"dataset.path={Path(dataset).resolve()}")
    cfg = compose_config(args)
    summaries = run(cfg)  # per layer, this run's `layers` rows
    model_id = next(iter(summaries.values()))["model_id"].iloc[0]
    return read_table(Layout.of(cfg).results, "iou", model_id=model_id,
                      concept_set=concept_set_id(cfg), dataset=dataset_id(cfg))
