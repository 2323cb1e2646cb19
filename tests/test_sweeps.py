"""Sweeps as a first-class workflow: model identity, per-layer caches, every stage skipped when
current, unused config values, and concurrent runs on one workdir."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from pipeline.run import compose_config, run
from storage.artifacts import Artifact, atomic_dir, atomic_file
from storage.errors import UserError
from storage.tables import read_table
from tests.broden_factory import run_files
from tests.conftest import REPO, cli, cli_env

TINY = ["model=custom", "model.factory=tests.tiny_models:tiny_cnn", "cluster=none",
        "progress=false", "dataset.block_size=8"]


def cli_run(*args: str, expect: int = 0) -> str:
    proc = subprocess.run(cli(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def dry_run(args: list[str]) -> list[tuple[str, dict[str, str]]]:
    """The dry run's plan of every job: (header, stage -> status), from its printed lines."""
    out = cli_run(*args, "dry_run=true")
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in out.splitlines():
        if line.startswith("job "):
            jobs.append((line.split(":")[0], {}))
        elif line.startswith("  ") and jobs:
            stage, status = line.split()[:2]
            jobs[-1][1][stage] = status
    assert "building" not in out and "dask:" not in out, out
    return jobs


# ---------------------------------------------------------------- identity and sweeps
def test_checkpoint_sweep_gives_three_row_sets_and_a_rerun_does_nothing(
        synthetic_root, checkpoints, tmp_path):
    wd = tmp_path / "wd"
    args = ["-m", "stage=iou", f"dataset.path={synthetic_root}", *TINY,
            "model.layers=[conv2,conv3]", "model.weights=" + ",".join(map(str, checkpoints)),
            f"workdir={wd}"]
    fresh = dry_run(args)
    assert not wd.exists()  # the dry run wrote nothing, not even the workdir
    assert [job for job, _ in fresh] == [f"job {i} of 3" for i in (1, 2, 3)]
    for _, steps in fresh:
        assert {stage: status for stage, status in steps.items()
                if stage in ("concepts", "extract", "quantile", "iou")} == dict.fromkeys(
            ("concepts", "extract", "quantile", "iou"), "build")
        assert set(steps.values()) <= {"build", "skip"}
    cli_run(*args)
    before_plan = run_files(wd)
    for _, steps in dry_run(args):
        assert set(steps.values()) == {"skip"}, steps
    assert run_files(wd) == before_plan
    for table in ("iou", "units", "layers"):
        frame = read_table(wd / "results", table)
        assert set(frame["model"]) == {"tiny_cnn"}
        assert {w.split("#")[0] for w in frame["weights"]} == {"ep1.pt", "ep5.pt", "ep20.pt"}
        assert frame["weights"].nunique() == 3
        assert frame["model_id"].nunique() == 3
        sizes = frame.groupby(["model_id", "layer"]).size()
        assert len(sizes) == 6 and sizes.nunique() == 1, sizes
    units = read_table(wd / "results", "units")
    units["file"] = units["weights"].str.split("#").str[0]
    thresholds = units.pivot_table(index=["layer", "unit"], columns="file", values="threshold")
    assert not np.allclose(thresholds["ep1.pt"], thresholds["ep5.pt"])
    per_weights = duckdb.sql(
        f"SELECT weights, count(*) AS n FROM read_parquet('{wd}/results/layers/**/*.parquet', "
        "hive_partitioning=true) WHERE category = 'all' GROUP BY weights ORDER BY weights"
    ).fetchall()
    assert sorted((w.split("#")[0], n) for w, n in per_weights) == [
        ("ep1.pt", 2), ("ep20.pt", 2), ("ep5.pt", 2)]
    before = run_files(wd)
    out = cli_run(*args)
    assert "building" not in out, out
    skipped = [line for line in out.splitlines() if ": skipped," in line]
    for stage in ("extract", "quantile", "concepts", "iou"):
        assert sum(f"] - {stage}: skipped" in line for line in skipped) == 3, (stage, out)
    assert run_files(wd) == before


def readme_queries(results: Path, model: str) -> dict:
    """Run the README's two comparison queries (its sweeps section) on ``results``."""
    section = (REPO / "README.md").read_text().split("### Sweeps")[1].split("\n### ")[0]
    found: dict = {}
    for code in re.findall(r"```python\n(.*?)```", section, re.S):
        assert "workdir/results" in code and ("'demo'" in code or '"demo"' in code), code
        code = code.replace("'demo'", f"'{model}'").replace('"demo"', f'"{model}"')
        exec(code.replace("workdir/results", str(results)), found)
    return found


