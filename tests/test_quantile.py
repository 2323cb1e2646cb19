"""Exact thresholds: equal to numpy.quantile(..., method='linear') however data is chunked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.engine.blocks import LayerBlocks
from stages.thresholds.kernels import float_keys, keys_to_floats, quantile_position
from storage import activations as astore
from storage.errors import UserError
from tests.passes import exact_thresholds


def make_store(path: Path, values: np.ndarray, block: int, layer: str = "l") -> str:
    n, k, h, w = values.shape
    astore.create_store(path, [f"img{i}.jpg" for i in range(n)], {layer: (k, h, w)}, block,
                        str(values.dtype), {"model": "test"})
    for b in range(-(-n // block)):
        astore.write_block(path, b, b * block, {layer: values[b * block : (b + 1) * block]})
    astore.mark_complete(path)
    return str(path)


def reference(values: np.ndarray, q: float) -> np.ndarray:
    k = values.shape[1]
    return np.array([
        np.quantile(values[:, u].astype(np.float64).ravel(), 1 - q, method="linear")
        for u in range(k)
    ])


def assert_exact(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def random_values(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    if kind == "relu":  # mostly exact zeros: T_k = 0 for small-area units
        x = np.maximum(x - 1.5, 0)
    elif kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "constant":
        x[:] = 0.75
    elif kind == "mixed":
        x[:, 0] = 0.0  # a constant unit
        x[:, -1] = np.maximum(x[:, -1] - 2.5, 0)  # mostly zeros
        x *= rng.choice([1e-3, 1.0, 1e4], size=(1, shape[1], 1, 1)).astype(np.float32)
    return x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 23),
    k=st.integers(1, 6),
    hw=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    block=st.integers(1, 9),
    q=st.one_of(st.sampled_from([1e-4, 0.005, 0.5]), st.floats(1e-4, 0.5)),
    kind=st.sampled_from(["normal", "relu", "ties", "constant", "mixed"]),
    seed=st.integers(0, 2**31),
    budget=st.sampled_from([1, 64, 1 << 24]),  # 1 forces the three-pass radix select
)
def test_matches_numpy(tmp_path_factory, n, k, hw, block, q, kind, seed, budget):
    rng = np.random.default_rng(seed)
    values = random_values(rng, (n, k, *hw), kind)
    path = make_store(tmp_path_factory.mktemp("q") / "a.zarr", values, block)
    got = exact_thresholds(LayerBlocks(path, "l"), q, scheduler=None, candidate_budget=budget)
    assert_exact(got, reference(values, q))


@pytest.mark.parametrize("budget", [1, 1 << 24])
def test_same_thresholds_in_process_threads_and_cluster(tmp_path, budget):
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(7)
    values = random_values(rng, (57, 9, 3, 3), "mixed")
    path = make_store(tmp_path / "a.zarr", values, 5)
    blocks = LayerBlocks(path, "l")
    ref = reference(values, 0.005)
    in_process = exact_thresholds(blocks, 0.005, None, budget)
    threaded = exact_thresholds(blocks, 0.005, "threads", budget)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        distributed = exact_thresholds(blocks, 0.005, client, budget)
    assert_exact(in_process, ref)
    np.testing.assert_array_equal(in_process, threaded)
    np.testing.assert_array_equal(in_process, distributed)


class Scale:
    """A picklable per-block transform (what the rotation experiment plugs in)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -x * self.factor


def test_per_block_transform(tmp_path):
    rng = np.random.default_rng(1)
    values = random_values(rng, (30, 4, 2, 3), "normal")
    path = make_store(tmp_path / "a.zarr", values, 7)
    got = exact_thresholds(LayerBlocks(path, "l", Scale(2.0)), 0.01, "threads")
    assert_exact(got, reference((-values * 2.0).astype(np.float32), 0.01))


def test_float16_store(tmp_path):
    rng = np.random.default_rng(2)
    values = random_values(rng, (20, 3, 4, 4), "normal").astype(np.float16)
    path = make_store(tmp_path / "a.zarr", values, 6)
    for budget in (1, 1 << 24):
        got = exact_thresholds(LayerBlocks(path, "l"), 0.005, None, budget)
        assert_exact(got, reference(values.astype(np.float32), 0.005))


def test_nan_activation_names_model_layer_unit(tmp_path):
    values = np.ones((6, 3, 2, 2), dtype=np.float32)
    values[4, 2, 1, 0] = np.nan
    path = make_store(tmp_path / "a.zarr", values, 4, layer="layer4")
    with pytest.raises(UserError, match=r"model 'test' layer 'layer4' unit 2: NaN"):
        exact_thresholds(LayerBlocks(path, "layer4"), 0.005)


def test_float_keys_order_and_round_trip():
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 1000),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45], dtype=np.float32),
    ]).astype(np.float32)
    keys = float_keys(torch.from_numpy(x)).numpy()
    assert keys.min() >= 0 and keys.max() < 2**32
    np.testing.assert_array_equal(keys_to_floats(keys).view(np.uint32), x.view(np.uint32))
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(x[order].astype(np.float64)) >= 0)


def test_quantile_position_matches_numpy_definition():
    for n in (1, 2, 3, 10, 4999, 12345):
        for q in (1e-4, 0.005, 0.25, 0.5):
            lo, hi, gamma = quantile_position(n, q)
            v = np.arange(n, dtype=np.float64) ** 2
            expected = np.quantile(v, 1 - q, method="linear")
            assert abs(v[lo] + gamma * (v[hi] - v[lo]) - expected) <= 1e-9 * max(1, expected)
