"""End-to-end: identical tables on every scheduler, readers, keyed replacement, skips."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pytest

from pipeline.run import compose_config, run
from storage.tables import read_table
from tests.conftest import REPO, cli, cli_env

DATA = ["dataset.synthetic.n_images=48", "dataset.block_size=8", "progress=false"]
BASE = [*DATA, "model.train.epochs=1"]


def config(workdir: Path, *extra: str) -> dict:
    return compose_config([f"workdir={workdir}", *BASE, *extra])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """Dataset, concept store, demo model and activations, made once."""
    wd = tmp_path_factory.mktemp("base") / "wd"
    run(config(wd, "stage=extract", "cluster=none"))
    run(compose_config([f"workdir={wd}", *DATA, "stage=concepts", "cluster=none"]))
    return wd


def score_copy(extracted: Path, dest: Path, *extra: str) -> pd.DataFrame:
    shutil.copytree(extracted, dest)
    run(config(dest, "stage=iou", *extra))
    frame = read_table(dest / "results", "iou")
    return frame.sort_values(["layer", "unit", "label"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def in_process(extracted, tmp_path_factory) -> pd.DataFrame:
    return score_copy(extracted, tmp_path_factory.mktemp("none") / "wd", "cluster=none")


def test_threaded_scheduler_same_tables(extracted, in_process, tmp_path):
    threaded = score_copy(extracted, tmp_path / "wd", "cluster=threads")
    pd.testing.assert_frame_equal(in_process, threaded)


def test_local_cluster_same_tables(extracted, in_process, tmp_path):
    local = score_copy(extracted, tmp_path / "wd", "cluster=local", "cluster.n_workers=2")
    pd.testing.assert_frame_equal(in_process, local)


def test_external_scheduler_same_tables(extracted, in_process, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(
        [*dask, "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
         "--scheduler-file", str(scheduler_file)],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--nworkers", "2", "--host", "127.0.0.1", "--no-dashboard"],
            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
        external = score_copy(extracted, tmp_path / "wd", "cluster=local",
                              f"cluster.address={address}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
    pd.testing.assert_frame_equal(in_process, external)


def test_tables_contract(in_process):
    cols = set(in_process.columns)
    assert {"model", "layer", "unit", "concept_set", "label", "concept", "category", "threshold_quantile",
            "union_mode", "planes", "basis", "intersection", "label_area", "unit_area",
            "union_area", "iou"} <= cols
    assert "union" not in cols
    for c in ("intersection", "label_area", "unit_area", "union_area"):
        assert in_process[c].dtype == "int64"
    assert (in_process["union_area"] == in_process["unit_area"] + in_process["label_area"]
            - in_process["intersection"]).all()
    # every (unit, label) pair is kept, not only the best
    per_layer = in_process.groupby("layer").size()
    labels = in_process["label"].nunique()
    assert (per_layer == 128 * labels).all()


def test_readers_filter_on_model_and_layer(extracted, in_process, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(extracted, wd)
    run(config(wd, "stage=iou", "cluster=none"))
    root = wd / "results" / "iou"
    expected = in_process[in_process["layer"] == "block4"]
    frame = pd.read_parquet(root, filters=[("model", "=", "demo"), ("layer", "=", "block4")])
    assert len(frame) == len(expected) > 0
    con = duckdb.connect()
    n, best = con.execute(
        f"SELECT count(*), max(iou) FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)"
        " WHERE model = 'demo' AND layer = 'block4'"
    ).fetchone()
    assert n == len(expected) and best == pytest.approx(expected["iou"].max())
    units = con.execute(
        f"SELECT count(*) FROM read_parquet('{wd}/results/units/**/*.parquet', "
        "hive_partitioning=true) WHERE layer = 'block4' AND is_detector"
    ).fetchone()[0]
    assert units >= 0
    lazy = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True)
    got = lazy.filter((pl.col("model") == "demo") & (pl.col("layer") == "block4")).collect()
    assert got.height == len(expected)


def test_other_options_add_rows_same_options_replace(extracted, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(extracted, wd)
    run(config(wd, "stage=iou", "cluster=none"))
    first = read_table(wd / "results", "iou")
    run(config(wd, "stage=iou", "cluster=none", "scoring=lite"))
    both = read_table(wd / "results", "iou")
    assert len(both) == 2 * len(first)
    assert set(both["union_mode"]) == {"restricted", "lite"}
    assert set(both["planes"]) == {"set", "multiset"}
    run(config(wd, "stage=iou", "cluster=none", "scoring=lite"))
    again = read_table(wd / "results", "iou")
    assert len(again) == len(both)
    lite = again[again["union_mode"] == "lite"].sort_values(["layer", "unit", "label"])
    old = both[both["union_mode"] == "lite"].sort_values(["layer", "unit", "label"])
    assert lite["iou"].tolist() == old["iou"].tolist()
    layers = read_table(wd / "results", "layers")
    assert set(layers["category"]) >= {"all", "object", "part", "material", "color"}


def test_cli_rerun_skips_every_stage(extracted, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(extracted, wd)
    args = cli("stage=iou", f"workdir={wd}", *BASE, "cluster=none")
    subprocess.run(args, cwd=REPO, env=cli_env(), check=True, capture_output=True)
    res = subprocess.run(args, cwd=REPO, env=cli_env(), check=True, capture_output=True, text=True)
    out = res.stdout + res.stderr
    for stage in ("dataset:", "concepts:", "model:", "extract:", "quantile:"):
        assert any(stage in line and "skipped" in line for line in out.splitlines()), stage
    assert "block4: 128 units" in res.stdout
    assert "Tables:" in res.stdout
    assert not (REPO / "outputs").exists()
    assert (wd / "logs").is_dir()


def test_bad_config_value_is_one_line(tmp_path):
    res = subprocess.run(cli("stage=iou", f"workdir={tmp_path}", "scoring.union=bogus",
                             "cluster=none"), cwd=REPO, env=cli_env(), capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: scoring.union='bogus'")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("override, expected", [
    ("scoring.unoin=global", "config key 'scoring.unoin' does not exist"),
    ("model=resnet19", "Could not find 'model/resnet19'; available: alexnet"),
    ("model=torchvision", "model: set exactly one of model.arch"),
    ("explain.search=exhaustive", "explain.search='exhaustive'"),
    ("stage=explain explain.max_nodes=0", "explain.max_nodes=0: must be positive"),
])
def test_bad_config_key_is_one_line(tmp_path, override, expected):
    res = subprocess.run(cli(*override.split(), f"workdir={tmp_path}"), cwd=REPO, env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: ") and expected in res.stderr
    assert not any(tmp_path.iterdir())


def test_help_is_the_projects_own_and_names_real_stages_and_keys():
    import re

    from pipeline.config import Stage
    from pipeline.run import _known_keys

    proc = subprocess.run(cli("--help"), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m pipeline.run")
    for stage in Stage:
        assert re.search(rf"\b{stage.value}\b", out), stage
    keys = set(re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)=", out))
    assert keys and keys <= set(_known_keys()), keys - set(_known_keys())
