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


ROTATION_KEYS = ("model", "model_id", "weights", "layer", "perturbation", "dataset",
                 "concept_set", "threshold_quantile", "union_mode", "planes", "categories",
                 "iou_threshold", "category")


def rotation_summary(workdir: str | Path) -> pd.DataFrame:
    """The axis-alignment experiment (§3.2 of the paper) over random bases: per layer,
    category and rotation fraction α, the mean and standard deviation over the rotation
    seeds of detectors and unique detectors (from a ``-m transform=rotate
    transform.alpha=… transform.seed=0,1,…`` sweep; α = 0 is the identity).

    >>> rotation_summary("workdir").query("category == 'all'")           # doctest: +SKIP
    """
    layers = read_table(Path(workdir).expanduser() / "results", "layers")
    if layers.empty:
        return pd.DataFrame()
    rotated = layers[layers["basis"].str.startswith("rotate(")].copy()
    found = rotated["basis"].str.extract(r"alpha=([-+0-9.eE]+),seed=(\d+)")
    rotated["alpha"], rotated["seed"] = found[0].astype(float), found[1].astype(int)
    keys = [k for k in ROTATION_KEYS if k in rotated.columns] + ["alpha"]
    summary = rotated.groupby(keys, dropna=False).agg(
        detectors_mean=("detectors", "mean"), detectors_std=("detectors", "std"),
        unique_concepts_mean=("unique_concepts", "mean"),
        unique_concepts_std=("unique_concepts", "std"), seeds=("seed", "nunique"))
    return summary.reset_index()
