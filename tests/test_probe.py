"""The linear probe (SEMANTICS.md §10): a tiny Broden-format set whose images carry one of
three scene labels, and a layer where units 2, 3 and 4 each fire on one scene."""

from __future__ import annotations

import numpy as np
import pytest

from stages.bases.transforms import random_rotation
from stages.concepts import ConceptsConfig, build_concept_store
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Pass, reduce_blocks
from stages.probe import NO_CLASS, PooledFeatures, cross_validated, image_classes
from tests.broden_factory import BrodenBuilder
from tests.test_iou import write_activations

N, K, H = 90, 8, 4
SCENES = (11, 12, 13)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(2)
    b = BrodenBuilder(root / "data", ["object", "scene"], ih=16, iw=16, sh=8, sw=8)
    b.label(1, "thing", object=0.5)
    for n in SCENES:
        b.label(n, f"place{n}", scene=0.3)
    scene = np.array([SCENES[i % 3] for i in range(N)])
    for i in range(N):
        scalars = {"scene": [int(scene[i])]} if i != 5 else {"scene": [11, 12]}  # two: no class
        b.image(planes={"object": [np.ones((8, 8), np.int64)]}, scalars=scalars)
    store = build_concept_store(ConceptsConfig(b.write(), root / "c.zarr", 16, False), None)
    acts = rng.normal(size=(N, K, H, H)).astype(np.float32)
    for i, n in enumerate(SCENES):  # each scene raises a unit of its own
        acts[scene == n, 2 + i] += 0.5  # weakly: accuracy near 0.85, not 1
    rotated = np.einsum("ok,nkhw->nohw", random_rotation(K, 3), acts).astype(np.float32)
    paths = {}
    for name, values, block in (("plain", acts, 16), ("blocks", acts, 7), ("rotated", rotated, 16)):
        paths[name] = root / f"{name}.zarr"
        write_activations(paths[name], store.image_paths(), {"l": values}, block)
    return store, paths, acts, scene


def pooled(world, name: str, pool: str = "mean"):
    store, paths, _, _ = world
    source = ScoringBlocks(LayerBlocks(str(paths[name]), "l"), str(store.path))
    statistic = PooledFeatures(pool, store.categories.index("scene"))
    (found,) = reduce_blocks(Pass(source, [statistic]), source.n_blocks())
    return found


def test_pooled_features_and_classes_are_each_images(world):
    _, _, acts, scene = world
    found = pooled(world, "plain")
    np.testing.assert_array_equal(found.rows, np.arange(N))
    np.testing.assert_allclose(found.features, acts.astype(np.float64).mean(axis=(2, 3)),
                               rtol=1e-12)
    expected = scene.copy()
    expected[5] = NO_CLASS
    np.testing.assert_array_equal(found.targets, expected)
    np.testing.assert_array_equal(pooled(world, "plain", "max").features,
                                  acts.max(axis=(2, 3)))
    blocks = pooled(world, "blocks")
    np.testing.assert_array_equal(blocks.targets, found.targets)
    np.testing.assert_allclose(blocks.features, found.features, rtol=1e-12)


def test_accuracy_equals_scikit_learn_by_hand(world):
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    _, _, acts, scene = world
    result = cross_validated(pooled(world, "plain"), 0.001, 5, 7, 10000)
    keep = np.arange(N) != 5
    x, y = acts.astype(np.float64).mean(axis=(2, 3))[keep], scene[keep]
    by_hand = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=7).split(x, y):
        model = LinearSVC(C=0.001, max_iter=10000, random_state=7).fit(x[train], y[train])
        by_hand.append((model.predict(x[test]) == y[test]).mean())
    np.testing.assert_allclose(result.fold_accuracy, by_hand, rtol=0, atol=1e-12)
    assert result.n_images == N - 1 and result.n_classes == 3
    assert result.chance == pytest.approx(30 / 89)
    assert result.fold_accuracy.mean() > 0.7  # the scenes are planted: well above 1/3


