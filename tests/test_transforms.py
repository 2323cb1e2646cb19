"""The paper's experiments on the cache: basis transforms (rotation Q^α, PCA, linear maps and
sparse-autoencoder latents) and input perturbations, exact and keyed in the same tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.run import compose_config, run
from stages.bases.transforms import (
    LinearMap,
    activate,
    fractional_power,
    load_linear,
    pca_basis,
    random_rotation,
)
from stages.concepts import ConceptsConfig, build_concept_store
from stages.engine.blocks import LayerBlocks
from stages.engine.reduction import reduce_in_process
from stages.iou import iou_frame, units_frame
from stages.network.perturb import Perturbation
from stages.tally.labels import label_space
from stages.tally.statistic import TallyRule
from storage.errors import UserError
from storage.tables import read_table
from tests.broden_factory import BrodenBuilder
from tests.passes import exact_thresholds, tally_pass
from tests.test_iou import write_activations
from tests.test_quantile import make_store, random_values, reference

TINY = ["model=custom", "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
        "model.layers=[conv2,conv3]", "cluster=none", "progress=false", "dataset.block_size=8",
        "scoring.quantile=0.02"]
COUNTS = ["layer", "unit", "label", "intersection", "label_area", "unit_area", "union_area", "iou"]


# ---------------------------------------------------------------- the rotation
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_random_rotation_is_in_so_k_and_powers_compose(k):
    q = random_rotation(k, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(k), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_array_equal(fractional_power(q, 0), np.eye(k))
    np.testing.assert_array_equal(fractional_power(q, 1), q)
    for a, b in ((0.3, 0.5), (0.25, 0.75), (0.6, 0.6)):
        qa, qb = fractional_power(q, a), fractional_power(q, b)
        np.testing.assert_allclose(qa @ qb, fractional_power(q, a + b), atol=1e-10)
        np.testing.assert_allclose(qa @ qa.T, np.eye(k), atol=1e-10)
        assert np.linalg.det(qa) == pytest.approx(1.0)
    half = fractional_power(q, 0.5)
    np.testing.assert_allclose(half @ half, q, atol=1e-10)


def test_rotation_draws_differ_by_seed_and_handle_a_turn_by_pi():
    assert not np.allclose(random_rotation(6, 0), random_rotation(6, 1))
    basis = random_rotation(4, 9)
    turned = basis @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ basis.T  # eigenvalues -1, -1, 1, 1
    half = fractional_power(turned, 0.5)
    np.testing.assert_allclose(half @ half, turned, atol=1e-10)
    with pytest.raises(ValueError, match="odd number"):
        fractional_power(np.diag([-1.0, 1.0, 1.0]), 0.5)


def _basis_file(tmp_path: Path, weight: np.ndarray) -> str:
    path = tmp_path / "basis.npz"
    np.savez(path, weight=weight, bias=np.zeros(weight.shape[0]))
    return str(path)


def test_thresholds_on_the_rotated_cache_equal_numpy_on_an_explicit_rotation(tmp_path):
    values = random_values(np.random.default_rng(4), (37, 6, 3, 4), "mixed")
    path = make_store(tmp_path / "a.zarr", values, 5)
    q = fractional_power(random_rotation(6, seed=1), 0.4)
    rotated = np.einsum("ok,nkhw->nohw", q, values.astype(np.float64)).astype(np.float32)
    for budget in (1, 1 << 24):
        got = exact_thresholds(LayerBlocks(path, "l", LinearMap(_basis_file(tmp_path, q))),
                               0.02, None, budget)
        np.testing.assert_allclose(got, reference(rotated, 0.02), rtol=1e-6)


def test_linear_map_activations():
    y = torch.tensor([[[[3.0]], [[-1.0]], [[2.0]], [[2.0]]]])  # one vector of 4 latents
    assert activate(y, "relu").flatten().tolist() == [3.0, 0.0, 2.0, 2.0]
    assert activate(y, "topk:1").flatten().tolist() == [3.0, 0.0, 0.0, 0.0]
    assert activate(y, "topk:2").flatten().tolist() == [3.0, 0.0, 2.0, 2.0]  # ties kept


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors", "sae.pt"])
def test_linear_files(tmp_path, suffix):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((7, 3)), rng.standard_normal(7)
    path = tmp_path / f"m{suffix}"
    if suffix == ".npy":
        np.save(path, w)
        b = np.zeros(7)
    elif suffix == ".npz":
        np.savez(path, W=w, b=b)
    elif suffix == ".pt":
        torch.save({"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"weight": w, "bias": b}, str(path))
    else:  # a sparse autoencoder's encoder: (a - b_dec) W_enc + b_enc
        b_dec = rng.standard_normal(3)
        torch.save({"W_enc": torch.from_numpy(w.T.copy()), "b_enc": torch.from_numpy(b),
                    "b_dec": torch.from_numpy(b_dec), "W_dec": torch.zeros(7, 3)}, path)
        b = b - w @ b_dec
    got_w, got_b = load_linear(path, 3)
    np.testing.assert_allclose(got_w, w)
    np.testing.assert_allclose(got_b, b)
    with pytest.raises(UserError, match=r"the layer has 4 units"):
        load_linear(path, 4)


# ---------------------------------------------------------------- PCA
def test_pca_axes_match_numpy_eigendecomposition(tmp_path):
    from stages.bases.covariance import Covariance
    from stages.engine.reduction import Pass

    rng = np.random.default_rng(8)
    mixing = rng.standard_normal((5, 5)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2])
    values = np.einsum("ok,nkhw->nohw", mixing,
                       rng.standard_normal((40, 5, 3, 3))).astype(np.float32) + 2.0
    path = make_store(tmp_path / "a.zarr", values, 6)
    (moments,) = reduce_in_process(Pass(LayerBlocks(path, "l"), (Covariance(),)),
                                range(7))
    x = values.transpose(0, 2, 3, 1).reshape(-1, 5).astype(np.float64)
    cov = np.cov(x, rowvar=False)
    weight, bias, variances = pca_basis(moments.mean, moments.scatter / (len(x) - 1), False)
    ref_var, ref_vec = np.linalg.eigh(cov)
    np.testing.assert_allclose(variances, ref_var[::-1], rtol=1e-9)
    for axis, ref in zip(weight, ref_vec[:, ::-1].T, strict=True):
        assert abs(abs(axis @ ref) - 1) < 1e-9  # the same axis up to sign
        assert axis[np.argmax(np.abs(axis))] > 0  # signed: largest entry positive
    np.testing.assert_allclose(bias, -weight @ x.mean(axis=0), atol=1e-9)
    projected = (x - x.mean(axis=0)) @ weight.T
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.diag(variances), atol=1e-9)
    white, _, _ = pca_basis(moments.mean, moments.scatter / (len(x) - 1), True)
    np.testing.assert_allclose(np.cov((x - x.mean(axis=0)) @ white.T, rowvar=False), np.eye(5),
                               atol=1e-9)


# ---------------------------------------------------------------- through the pipeline
def _tables(workdir: Path, transform: str) -> pd.DataFrame:
    frame = read_table(workdir / "results", "iou")
    frame = frame[frame["basis"] == transform]
    return frame[COUNTS].sort_values(COUNTS[:3]).reset_index(drop=True)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, synthetic_root) -> Path:
    wd = tmp_path_factory.mktemp("transforms") / "wd"
    _run(wd, synthetic_root)
    return wd


def _run(wd: Path, synthetic_root: Path, *extra: str):
    return run(compose_config([f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=iou",
                               *TINY, *extra]))


def test_alpha_zero_reproduces_the_untransformed_tables_exactly(scored, synthetic_root):
    _run(scored, synthetic_root, "transform=rotate", "transform.alpha=0")
    base = _tables(scored, "none")
    assert len(base) and base["intersection"].sum() > 0
    pd.testing.assert_frame_equal(_tables(scored, "rotate(alpha=0,seed=0)"), base)
    units = read_table(scored / "results", "units")
    a, b = (units[units["basis"] == t].sort_values(["layer", "unit"])["threshold"].to_numpy()
            for t in ("none", "rotate(alpha=0,seed=0)"))
    np.testing.assert_array_equal(a, b)


def test_identity_linear_map_reproduces_the_unit_tables_exactly(scored, synthetic_root, tmp_path):
    eye = tmp_path / "identity.npy"
    np.save(eye, np.eye(16))
    _run(scored, synthetic_root, "transform=linear", f"transform.path={eye}")
    units = read_table(scored / "results", "units")
    (name,) = {t for t in units["basis"] if t.startswith("linear(")}
    assert name.startswith("linear(file=identity.npy,sha=") and name.endswith(",activation=none)")
    cols = ["layer", "unit", "label", "concept", "iou", "threshold", "is_detector"]
    a, b = (units[units["basis"] == t][cols].sort_values(["layer", "unit"])
            .reset_index(drop=True) for t in ("none", name))
    pd.testing.assert_frame_equal(a, b)


def test_rotation_sweep_and_pca_rows_are_keyed_by_transform(scored, synthetic_root):
    for alpha in ("0.5", "1"):
        _run(scored, synthetic_root, "transform=rotate", f"transform.alpha={alpha}")
    _run(scored, synthetic_root, "transform=pca", "transform.whiten=true")
    layers = read_table(scored / "results", "layers")
    assert {"rotate(alpha=0.5,seed=0)", "rotate(alpha=1,seed=0)", "pca(whiten=true)"} <= set(
        layers["basis"])
    rotated = _tables(scored, "rotate(alpha=1,seed=0)")
    assert not rotated["intersection"].equals(_tables(scored, "none")["intersection"])
    # the report shows them as their own labelled pages, with strips
    run(compose_config([f"workdir={scored}", "stage=report", "cluster=none", "progress=false"]))
    index = (scored / "report" / "index.html").read_text()
    for name in ("rotate(alpha=1,seed=0)", "pca(whiten=true)"):
        assert f"basis {name}" in index, name
    pages = list((scored / "report").rglob("*~*basis*pca*.html"))
    assert pages and "<img" in pages[0].read_text()


def test_planted_sae_latent_is_found_as_its_labels_detector(tmp_path, synthetic_root):
    """Two units each carry half of a label's mask mixed with noise; an 'SAE' latent that
    adds them back is an exact detector of the label, which no single unit is."""
    store = build_concept_store(ConceptsConfig(synthetic_root, tmp_path / "c.zarr", 8, False),
                                None)
    space = label_space(store, None)
    block = store.read_block(0, store.n_images)
    counts = [(block.pixel_labels == n).sum() for n in space.numbers]
    target = int(space.numbers[int(np.argmax(counts))])
    mask = (block.pixel_labels == target).any(axis=1).astype(np.float32)  # (N, 56, 56)
    rng = np.random.default_rng(0)
    noise = 2 * rng.random(mask.shape).astype(np.float32)
    ramp = np.linspace(0, 0.5, 56, dtype=np.float32)[None, None, :]  # distinct values in the mask
    acts = np.stack([mask * (0.5 + ramp) + noise, mask * 0.5 - noise,
                     rng.random(mask.shape, dtype=np.float32)], axis=1)  # (N, 3, 56, 56)
    path = tmp_path / "a.zarr"
    write_activations(path, store.image_paths(), {"l": acts}, 8)
    sae = np.zeros((4, 3))
    sae[2] = [1.0, 1.0, 0.0]  # latent 2 = unit 0 + unit 1 = the label's mask, graded
    sae[0], sae[1], sae[3] = [1, 0, 0], [0, 1, 0], [0, 0, 1]
    blocks = LayerBlocks(str(path), "l", LinearMap(_basis_file(tmp_path, sae), "relu"))
    q = float(mask.mean()) * 0.9  # the top fraction of values inside the mask
    thresholds = exact_thresholds(blocks, q)
    (counts,) = reduce_in_process(tally_pass(blocks, str(store.path), thresholds, space,
                                             TallyRule(union="global")),
                                  range(blocks.n_blocks()))
    units = units_frame(iou_frame(counts, space, {}), thresholds, 0.04)
    latent = units.set_index("unit").loc[2]
    assert latent["label"] == target and latent["iou"] > 0.85 and latent["is_detector"]
    plain = tally_pass(LayerBlocks(str(path), "l"), str(store.path),
                       exact_thresholds(LayerBlocks(str(path), "l"), q), space,
                       TallyRule(union="global"))
    (plain_counts,) = reduce_in_process(plain, range(blocks.n_blocks()))
    best_unit = units_frame(iou_frame(plain_counts, space, {}), thresholds, 0.04)["iou"].max()
    assert best_unit < latent["iou"] - 0.2


# ---------------------------------------------------------------- perturbations
def _red_patch_dataset(root: Path) -> Path:
    """Images whose red rectangles are exactly the pixels of label 'box' (16 x 16 planes at
    half the image size), off-centre so that a rotation moves them."""
    b = BrodenBuilder(root, ["object"], ih=32, iw=32, sh=16, sw=16)
    b.label(5, "box", object=0.2)
    b.label(6, "floor", object=0.5)
    planes = []
    for i in range(12):
        rng = np.random.default_rng(i)
        plane = np.full((16, 16), 6)
        y, x = rng.integers(0, 8, 2)
        plane[y : y + int(rng.integers(3, 8)), x : x + int(rng.integers(3, 8))] = 5
        planes.append(plane)
        b.image(name=f"img/{i:02d}.png", planes={"object": [plane]})
    root = b.write()
    for i, plane in enumerate(planes):
        image = np.zeros((32, 32, 3), np.uint8)
        image[..., 2] = 90
        image[np.kron(plane == 5, np.ones((2, 2), bool))] = (230, 20, 20)
        Image.fromarray(image).save(root / "images" / f"img/{i:02d}.png")
    return root


@pytest.mark.parametrize("perturb", ["rotate:90", "shuffle:4"])
def test_geometric_perturbation_moves_labels_with_the_image(tmp_path, perturb):
    data = _red_patch_dataset(tmp_path / "data")
    base = [f"workdir={tmp_path / 'wd'}", f"dataset.path={data}", "stage=iou", "model=custom",
            "model.factory=tests.tiny_models:red_detector", "model.weights=none",
            "model.layers=[red]", "cluster=none", "progress=false", "scoring.quantile=0.2"]
    run(compose_config(base))
    run(compose_config([*base, f"extract.perturb={perturb}"]))
    iou = read_table(tmp_path / "wd" / "results", "iou")
    box = iou[iou["concept"] == "box"].set_index("perturbation")
    assert set(box.index) == {"none", str(Perturbation.parse(perturb))}
    plain, moved = box.loc["none"], box.loc[str(Perturbation.parse(perturb))]
    assert plain["iou"] > 0.5  # the unit detects the label
    for col in ("intersection", "label_area", "unit_area", "iou"):
        assert moved[col] == plain[col], col
    assert box["model_id"].nunique() == 2  # a perturbed run is its own identity and cache


def test_zero_noise_reproduces_the_unperturbed_tables(scored, synthetic_root):
    _run(scored, synthetic_root, "extract.perturb=noise:0")
    iou = read_table(scored / "results", "iou")
    a, b = (iou[(iou["perturbation"] == p) & (iou["basis"] == "none")][COUNTS]
            .sort_values(COUNTS[:3]).reset_index(drop=True)
            for p in ("none", "noise:0,seed=0"))
    pd.testing.assert_frame_equal(a, b)


def test_perturbation_values_are_checked_before_work(tmp_path, synthetic_root):
    for bad in ("noise:-1", "spin:3", "shuffle:0", "rotate:x"):
        with pytest.raises(UserError, match="extract.perturb="):
            _run(tmp_path, synthetic_root, f"extract.perturb={bad}")
    with pytest.raises(UserError, match="shuffle:3.*divides"):
        _run(tmp_path / "w", synthetic_root, "extract.perturb=shuffle:3")


def test_rotation_summary_is_the_mean_and_std_over_seeds(synthetic_root, tmp_path):
    from pipeline.api import rotation_summary

    base = [f"workdir={tmp_path / 'wd'}", f"dataset.path={synthetic_root}", "stage=iou",
            "cluster=none", "progress=false", "model=custom", "model.weights=none",
            "model.factory=tests.tiny_models:tiny_cnn", "model.layers=[conv3]",
            "scoring.quantile=0.05"]
    run(compose_config(base))  # unrotated rows: left out
    for alpha in (0.5, 1):
        for seed in (0, 1, 2):
            run(compose_config([*base, "transform=rotate", f"transform.alpha={alpha}",
                                f"transform.seed={seed}"]))
    summary = rotation_summary(tmp_path / "wd")
    layers = read_table(tmp_path / "wd" / "results", "layers")
    rotated = layers[layers["basis"].str.startswith("rotate(")]
    assert len(summary) == 2 * rotated["category"].nunique()
    for row in summary.itertuples():
        rows = rotated[(rotated["category"] == row.category)
                       & rotated["basis"].str.contains(f"alpha={row.alpha:g},")]
        assert len(rows) == row.seeds == 3
        assert row.detectors_mean == rows["detectors"].mean()
        assert row.detectors_std == pytest.approx(np.std(rows["detectors"], ddof=1))
        assert row.unique_concepts_mean == rows["unique_concepts"].mean()
        assert row.unique_concepts_std == pytest.approx(np.std(rows["unique_concepts"], ddof=1))
