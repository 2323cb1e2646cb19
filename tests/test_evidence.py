"""The evidence of SEMANTICS.md §8: the bootstrap over probe images and the permutation null.

A tiny Broden-format set (48 images, 16 x 16 label planes of a few objects) and a layer of
42 units: units 0-39 fire on seeded noise that has nothing to do with the images, unit 40 on
exactly the pixels of one label (a planted detector), unit 41 on that label plus noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.run import compose_config, run
from stages.concepts import ConceptsConfig, build_concept_store
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.evidence.bootstrap import (
    BootstrapSummary,
    candidate_labels,
    entries_needed,
    image_weights,
    replicate_thresholds,
)
from stages.evidence.null import p_values, permuted_rows
from stages.iou import SETTINGS as SETTINGS_COLUMNS
from stages.iou import bootstrap_pass, null_best_iou, scoring_pass
from stages.quantile import threshold_pass
from stages.tally.labels import label_space
from stages.tally.statistic import TallyRule
from storage.tables import read_table
from tests.broden_factory import BrodenBuilder
from tests.test_iou import write_activations

N, S, K = 48, 16, 42
NOISE = 40  # units 0..39
PLANTED = 3  # the label number unit 40 detects
Q = 0.05  # the top quantile of §1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    rng = np.random.default_rng(0)
    b = BrodenBuilder(root / "data", ["object"], ih=32, iw=32, sh=S, sw=S)
    for n in range(1, 6):
        b.label(n, f"thing{n}", object=0.1 * n)
    planes = []
    for _ in range(N):
        plane = np.zeros((S, S), np.int64)
        for _ in range(3):
            y, x = rng.integers(0, S - 4, 2)
            h, w = rng.integers(3, 8, 2)
            plane[y : y + h, x : x + w] = rng.integers(1, 6)
        planes.append(plane)
        b.image(planes={"object": [plane]})
    data = b.write()
    store = build_concept_store(ConceptsConfig(data, root / "c.zarr", 8, False), None)
    acts = rng.random((N, K, S, S)).astype(np.float32)
    masks = np.stack([(p == PLANTED).astype(np.float32) for p in planes])
    acts[:, NOISE] = masks * 2 + 0.1 * acts[:, NOISE]
    acts[:, NOISE + 1] = masks + acts[:, NOISE + 1]
    paths = {block: root / f"a{block}.zarr" for block in (8, 5)}
    for block, path in paths.items():
        write_activations(path, store.image_paths(), {"l": acts}, block)
    return store, paths, data


def thresholds_of(path: Path) -> np.ndarray:
    return threshold_pass(LayerBlocks(str(path), "l"), Q)[0]


def bootstrap_units(world, block: int = 8, scheduler=None, m: int = 3, replicates: int = 60,
                    seed: int = 1) -> pd.DataFrame:
    store, paths, _ = world
    space = label_space(store, None)
    source = ScoringBlocks(LayerBlocks(str(paths[block]), "l"), str(store.path))
    thresholds = thresholds_of(paths[block])
    found = scoring_pass(source, thresholds, space, TallyRule(), False, scheduler,
                         tops=entries_needed(N, S * S, Q))
    iou = found.counts.iou(space)
    labels_of = candidate_labels(iou, m)
    resampled = replicate_thresholds(found.tops, N, S * S, Q, replicates, seed)
    found = bootstrap_pass(source, resampled, space, TallyRule(), labels_of, seed, scheduler)
    point = np.argmax(iou, axis=1) + 1
    return BootstrapSummary.of(found, space, labels_of, point).units(0.04, 0.95)


def test_a_replicate_is_the_dissection_of_the_resampled_probe_set(world, tmp_path):
    """Replicate r equals dissecting the probe set with image x taken w(r, x) times,
    written out as its own activation cache: its thresholds are numpy.quantile of that
    multiset (§1) and its counts of every candidate the tally of it (§4), exactly."""
    store, paths, _ = world
    space = label_space(store, None)
    layer = LayerBlocks(str(paths[5]), "l")
    acts = np.concatenate([layer.load(b).numpy() for b in range(layer.n_blocks())])
    source = ScoringBlocks(layer, str(store.path))
    found = scoring_pass(source, thresholds_of(paths[5]), space, TallyRule(), False,
                         tops=entries_needed(N, S * S, Q))
    labels_of = candidate_labels(found.counts.iou(space), 4)
    resampled = replicate_thresholds(found.tops, N, S * S, Q, 6, seed=5)
    replicates = bootstrap_pass(source, resampled, space, TallyRule(), labels_of, 5)
    weights = image_weights(np.arange(N), 6, seed=5)
    for r in range(6):
        rows = np.repeat(np.arange(N), weights[:, r])
        values = acts[rows].transpose(1, 0, 2, 3).reshape(K, -1).astype(np.float64)
        numpy_thresholds = np.quantile(values, 1 - Q, axis=1, method="linear")
        np.testing.assert_array_equal(resampled[:, r], numpy_thresholds)
        path = tmp_path / f"replicate{r}.zarr"
        write_activations(path, [store.image_paths()[i] for i in rows], {"l": acts[rows]}, 7)
        explicit = scoring_pass(ScoringBlocks(LayerBlocks(str(path), "l"), str(store.path),
                                              rows), numpy_thresholds, space, TallyRule(),
                                False).counts
        np.testing.assert_array_equal(
            replicates.intersection[r],
            np.take_along_axis(explicit.intersection, labels_of, axis=1))
        np.testing.assert_array_equal(replicates.unit_area[r], explicit.unit_area)
        np.testing.assert_array_equal(replicates.label_area[r][1:], explicit.label_area[1:])
    assert len({tuple(resampled[:, r]) for r in range(6)}) == 6  # the thresholds do move


def test_too_few_top_entries_are_refused(world):
    store, paths, _ = world
    found = scoring_pass(ScoringBlocks(LayerBlocks(str(paths[8]), "l"), str(store.path)),
                         thresholds_of(paths[8]), label_space(store, None), TallyRule(), False,
                         tops=8)
    with pytest.raises(RuntimeError, match="entries_needed"):
        replicate_thresholds(found.tops, N, S * S, Q, 4, seed=0)


def test_weights_are_a_function_of_seed_replicate_and_row():
    rows = np.array([5, 0, 17, 5])
    weights = image_weights(rows, 40, seed=3)
    np.testing.assert_array_equal(weights[0], weights[3])  # the same row, wherever it comes
    np.testing.assert_array_equal(image_weights(rows[1:3], 40, 3), weights[1:3])
    np.testing.assert_array_equal(image_weights(rows, 10, 3), weights[:, :10])  # replicate r
    assert not np.array_equal(image_weights(rows, 40, seed=4), weights)
    assert 0.7 < image_weights(np.arange(500), 40, 0).mean() < 1.3  # Poisson(1)


def test_the_same_seed_gives_identical_intervals_for_any_blocking_and_scheduler(world):
    reference = bootstrap_units(world)
    for block, scheduler in ((5, None), (8, "threads"), (5, "threads")):
        pd.testing.assert_frame_equal(bootstrap_units(world, block, scheduler), reference)
    assert not bootstrap_units(world, seed=2).equals(reference)


def test_more_candidates_do_not_change_the_result_of_a_clear_detector(world):
    """Searching every label (M = 5) instead of the 3 best: the same intervals for every
    unit, and every column the same for the units with a clear best concept.  A noise unit
    (no clear concept) can win a replicate with a label outside its candidates, so with more
    of them its detector probability can only rise and its label stability only fall."""
    few, every = bootstrap_units(world, m=3), bootstrap_units(world, m=5)
    pd.testing.assert_frame_equal(few[["iou_lo", "iou_hi"]], every[["iou_lo", "iou_hi"]])
    pd.testing.assert_frame_equal(few.loc[NOISE:], every.loc[NOISE:])
    assert (every["p_detector"] >= few["p_detector"]).all()
    assert (every["label_stability"] <= few["label_stability"]).all()


def test_the_planted_detector_is_certain_and_noise_is_not(world):
    units = bootstrap_units(world, replicates=100)
    planted = units.loc[NOISE]
    assert planted["p_detector"] == 1.0 and planted["label_stability"] == 1.0
    assert 0.04 < planted["iou_lo"] <= planted["iou_hi"] <= 1.0
    assert (units["iou_lo"] <= units["iou_hi"]).all()
    assert units.loc[: NOISE - 1, "iou_hi"].max() < planted["iou_lo"]


def test_null_p_values_are_uniform_for_noise_and_smallest_for_the_planted_unit(world):
    store, paths, _ = world
    space = label_space(store, None)
    thresholds = thresholds_of(paths[8])
    observed = scoring_pass(ScoringBlocks(LayerBlocks(str(paths[8]), "l"), str(store.path)),
                            thresholds, space, TallyRule(), False).counts
    draws = 99
    sources = [ScoringBlocks(LayerBlocks(str(paths[8]), "l"), str(store.path),
                             permuted_rows(None, N, seed=0, draw=d)) for d in range(draws)]
    null = null_best_iou(sources, thresholds, space, TallyRule())
    assert null.shape == (draws, K)
    p = p_values(observed.iou(space).max(axis=1), null)
    assert p[NOISE] == pytest.approx(1 / (draws + 1)) == p[NOISE + 1]
    # units that have nothing to do with the images get p-values spread over (0, 1]
    assert stats.kstest(p[:NOISE], "uniform").pvalue > 0.01
    assert p[:NOISE].min() > 1 / (draws + 1)  # no noise unit looks planted


def test_permutations_depend_on_seed_and_draw_only():
    a = permuted_rows(None, 50, seed=1, draw=3)
    assert sorted(a) == list(range(50)) and np.array_equal(a, permuted_rows(None, 50, 1, 3))
    assert not np.array_equal(a, permuted_rows(None, 50, 1, 4))
    rows = np.arange(50)[::-1]
    np.testing.assert_array_equal(permuted_rows(rows, 50, 1, 3), rows[a])


EVIDENCE = ["iou_lo", "iou_hi", "p_detector", "label_stability", "p_value"]


def test_the_pipeline_adds_evidence_only_when_asked_in_every_cluster_mode(world, tmp_path,
                                                                          caplog):
    _, _, data = world
    base = [f"dataset.path={data}", "stage=iou", "progress=false", "model=custom",
            "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
            "model.layers=[conv3]", "scoring.quantile=0.05", "dataset.block_size=8"]
    plain = tmp_path / "plain"
    run(compose_config([*base, f"workdir={plain}", "cluster=none"]))
    units = read_table(plain / "results", "units")
    assert units[EVIDENCE].isna().all().all()  # every column there, empty: one schema
    assert (units["bootstrap_replicates"] == 0).all() and (units["null_model"] == "none").all()
    asked = ["scoring.bootstrap=30", "scoring.null=permute", "scoring.null_draws=9"]
    found = {}
    for cluster in ("cluster=none", "cluster=threads", "cluster=local"):
        wd = tmp_path / cluster.split("=")[1]
        run(compose_config([*base, f"workdir={wd}", cluster, *asked]))
        found[cluster] = read_table(wd / "results", "units").sort_values(["layer", "unit"])
    cols = ["iou", *EVIDENCE]
    for cluster, frame in found.items():
        pd.testing.assert_frame_equal(frame[cols].reset_index(drop=True),
                                      found["cluster=none"][cols].reset_index(drop=True),
                                      obj=cluster)
    evidence = found["cluster=none"]
    assert evidence[EVIDENCE].notna().all().all()
    assert (evidence["bootstrap_replicates"] == 30).all() and (evidence["null_draws"] == 9).all()
    same = [c for c in units.columns if c not in EVIDENCE and c not in SETTINGS_COLUMNS]
    pd.testing.assert_frame_equal(  # the rest as without
        evidence[same].reset_index(drop=True),
        units.sort_values(["layer", "unit"])[same].reset_index(drop=True))
    layers = read_table(tmp_path / "none" / "results", "layers")
    overall = layers[layers["category"] == "all"].iloc[0]
    assert overall["detectors_lo"] <= overall["detectors_hi"]
    assert overall["null_detectors"] <= overall["detectors"]

    # asking for evidence replaced the row set (one per parameter set); a plain run keeps it,
    # other evidence settings replace it again
    none = tmp_path / "none"
    assert len(list((none / "results" / "units").rglob("*.parquet"))) == 1
    caplog.set_level("INFO", logger="netdissect")
    run(compose_config([*base, f"workdir={none}", "cluster=none"]))
    assert "iou: skipped" in caplog.text and "building" not in caplog.text
    kept = read_table(none / "results", "units").sort_values(["layer", "unit"])
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), evidence.reset_index(drop=True))
    run(compose_config([*base, f"workdir={none}", "cluster=none", "scoring.bootstrap=10"]))
    other = read_table(none / "results", "units")
    assert len(other) == len(units) and (other["bootstrap_replicates"] == 10).all()
    assert other["p_value"].isna().all()


def test_the_report_shows_intervals_and_flags_what_the_evidence_does_not_support(world, tmp_path):
    _, _, data = world
    common = [f"dataset.path={data}", "progress=false", "model=custom", "cluster=none",
              "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
              "model.layers=[conv3]", "scoring.quantile=0.05", "dataset.block_size=8",
              f"workdir={tmp_path}", "scoring.bootstrap=30", "scoring.null=permute",
              "scoring.null_draws=9", "scoring.null_level=0.15", "scoring.iou_threshold=0.02",
              "report.top_n=2"]
    run(compose_config([*common, "stage=all"]))
    units = read_table(tmp_path / "results", "units")
    layers = read_table(tmp_path / "results", "layers")
    page = next((tmp_path / "report").rglob("conv3*.html")).read_text()
    assert "<th>interval, p</th>" in page
    for r in units.itertuples():
        cell = f"[{r.iou_lo:.4f}, {r.iou_hi:.4f}] p={r.p_value:.3f}"
        assert cell in page
    # the tiny random CNN's detectors are weak: the flags say which
    detectors = units[units["is_detector"]]
    assert len(detectors) > 0
    assert page.count("not beyond the null") == int((detectors["p_value"] > 0.15).sum()) > 0
    assert page.count("interval reaches 0.02") == int((detectors["iou_lo"] <= 0.02).sum()) > 0
    whiskers = page.count('<line class="whisker"')
    rows = layers[(layers["category"] != "all") & layers["unique_concepts_lo"].notna()]
    assert whiskers == len(rows) > 0
    index = (tmp_path / "report" / "index.html").read_text()
    assert index.count('<line class="whisker"') == 1
