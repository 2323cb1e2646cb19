"""The built-in default (synthetic dataset + demo model) finds real detectors."""

from __future__ import annotations

from pipeline.run import compose_config, run
from storage.tables import read_table


def test_default_run_finds_detectors_in_three_categories(tmp_path):
    # exactly the README's main job, on the threaded scheduler and without progress bars
    run(compose_config([f"workdir={tmp_path}", "stage=iou", "cluster=threads", "progress=false"]))
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
