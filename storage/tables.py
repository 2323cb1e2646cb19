"""Result tables: hive-partitioned Parquet datasets with atomic, keyed replacement.

Layout ``<workdir>/results/<table>/model=<model>/layer=<layer>/<run-key>.parquet``.  The
partition columns ``model`` and ``layer`` live in the directory names only (pandas, duckdb,
polars and pyarrow add them back with hive partitioning).  ``run-key`` is a hash of every
parameter column that distinguishes a run (concept set, quantile, union mode, planes,
categories, transform), so re-running with other options adds a file and re-running with
the same options replaces exactly that file.  Files are written under a dot-name in the same
directory and renamed into place, so a reader sees the old table or the new one, never half.

Column contract (SEMANTICS.md): keys ``model, layer, unit, concept_set, label, concept,
category``; parameters ``quantile, union_mode, planes, transform``; counts ``intersection,
label_area, unit_area, union_area`` (int64); ``iou``; units also ``threshold, is_detector``.
No column is named ``union`` (it is an SQL keyword).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("iou", "units", "layers", "explanations")
PARTITIONS = ("model", "layer")


def safe_name(text: str) -> str:
    """A path-safe id (dataset, model, concept set): letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "unnamed"


def run_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partition_dir(root: Path, table: str, model: str, layer: str) -> Path:
    return root / table / f"model={model}" / f"layer={layer}"


def write_atomic(table: pa.Table, path: Path, metadata: dict | None = None) -> None:
    """Write Parquet beside ``path`` under a hidden name, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        existing = table.schema.metadata or {}
        table = table.replace_schema_metadata(
            {**existing, **{k.encode(): json.dumps(v).encode() for k, v in metadata.items()}}
        )
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_partition(
    root: Path, table: str, model: str, layer: str, frame: pd.DataFrame, params: dict
) -> Path:
    """Add or replace the rows of one (model, layer, parameter set)."""
    frame = frame.drop(columns=[c for c in PARTITIONS if c in frame.columns])
    path = partition_dir(root, table, model, layer) / f"{run_key(params)}.parquet"
    write_atomic(pa.Table.from_pandas(frame, preserve_index=False), path, {"params": params})
    return path


def read_table(root: Path, table: str, **filters) -> pd.DataFrame:
    """Read a result table into pandas, keeping only rows equal to ``filters`` (pushed down
    to pyarrow, so other models' and layers' files are not read)."""
    path = root / table
    if not path.exists():
        return pd.DataFrame()
    pushed = [(key, "=", value) for key, value in filters.items()]
    frame = pd.read_parquet(path, filters=pushed or None)
    for col in PARTITIONS:
        if col in frame.columns:
            frame[col] = frame[col].astype(str)
    return frame.reset_index(drop=True)


def read_metadata(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): json.loads(v) for k, v in meta.items() if k not in (b"pandas", b"ARROW:schema")}