def test_a_rotated_basis_classifies_as_well(world):
    plain = cross_validated(pooled(world, "plain"), 0.001, 5, 0, 100000)
    rotated = cross_validated(pooled(world, "rotated"), 0.001, 5, 0, 100000)
    assert 0.6 < plain.fold_accuracy.mean() < 0.98  # neither chance nor trivially perfect
    np.testing.assert_allclose(rotated.fold_accuracy, plain.fold_accuracy, atol=1 / 18 + 1e-9)
    assert abs(rotated.fold_accuracy.mean() - plain.fold_accuracy.mean()) <= 0.012


def test_image_classes_need_exactly_one_label_of_the_category():
    labels = np.array([[5, 7, 0], [5, 5, 0], [0, 0, 0], [7, 9, 0]], np.int32)
    category = np.array([[1, 0, -1], [1, 1, -1], [-1, -1, -1], [1, 1, -1]], np.int8)
    np.testing.assert_array_equal(image_classes(labels, category, 1), [5, 5, NO_CLASS, NO_CLASS])


def test_too_few_classes_is_refused(world):
    found = pooled(world, "plain")
    with pytest.raises(ValueError, match="class"):
        cross_validated(found, 0.001, 40, 0, 1000)  # no class has 40 images


# ---------------------------------------------------------------- through the pipeline
TINY = ["model=custom", "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
        "model.layers=[conv2,conv3]", "cluster=none", "progress=false", "dataset.block_size=8",
        "scoring.quantile=0.02"]


def test_stage_probe_writes_a_keyed_row_per_layer_and_target(tmp_path, synthetic_root):
    import pandas as pd

    from pipeline.config import validate
    from pipeline.run import compose_config, run
    from storage.errors import UserError
    from storage.tables import read_table

    def compose_and_validate(args):
        validate(compose_config(args))

    base = [f"workdir={tmp_path}", f"dataset.path={synthetic_root}", "stage=probe", *TINY,
            "probe.folds=2"]
    images = pd.read_csv(synthetic_root / "index.csv")["image"]
    targets = tmp_path / "classes.csv"
    pd.DataFrame({"image": images, "class": ["even", "odd"] * (len(images) // 2)}).to_csv(
        targets, index=False)
    run(compose_config(base))
    run(compose_config([*base, f"probe.targets={targets}"]))
    run(compose_config([*base, f"probe.targets={targets}", "transform=rotate"]))
    probes = read_table(tmp_path / "results", "probes")
    assert sorted(probes.groupby(["target", "basis"]).size().items()) == [
        (("file:classes.csv", "none"), 2), (("file:classes.csv", "rotate(alpha=1,seed=0)"), 2),
        (("scene", "none"), 2)]
    assert {"model", "layer", "model_id", "pool", "c", "folds", "probe_seed", "accuracy",
            "accuracy_std", "chance", "images", "classes"} <= set(probes.columns)
    on_file = probes[probes["target"] == "file:classes.csv"]
    assert (on_file["images"] == len(images)).all() and (on_file["classes"] == 2).all()
    assert all(len(f) == 2 for f in on_file["fold_accuracy"])
    plain, rotated = (on_file[on_file["basis"] == b].sort_values("layer")["accuracy"].to_numpy()
                      for b in ("none", "rotate(alpha=1,seed=0)"))
    np.testing.assert_allclose(rotated, plain, atol=1 / len(images) + 1e-9)

    bad = tmp_path / "bad.csv"
    bad.write_text("image,class\n" + f"{images[0]},a\nnot/an/image.png,b\n")
    with pytest.raises(UserError, match=r"bad.csv: row 3: image 'not/an/image.png'"):
        run(compose_config([*base, f"probe.targets={bad}"]))
    headless = tmp_path / "headless.csv"
    headless.write_text("picture,class\n")
    with pytest.raises(UserError, match="headless.csv: no column 'image'"):
        compose_and_validate([*base, f"probe.targets={headless}"])
    with pytest.raises(UserError, match="probe.category=nowhere"):
        run(compose_config([*base, "probe.category=nowhere"]))
