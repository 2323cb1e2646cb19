"""Result tables: hive-partitioned Parquet datasets with atomic, keyed replacement.

Layout ``<workdir>/results/<table>/model=<model>/layer=<layer>/<run-key>.parquet``, with each
file's manifest and lock under ``<workdir>/results/.artifacts/`` (the same sub-path).  The
partition columns ``model`` and ``layer`` live in the directory names only (pandas, duckdb,
polars and pyarrow add them back with hive partitioning).  ``run-key`` is a hash of every
parameter column that distinguishes a run (model identity, concept set, threshold quantile,
union mode, planes, categories, basis), so re-running with other options adds a file and re-running
with the same options replaces exactly that file.  Each file is an artifact
(``storage.artifacts``): written under a hidden name and renamed into place, so a reader sees
the old table or the new one, never half, with a hidden manifest saying what made it.

Column contract (SEMANTICS.md): keys ``model, model_id, weights, layer, unit, concept_set,
label, concept, category``; parameters ``threshold_quantile, union_mode, planes, basis``; counts ``intersection,
label_area, unit_area, union_area`` (int64); ``iou``; units also ``threshold, is_detector``;
units and layers the evidence columns of §8 in every file (null where not computed), so a
dataset's schema is the same whichever file a reader takes it from.
No column is named ``union`` (an SQL keyword) or like a ``pandas.DataFrame`` attribute
(``frame.quantile`` is a method, not a column).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from storage.artifacts import Artifact, atomic_file, digest

if TYPE_CHECKING:  # pandas and pyarrow load when a table is read or written, not to plan
    import pandas as pd
    import pyarrow as pa

PARTITIONS = ("model", "layer")


def safe_name(text: str) -> str:
    """A path-safe id (dataset, model, concept set): letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "unnamed"


def partition_dir(root: Path, table: str, model: str, layer: str) -> Path:
    return root / table / f"model={model}" / f"layer={layer}"


def with_row_keys(frame: pd.DataFrame, keys: dict) -> pd.DataFrame:
    """``frame`` with the key and parameter columns ``keys`` in front (one value each)."""
    for position, (key, value) in enumerate(keys.items()):
        frame.insert(position, key, value)
    return frame


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write Parquet atomically (hidden temporary name, then rename over ``path``)."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def records_dir(root: Path, table: str) -> Path:
    """Where the manifests and locks of a table's files live: outside the table's folder, so
    every Parquet reader (polars too) opens the folder as a dataset."""
    return root / ".artifacts" / table


def partition_artifact(
    root: Path, table: str, model: str, layer: str, params: dict, fingerprint: dict
) -> Artifact:
    """The file holding one (model, layer, parameter set)'s rows of ``table``."""
    path = partition_dir(root, table, model, layer) / f"{digest(params)}.parquet"
    return Artifact(path, {"table": table, "params": params, **fingerprint},
                    records=partition_dir(records_dir(root, table).parent, table, model, layer))


def recorded_file(root: Path, path: Path) -> Artifact:
    """The artifact of a table file already on disk (its fingerprint unread)."""
    relative = Path(path).relative_to(root)
    return Artifact(Path(path), {}, records=records_dir(root, relative.parts[0]).parent
                    / relative.parent)


def write_partition(artifact: Artifact, frame: pd.DataFrame) -> Path:
    """Add or replace the rows of one (model, layer, parameter set), then mark them current."""
    import pyarrow as pa

    frame = frame.drop(columns=[c for c in PARTITIONS if c in frame.columns])
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), artifact.path)
    artifact.commit(rows=len(frame))
    return artifact.path


def read_table(root: Path, table: str, **filters) -> pd.DataFrame:
    """Read a result table into pandas, keeping only rows equal to ``filters`` (pushed down
    to pyarrow, so other models' and layers' files are not read)."""
    import pandas as pd

    path = root / table
    if not path.exists():
        return pd.DataFrame()
    pushed = [(key, "=", value) for key, value in filters.items()]
    frame = pd.read_parquet(path, filters=pushed or None)
    for col in PARTITIONS:
        if col in frame.columns:
            frame[col] = frame[col].astype(str)
    return frame.reset_index(drop=True)