def test_readme_queries_count_each_row_once_beside_other_row_sets(
        synthetic_root, checkpoints, tmp_path):
    wd = tmp_path / "wd"
    base = [f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=iou", *TINY,
            "model.layers=[conv2,conv3]", "scoring.quantile=0.005"]
    for weights in checkpoints[:2]:
        run(compose_config([*base, f"model.weights={weights}"]))
    # row sets the queries must leave out: perturbed, rotated, another union mode
    weights = f"model.weights={checkpoints[0]}"
    for extra in ("extract.perturb=noise:10", "transform=rotate", "scoring.union=lite"):
        run(compose_config([*base, weights, extra]))
    found = readme_queries(wd / "results", "tiny_cnn")
    layers, unique = found["layers"], found["unique"]
    keys = ["model_id", "weights", "layer", "category"]
    assert not layers.duplicated(keys).any()
    assert {w.split("#")[0] for w in layers["weights"]} == {"ep1.pt", "ep5.pt"}
    assert len(layers) == 2 * 2 * 6  # weights x layers x categories
    assert unique.sum() > 0
    expected = layers.set_index(keys)["unique_concepts"]
    assert (unique == expected.loc[unique.index]).all()
    assert (expected.drop(unique.index) == 0).all()


def test_identity_is_content_not_path(synthetic_root, checkpoints, tmp_path):
    """The same weights under another file name share the cache; other weights do not."""
    copy = tmp_path / "renamed.pt"
    copy.write_bytes(checkpoints[0].read_bytes())
    base = [f"workdir={tmp_path / 'wd'}", f"dataset.path={synthetic_root}", "stage=extract",
            *TINY, "model.layers=[conv3]"]
    ids = []
    for weights in (checkpoints[0], copy, checkpoints[1]):
        run(compose_config([*base, f"model.weights={weights}"]))
        ids.append(sorted(p.name for p in (tmp_path / "wd" / "activations").rglob("*.zarr")))
    assert ids[0] == ids[1] and len(ids[0]) == 1
    assert len(ids[2]) == 2


# ---------------------------------------------------------------- per-layer caches
def test_new_layer_is_added_without_touching_cached_chunks(synthetic_root, tmp_path, caplog):
    wd = tmp_path / "wd"
    base = [f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=extract", *TINY,
            "model.weights=none"]
    run(compose_config([*base, "model.layers=[conv3]"]))
    (store,) = (wd / "activations").rglob("*.zarr")
    chunks = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (store / "conv3").rglob("*")
              if p.is_file()}
    assert len(chunks) > 3
    caplog.set_level("INFO", logger="netdissect")
    run(compose_config([*base, "model.layers=[conv2,conv3]"]))
    built = [r.getMessage() for r in caplog.records if "extract:" in r.getMessage()]
    assert any("conv2 (16, 28, 28)" in m for m in built), built
    assert not any("conv3 (" in m for m in built), built
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunks} == chunks
    assert sorted(p.name for p in (wd / "activations").rglob("*.zarr")) == [store.name]
    import xarray as xr

    assert set(xr.open_zarr(store).data_vars) == {"conv2", "conv3"}


