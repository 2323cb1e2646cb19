"""Python API for notebooks: the same runs as the command line, returning DataFrames."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.graph import safe_name
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
    concept set.

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
    run(cfg)
    if concepts is not None:
        concept_set = safe_name(name or Path(concepts).resolve().name)
    elif cfg["dataset"].get("name"):
        concept_set = safe_name(cfg["dataset"]["name"])
    else:
        concept_set = safe_name(Path(dataset).resolve().name) if dataset else "synthetic"
    model = safe_name(str(cfg["model"]["name"]))
    return read_table(Path(workdir).resolve() / "results", "iou", model=model,
                      concept_set=concept_set)
