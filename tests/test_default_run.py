"""The built-in default (synthetic dataset + demo model) finds real detectors, a second
``stage=all`` finds everything current (every stage says so and no file is rewritten), and
every query of the README returns rows on it as written."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

from pipeline.run import compose_config, run
from storage.tables import read_table
from tests.broden_factory import run_files
from tests.conftest import REPO, cli_env

TABLES = ("iou", "units", "layers", "explanations")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The README's main job (without progress bars), then stage=explain for its table."""
    workdir = tmp_path_factory.mktemp("default") / "workdir"
    run(compose_config([f"workdir={workdir}", "stage=all", "progress=false"]))
    return workdir


def test_default_run_finds_detectors_and_a_second_run_does_nothing(default_run, caplog):
    tmp_path = default_run
    args = [f"workdir={tmp_path}", "stage=all", "progress=false"]
    units = read_table(tmp_path / "results", "units", model="demo", layer="block4")
    detectors = units[units["is_detector"]]
    assert len(units) == 128
    assert len(detectors) >= 10
    assert detectors["category"].nunique() >= 3
    assert (detectors["iou"] > 0.04).all()
    layers = read_table(tmp_path / "results", "layers", model="demo", layer="block4")
    overall = layers[layers["category"] == "all"].iloc[0]
    assert overall["detectors"] == len(detectors)
    assert overall["unique_concepts"] == detectors["label"].nunique()
    assert (tmp_path / "report" / "index.html").is_file()

    before = run_files(tmp_path)
    caplog.set_level(logging.INFO, logger="netdissect")
    run(compose_config(args))
    said = [r.getMessage() for r in caplog.records]
    for stage in ("dataset", "model", "extract", "quantile", "concepts", "iou", "report"):
        assert any(m.startswith(f"{stage}: skipped") for m in said), (stage, said)
    assert not [m for m in said if ": building" in m or "dask:" in m], said
    assert run_files(tmp_path) == before


def test_every_readme_snippet_returns_rows_on_the_default_run(default_run, tmp_path,
                                                              monkeypatch):
    """Each ``python`` block of the README that reads the results, run verbatim from a
    checkout whose ./workdir is the default run: every frame it makes has rows."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workdir").symlink_to(default_run, target_is_directory=True)
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
              if "workdir" in b]
    assert len(blocks) >= 4
    for code in blocks:
        found: dict = {}
        exec(code, found)
        frames = {k: v for k, v in found.items()
                  if isinstance(v, pd.DataFrame | pd.Series | pl.DataFrame)}
        assert frames, code
        for name, frame in frames.items():
            assert len(frame) > 0, (name, code)


def test_every_table_folder_opens_in_pandas_pyarrow_duckdb_and_polars(default_run):
    run(compose_config([f"workdir={default_run}", "stage=explain", "progress=false"]))
    for table in TABLES:
        folder = default_run / "results" / table
        expected = len(read_table(default_run / "results", table))
        assert expected > 0, table
        frames = {
            "pandas": pd.read_parquet(folder),
            "pyarrow": ds.dataset(folder, partitioning="hive").to_table().to_pandas(),
            "duckdb": duckdb.sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet', "
                                 "hive_partitioning=true)").df(),
            "polars": pl.read_parquet(folder, hive_partitioning=True).to_pandas(),
        }
        for reader, frame in frames.items():
            assert len(frame) == expected, (table, reader)
            assert {"model", "layer"} <= set(frame.columns), (table, reader)


def test_no_table_column_is_named_like_a_dataframe_attribute(default_run):
    taken = set(dir(pd.DataFrame))
    for table in TABLES:
        columns = set(read_table(default_run / "results", table).columns)
        assert not columns & taken, (table, sorted(columns & taken))


# what a run that finds everything current, and --help, must not load (start-up in seconds)
HEAVY = ("torch", "torchvision", "numba", "distributed", "sklearn")
LOADED = ("import atexit, runpy, sys; atexit.register(lambda: print('loaded:', *sorted(m for m "
          "in {heavy} if m in sys.modules), file=sys.stderr)); sys.argv = ['pipeline.run', "
          "*{args}]; runpy.run_module('pipeline.run', run_name='__main__')")


def _loaded(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = LOADED.format(heavy=HEAVY, args=list(args))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=300)
    line = next(x for x in done.stderr.splitlines() if x.startswith("loaded:"))
    return done, line.split()[1:]


def test_a_current_run_and_help_start_without_the_model_libraries(default_run):
    """A current stage=all decides everything from fingerprints: no model, kernel or cluster
    library is imported (each would cost seconds), and it still prints the summary."""
    done, loaded = _loaded(f"workdir={default_run}", "stage=all", "progress=false")
    assert done.returncode == 0, done.stderr
    assert "block4: 128 units" in done.stdout
    assert loaded == []
    done, loaded = _loaded("--help")
    assert done.returncode == 0 and "usage:" in done.stdout
    assert loaded == []


def _global_rows(workdir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The iou rows counted with union=global, and the manifests of every table built so."""
    manifests = [m for m in (workdir / "results" / ".artifacts").rglob("*.artifact.json")
                 if json.loads(m.read_text())["fingerprint"]["params"]["union_mode"] == "global"]
    iou = read_table(workdir / "results", "iou")
    rows = iou[iou["union_mode"] == "global"].sort_values(["layer", "unit", "label"])
    return rows.reset_index(drop=True), manifests


def test_new_rules_on_the_cache_count_without_torch_and_as_a_check_with_torch(default_run,
                                                                               tmp_path):
    """The first run recorded which compiled form equals torch's upsampling on this machine
    (kernels/); new rules on the cache then count by the compiled loop without importing
    torch, and give the rows of a run that checks the form again with torch."""
    workdir = tmp_path / "workdir"
    shutil.copytree(default_run, workdir)
    recorded = {p.name: json.loads(p.read_text())["variant"]
                for p in (workdir / "kernels").glob("[!.]*.json")}
    assert recorded  # one per (layer shape, mask size) tallied
    command = (f"workdir={workdir}", "stage=iou", "scoring.union=global", "progress=false")
    earlier = set(_global_rows(workdir)[1])  # row sets other tests may have scored so
    done, loaded = _loaded(*command)
    assert done.returncode == 0, done.stderr
    assert ("torch" in loaded) == (min(recorded.values()) < 0)  # -1: none is exact here
    assert "numba" in loaded
    without, manifests = _global_rows(workdir)
    manifests = [m for m in manifests if m not in earlier]
    assert len(manifests) == 3 * without["layer"].nunique() > 0  # iou, units, layers
    for manifest in manifests:
        manifest.unlink()
    shutil.rmtree(workdir / "kernels")
    done, loaded = _loaded(*command)
    assert done.returncode == 0, done.stderr
    assert "torch" in loaded
    assert recorded == {p.name: json.loads(p.read_text())["variant"]
                        for p in (workdir / "kernels").glob("[!.]*.json")}
    pd.testing.assert_frame_equal(_global_rows(workdir)[0], without)
