"""Per-concept principal axes (SEMANTICS.md §9): a tiny Broden-format set of 16 x 16 label
planes and a layer of 8 x 8 maps (two mask pixels per cell side), where unit 3 carries
label 1 and the other units are noise."""

from __future__ import annotations

import numpy as np
import pytest

from stages.bases.transforms import random_rotation
from stages.concepts import ConceptsConfig, build_concept_store
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.loadings import cell_index, concept_axes, concept_cells, most_frequent
from stages.tally.labels import label_space
from tests.broden_factory import BrodenBuilder
from tests.test_iou import write_activations

N, S, H, K = 40, 16, 8, 10
CARRIER = 3  # the unit that carries label 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadings")
    rng = np.random.default_rng(1)
    b = BrodenBuilder(root / "data", ["object", "scene"], ih=32, iw=32, sh=S, sw=S)
    for n in range(1, 5):
        b.label(n, f"thing{n}", object=0.1 * n)
    b.label(5, "place", scene=0.5)
    planes = []
    for i in range(N):
        plane = np.zeros((S, S), np.int64)
        for _ in range(3):
            y, x = rng.integers(0, S - 5, 2)
            h, w = rng.integers(3, 9, 2)
            plane[y : y + h, x : x + w] = rng.integers(1, 5)
        planes.append(plane)
        b.image(planes={"object": [plane]}, scalars={"scene": [5]} if i % 3 == 0 else {})
    store = build_concept_store(ConceptsConfig(b.write(), root / "c.zarr", 8, False), None)
    acts = rng.normal(size=(N, K, H, H)).astype(np.float32)
    at_one = np.stack([(p == 1).reshape(H, 2, H, 2).mean(axis=(1, 3)) for p in planes])
    acts[:, CARRIER] += 6 * at_one.astype(np.float32)
    rotated = np.einsum("ok,nkhw->nohw", random_rotation(K, 0), acts).astype(np.float32)
    paths = {}
    for name, values, block in (("plain", acts, 8), ("blocks", acts, 5), ("rotated", rotated, 8)):
        paths[name] = root / f"{name}.zarr"
        write_activations(paths[name], store.image_paths(), {"l": values}, block)
    return store, paths, planes, {"plain": acts, "rotated": rotated}