def test_mistyped_layer_with_a_cache_is_one_line_and_touches_nothing(synthetic_root, tmp_path):
    wd = tmp_path / "wd"
    base = [f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=iou", *TINY,
            "model.weights=none"]
    cli_run(*base, "model.layers=[conv3]")
    before = run_files(wd)
    proc = subprocess.run(cli(*base, "model.layers=[conv33]"), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: model.layers: 'conv33' is not a layer")
    assert "did you mean 'conv3'" in line
    for name in ("conv1", "conv2", "conv3", "relu3", "fc"):
        assert name in line
    assert "delete" not in line
    assert run_files(wd) == before


# ---------------------------------------------------------------- skip and config checks
def test_unused_value_names_the_stage_that_reads_it(tmp_path):
    for args, reader in ((["stage=extract", "explain.beam=3"], "stage=explain"),
                         (["stage=report", "scoring.union=global"], "stage=iou"),
                         (["stage=concepts", "model=resnet18"], "stage=model")):
        proc = subprocess.run(cli(f"workdir={tmp_path}", *args), cwd=REPO, env=cli_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {args[1].split('=')[0]} is read by ")
        assert reader in proc.stderr and proc.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_iou_with_concepts_path_scores_that_set_from_the_cache(synthetic_root, tmp_path,
                                                               monkeypatch):
    """stage=iou concepts.path=DIR uses the cache and never loads the model once it exists."""
    import stages.extract
    import stages.network.models

    wd = tmp_path / "wd"
    base = [f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=iou", *TINY,
            "model.weights=none", "model.layers=[conv3]"]
    run(compose_config(base))

    def forbidden(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    for module in (stages.network.models, stages.extract):
        monkeypatch.setattr(module, "build_model", forbidden)
    monkeypatch.setattr(stages.extract, "run_extract", forbidden)  # imported when it builds
    run(compose_config([*base, f"concepts.path={synthetic_root}", "concepts.name=again"]))
    iou = read_table(wd / "results", "iou")
    assert set(iou["concept_set"]) == {synthetic_root.name, "again"}
    keep = ["unit", "label", "intersection", "label_area", "unit_area", "iou"]
    a, b = (iou[iou["concept_set"] == s][keep].sort_values(["unit", "label"])
            .reset_index(drop=True) for s in (synthetic_root.name, "again"))
    pd.testing.assert_frame_equal(a, b)


def test_same_dataset_name_other_index_is_one_clear_error(synthetic_root, tmp_path):
    other = tmp_path / "data" / synthetic_root.name
    import shutil

    shutil.copytree(synthetic_root, other)
    lines = (other / "index.csv").read_text().splitlines()
    (other / "index.csv").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer
    base = [f"workdir={tmp_path / 'wd'}", "stage=extract", *TINY, "model.weights=none",
            "model.layers=[conv3]"]
    run(compose_config([*base, f"dataset.path={synthetic_root}"]))
    with pytest.raises(UserError, match=r"another dataset also named .* dataset\.name="):
        run(compose_config([*base, f"dataset.path={other}"]))
    run(compose_config([*base, f"dataset.path={other}", "dataset.name=shorter"]))


# ---------------------------------------------------------------- concurrent runs
def test_two_concurrent_runs_build_everything_once(tmp_path):
    args = ["stage=all", "dataset.synthetic.n_images=40", "model.train.epochs=1", "cluster=none",
            "progress=false", "dataset.block_size=8"]
    wd = tmp_path / "shared"
    procs = [subprocess.Popen(cli(*args, f"workdir={wd}"), cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "\n".join(outs)
    builds = [line.split("] - ", 1)[1] for line in both.splitlines() if ": building " in line]
    assert len(builds) == len(set(builds)), builds  # nothing built twice
    for stage in ("dataset", "model", "extract", "quantile", "concepts", "iou", "report"):
        assert any(b.startswith(f"{stage}: building") for b in builds), (stage, builds)
    single = tmp_path / "single"
    cli_run(*args, f"workdir={single}")
    keep = ["model_id", "layer", "unit", "label", "intersection", "unit_area", "iou"]
    shared, alone = (read_table(w / "results", "iou")[keep].sort_values(keep[:4])
                     .reset_index(drop=True) for w in (wd, single))
    pd.testing.assert_frame_equal(shared, alone)


# ---------------------------------------------------------------- the artifact layer
def test_artifact_states_and_atomic_writes(tmp_path):
    target = tmp_path / "t.txt"
    a = Artifact(target, {"x": 1})
    assert a.state() == "missing"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert a.state() == "missing"  # written, not yet committed
    a.begin()
    assert a.state() == "partial"
    a.commit()
    assert a.is_current() and Artifact(target, {"x": 2}).state() == "stale"
    folder = tmp_path / "d"
    with atomic_dir(folder) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("killed")
    assert (folder / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.txt.artifact.json", "d", "t.txt"]


def test_second_holder_of_a_lock_waits_and_is_told(tmp_path):
    a = Artifact(tmp_path / "x", {})
    waited, order = [], []
    told = threading.Event()

    def on_wait(artifact):
        waited.append(artifact)
        told.set()

    with a.locked():
        def second():
            with a.locked(on_wait=on_wait):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        told.wait(10)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"] and waited == [a]
