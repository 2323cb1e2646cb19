"""Small artifact files of named arrays: a statistic's result or a running partial as one
``.npz`` (top images, signatures, bases, checkpoints), and a layer's thresholds as a
``unit, threshold`` (float64) Parquet table.

Paths come from the pipeline's layout; currency, locks and atomic writes from
``storage.artifacts``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import Artifact, atomic_file
from storage.tables import write_parquet


def load_thresholds(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path).column("threshold").to_numpy())


def save_thresholds(artifact: Artifact, thresholds: np.ndarray) -> None:
    table = pa.table(
        {"unit": np.arange(len(thresholds)), "threshold": np.asarray(thresholds, np.float64)}
    )
    write_parquet(table, artifact.path)
    artifact.commit(units=len(thresholds))


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays as one .npz file, written atomically."""
    with atomic_file(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def save_arrays(artifact: Artifact, arrays: dict[str, np.ndarray]) -> None:
    """A statistic's arrays as one .npz artifact (top images, signature counts)."""
    write_arrays(artifact.path, arrays)
    artifact.commit()


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
