"""Threshold store: per-unit T_k of one layer as a small Parquet file with its fingerprint.

``<workdir>/thresholds/<dataset-id>/<model-id>/<layer>/<key>.parquet`` with columns
``unit, threshold`` (float64) and schema metadata ``fingerprint`` (the activation store's
fingerprint plus quantile and transform).  A file whose fingerprint matches is current.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.tables import read_metadata, run_key, write_atomic


def threshold_path(root: Path, layer: str, fingerprint: dict) -> Path:
    return root / layer / f"{run_key(fingerprint)}.parquet"


def load_thresholds(path: Path, fingerprint: dict) -> np.ndarray | None:
    """The stored thresholds if the file exists and was made from the same inputs."""
    if not path.is_file():
        return None
    if read_metadata(path).get("fingerprint") != fingerprint:
        return None
    return pq.read_table(path).column("threshold").to_numpy()


def save_thresholds(path: Path, thresholds: np.ndarray, fingerprint: dict) -> None:
    table = pa.table(
        {"unit": np.arange(len(thresholds)), "threshold": np.asarray(thresholds, np.float64)}
    )
    write_atomic(table, path, {"fingerprint": fingerprint})
