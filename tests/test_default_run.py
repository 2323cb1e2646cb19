"""The built-in default (synthetic dataset + demo model) finds real detectors, and a second
``stage=all`` finds everything current: every stage says so and no file is rewritten."""

from __future__ import annotations

import logging

from pipeline.run import compose_config, run
from storage.tables import read_table
from tests.broden_factory import run_files


def test_default_run_finds_detectors_and_a_second_run_does_nothing(tmp_path, caplog):
    # exactly the README's main job, without progress bars
    args = [f"workdir={tmp_path}", "stage=all", "progress=false"]
    run(compose_config(args))
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
