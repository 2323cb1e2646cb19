"""Smoke test of the Broden-scale benchmark: the generator and every stage run on a tiny
set, and the NetDissect-Lite-style baseline counts what the pipeline counts (no timings)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from benchmarks import bench_broden, readme_table
from tests.conftest import REPO


def test_broden_benchmark_runs_every_stage_and_baseline_matches(tmp_path):
    args = argparse.Namespace(n=24, scale=1, out=str(tmp_path / "broden.json"),
                              workdir=str(tmp_path / "work"), schedulers=["threads"],
                              models=["resnet18"],
                              baseline_images=24, seed=0, in_process=True, quiet=True,
                              stages=None)
    result = bench_broden.run(args)
    done = {(m["stage"], m.get("model"), m.get("strategy")) for m in result["measurements"]}
    for model in args.models:
        for stage in (*bench_broden.PASS_STAGES, "baseline"):
            assert (stage, model, None) in done
        assert {("quantile", model, "top-k"), ("quantile", model, "radix"),
                ("quantile_full_lists", model, "top-k")} <= done
    assert ("concepts", None, None) in done
    baselines = [m for m in result["measurements"] if m["stage"] == "baseline"]
    assert all(m["counts_equal"] and m["images"] == 24 for m in baselines)
    assert all(m["equals_top_k"] for m in result["measurements"] if m.get("strategy") == "radix")
    labels = result["data"]["labels"]
    assert labels["labels"] > 1000 and labels["pixel_planes_max"] <= 7
    assert all(m["replicates"] == 200 and m["state_mib"] > 0
               for m in result["measurements"] if m["stage"] == "bootstrap")
    assert "| tally (restricted, set) |" in readme_table.tables(result)
    assert "| bootstrap, B = 200" in readme_table.tables(result)


def test_a_measurement_runs_in_its_own_process(tmp_path):
    """The real runs measure each stage in a fresh interpreter: its JSON comes back."""
    import json

    from benchmarks import broden_data
    from benchmarks.common import run_child

    broden_data.ensure_activations(tmp_path, [24], ["resnet18"], progress=False)
    spec = {"workdir": str(tmp_path), "stage": "top_images", "model": "resnet18", "n": 24,
            "scheduler": "threads"}
    found = run_child("benchmarks.bench_broden", json.dumps(spec))
    assert found["images"] == 24 and found["peak_rss_mib"] > 0 and len(found["load_before"]) == 3


def test_marginal_rate_is_the_rate_of_the_added_images():
    small = {"images": 2000, "seconds": 1.5}  # 0.5 s of start-up + 1,000 images/s
    large = {"images": 8000, "seconds": 7.5}
    assert readme_table.marginal_rate(small, large) == 1000.0
    assert readme_table.marginal_rate(small, {"images": 8000, "seconds": 1.5}) is None


def test_coverage_benchmark_runs_and_counts_its_draws(tmp_path):
    """The coverage benchmark on a tiny population: every draw scored, rates in [0, 1]."""
    from benchmarks import bench_evidence

    args = argparse.Namespace(population=300, probe=[100], draws=3, replicates=20,
                              candidates=5, seed=0, out=str(tmp_path / "evidence.json"))
    result = bench_evidence.run(args)
    (probe,) = result["probes"]
    assert probe["images"] == 100 and probe["draws"] == 3
    assert sum(probe["draws_with_planted_label_best"].values()) > 0
    for rate in (*probe["coverage_population_iou"].values(),
                 *probe["coverage_at_probe_thresholds"].values()):
        assert 0.0 <= rate <= 1.0
    assert all(0 < iou < 1 for iou in result["population_iou"])


def test_explain_benchmark_runs_every_stage(tmp_path):
    """bench_explain on a tiny Broden-shaped set: every unit searched is proven, beam search
    is never above the optimum, and the growth tables are filled (no timings asserted)."""
    from benchmarks import bench_explain

    work = tmp_path / "work"
    bench_broden.run(argparse.Namespace(
        n=24, scale=1, out=str(tmp_path / "b.json"), workdir=str(work), schedulers=["threads"],
        models=["resnet18"], baseline_images=24, seed=0, in_process=True, quiet=True,
        stages=["quantile"]))
    result = bench_explain.run(argparse.Namespace(
        n=24, workers=1, units=3, sample_units=1, length4_seconds=0.5, label_counts=[20, 40],
        workdir=str(work), out=str(tmp_path / "explain.json"),
        stages=list(bench_explain.STAGES), seed=0))
    assert result["signatures"]["signatures"] > 0
    assert result["optimal"]["units"] == 3 and result["optimal"]["proven_optimal"] == 3
    for width in ("beam5", "beam10"):
        assert result["beam"][width]["above_optimal_units"] == 0
    assert list(result["growth"]["labels"])[:2] == ["20", "40"]
    assert len(result["growth"]["labels"]) == 3
    assert set(result["growth"]["lengths"]) == {"1", "2", "3", "4"}
    assert result["growth"]["lengths"]["3"]["proven_optimal"] == 1


def test_gpu_check_on_a_machine_without_a_gpu_says_so_and_exits_0():
    """The script CI can run anywhere: no nvidia-smi on PATH means no GPU, and nothing else
    is started (no install, no benchmark)."""
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not (Path(d) / "nvidia-smi").exists())
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO,
                          env={**os.environ, "PATH": path}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("gpu_check: no GPU on this machine (nvidia-smi finds none); "
                                   "nothing to check")


def test_job_benchmark_runs_every_stage_and_the_rescore(tmp_path):
    """The whole-job benchmark on 16 Broden-geometry images with JPEGs: every stage of the
    CLI job measured, then the rescore comparison (no timings asserted)."""
    from benchmarks import bench_job
    from benchmarks import broden_data as data

    data.ensure_dataset(tmp_path, [16], progress=False)
    data.ensure_images(tmp_path, 16, progress=False)
    dataset = data.dataset_path(tmp_path, 16)
    assert len(list((dataset / "images").rglob("*.jpg"))) == 16
    # layer1 (64 units): the report and the search stay small; the stages are the job's
    row = bench_job.job(tmp_path / "work", dataset, 16, time_limit=0.05, forward_images=8,
                        layers=("layer1",))
    assert list(row["stages"]) == [*bench_job.STAGES, "explain"]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in row["stages"].values())
    assert row["stages"]["extract"]["bytes_added"] > 0 and row["forward_pass"]["images_timed"] == 8
    assert row["forward_pass"]["seconds"] == 16 / row["forward_pass"]["images_per_s"]
    found = bench_job.rescore(tmp_path / "work", dataset, 16, "layer1")
    assert found["planes_per_image"] > 1 and found["netdissect_lite_loop_s"] > 0
    assert found["store_build_images_per_s"] > 0 and set(found["decode_images_per_s"]) == {
        f"{decoder}_threads_{t}" for decoder in ("libpng", "pillow") for t in {1, os.cpu_count() or 1}}
    # a rerun times the builds again: the copy's store and every table scored against it
    # are made anew (their manifests rewritten), the others are left as they were
    manifests = list((tmp_path / "work").rglob("*.artifact.json"))
    before = {m: m.stat().st_mtime_ns for m in manifests}
    bench_job.rescore(tmp_path / "work", dataset, 16, "layer1")
    remade = {m for m in manifests if m.stat().st_mtime_ns != before[m]}
    copy = {m for m in manifests if "set-copy.zarr" in m.name or json.loads(
        m.read_text())["fingerprint"].get("params", {}).get("concept_set") == "copy"}
    assert len(copy) == 1 + 3 * 2 and remade == copy  # the store; both rules' three tables