def gathered(acts: np.ndarray, planes, image_level: np.ndarray, label: int,
             coverage: float) -> np.ndarray:
    """The standardised vectors at the label's cells, gathered cell by cell."""
    flat = acts.transpose(0, 2, 3, 1).reshape(-1, K).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    rows = []
    for i, plane in enumerate(planes):
        for y in range(H):
            for x in range(H):
                pixels = [(plane[py, px] == label) or image_level[i]
                          for py in range(S) for px in range(S)
                          if py * H // S == y and px * H // S == x]
                if np.mean(pixels) >= coverage:
                    rows.append((acts[i, :, y, x].astype(np.float64) - mean) / std)
    return np.array(rows)


def axes_of(world, name: str, labels: list[int], coverage: float = 0.5):
    store, paths, _, _ = world
    space = label_space(store, None)
    source = ScoringBlocks(LayerBlocks(str(paths[name]), "l"), str(store.path))
    return concept_axes(source, space, space.lut[np.array(labels)], coverage)


@pytest.mark.parametrize("coverage", [0.5, 0.25, 1.0])
def test_axes_equal_numpy_svd_of_the_gathered_standardised_vectors(world, coverage):
    _, _, planes, acts = world
    axes = axes_of(world, "plain", [1, 2, 5], coverage)
    for c, label in enumerate([1, 2, 5]):
        image_level = np.array([i % 3 == 0 for i in range(N)]) & (label == 5)
        x = gathered(acts["plain"], planes, image_level, label, coverage)
        assert axes.count[c] == len(x)
        _, singular, vt = np.linalg.svd(x, full_matrices=False)
        ratio = singular**2 / (singular**2).sum()
        np.testing.assert_allclose(axes.variance_ratio[c], ratio, atol=1e-10)
        for i in range(3):  # each axis up to its sign
            v = vt[i] * np.sign(vt[i][np.abs(vt[i]).argmax()])
            np.testing.assert_allclose(axes.axes[c, i], v, atol=1e-8)


def test_the_carrier_dominates_its_concept_and_not_after_a_rotation(world):
    plain, rotated = axes_of(world, "plain", [1, 2]), axes_of(world, "rotated", [1, 2])
    assert plain.dominant_unit[0] == CARRIER and plain.dominance[0] > 0.9
    assert rotated.dominance[0] < 0.5
    assert plain.dominance[1] < 0.5  # label 2 has no unit of its own


def test_blocking_changes_nothing_but_rounding(world):
    a, b = axes_of(world, "plain", [1, 3]), axes_of(world, "blocks", [1, 3])
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_allclose(a.axes, b.axes, atol=1e-9)
    np.testing.assert_allclose(a.variance_ratio, b.variance_ratio, atol=1e-12)


def test_cells_of_uneven_sizes_follow_the_floor_rule():
    np.testing.assert_array_equal(cell_index(7, 3), [0, 0, 0, 1, 1, 2, 2])
    present = np.zeros((1, 1, 7 * 5), bool).reshape(1, 1, 7, 5)
    present[0, 0, :3, :2] = True  # cell (0, 0) is rows 0-2, columns 0-1: covered fully
    present[0, 0, 3, 2] = True  # one of cell (1, 1)'s 2 x 2 pixels (its columns are 2-3)
    cells = concept_cells(present.reshape(1, 1, -1), (3, 3, 7, 5), 0.25)
    assert cells.reshape(3, 3).tolist() == [[True, False, False], [False, True, False],
                                            [False, False, False]]
    assert not concept_cells(present.reshape(1, 1, -1), (3, 3, 7, 5), 0.5)[0, 0, 4]


def test_most_frequent_takes_the_largest_areas_ties_to_the_lower_label():
    np.testing.assert_array_equal(most_frequent(np.array([5, 9, 0, 9, 1]), 3), [1, 2, 4])
    np.testing.assert_array_equal(most_frequent(np.array([0, 3, 0]), 5), [2])


# ---------------------------------------------------------------- through the pipeline
TINY = ["model=custom", "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
        "model.layers=[conv3]", "cluster=none", "progress=false", "dataset.block_size=8",
        "scoring.quantile=0.02"]


def test_stage_loadings_writes_keyed_tables_on_every_basis(tmp_path, synthetic_root):
    from pipeline.run import compose_config, run
    from storage.errors import UserError
    from storage.tables import read_table

    base = [f"workdir={tmp_path}", f"dataset.path={synthetic_root}", "stage=loadings", *TINY,
            "loadings.top=4", "loadings.components=2"]
    run(compose_config(base))
    run(compose_config([*base, "transform=rotate", "transform.alpha=1"]))
    dominance = read_table(tmp_path / "results", "dominance")
    loadings = read_table(tmp_path / "results", "loadings")
    assert set(dominance["basis"]) == {"none", "rotate(alpha=1,seed=0)"}
    assert (dominance.groupby("basis").size() == 4).all()
    assert {"model", "layer", "model_id", "dataset", "concept_set", "loadings_concepts",
            "coverage", "threshold_quantile"} <= set(dominance.columns)
    plain = dominance[dominance["basis"] == "none"]
    iou = read_table(tmp_path / "results", "iou")
    iou = iou[iou["basis"] == "none"]
    area = iou.groupby("concept")["label_area"].first()
    assert set(plain["concept"]) == set(area.sort_values(ascending=False).index[:4])
    for row in plain.itertuples():  # the dominant unit's IoU is the iou table's
        match = iou[(iou["unit"] == row.dominant_unit) & (iou["concept"] == row.concept)]
        assert match["iou"].item() == row.dominant_unit_iou
    first = loadings[(loadings["component"] == 0) & (loadings["basis"] == "none")]
    squares = first.assign(sq=first["loading"] ** 2).groupby("concept")["sq"].sum()
    np.testing.assert_allclose(squares.to_numpy(), 1.0)
    assert (loadings.groupby(["basis", "concept"]).size() == 2 * 16).all()  # 2 axes, 16 units
    with pytest.raises(UserError, match="loadings.concepts: 'no-such-label'"):
        run(compose_config([*base, "loadings.concepts=[no-such-label]"]))
