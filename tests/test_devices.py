"""The CUDA code paths, tested where no GPU is: device selection, fallbacks and the worker
configuration (the kernels themselves are device-agnostic torch and run under every test)."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

import pytest
import torch

import stages.network.models as models_mod
from pipeline.cluster import LazyScheduler, worker_env
from pipeline.config import ClusterKind, ClusterOptions
from pipeline.run import compose_config, run
from stages.engine.blocks import LayerBlocks
from stages.network.models import pick_device
from storage.errors import UserError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")


def test_auto_device_is_the_cpu_without_a_gpu():
    assert pick_device("auto") == "cpu"
    assert LayerBlocks("x.zarr", "l", device="auto").resolved_device() == "cpu"
    assert pick_device("cpu") == "cpu"


def test_asking_for_cuda_without_a_gpu_is_one_line_before_work(tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=f"extract.device={device}: this machine has no CUDA"):
            run(compose_config([f"workdir={tmp_path}", "stage=extract", f"extract.device={device}"]))
    assert not any(tmp_path.iterdir())


def test_cluster_cuda_without_a_gpu_falls_back_to_a_cpu_local_cluster(caplog):
    caplog.set_level(logging.INFO, logger="netdissect")
    with ExitStack() as stack:
        client = LazyScheduler(ClusterOptions(kind=ClusterKind.cuda, n_workers=1), stack)().client
        assert type(client).__name__ == "Client"
        assert len(client.scheduler_info()["workers"]) == 1
    assert "no GPU on this machine; using a CPU LocalCluster" in caplog.text


def test_cluster_cuda_with_a_gpu_but_no_dask_cuda_is_one_line(monkeypatch):
    """Where a GPU is but dask-cuda is not installed: never a LocalCUDACluster, one line."""
    monkeypatch.setattr(models_mod, "has_gpu", lambda: True)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with ExitStack() as stack, pytest.raises(UserError, match=r"pip install -e '\.\[gpu\]'"):
        LazyScheduler(ClusterOptions(kind=ClusterKind.cuda), stack)()


def test_lazy_scheduler_starts_nothing_until_asked():
    with ExitStack() as stack:
        lazy = LazyScheduler(ClusterOptions(kind=ClusterKind.local), stack)
        assert not lazy.started
    assert LazyScheduler(ClusterOptions(kind=ClusterKind.threads), ExitStack())() == "threads"
    assert LazyScheduler(ClusterOptions(kind=ClusterKind.none), ExitStack())() is None


def test_worker_environment_pins_thread_pools_and_quiets_dask():
    env = worker_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["DASK_LOGGING__DISTRIBUTED"] == "critical"


def test_auto_asks_torch_only_where_a_cuda_driver_loads(monkeypatch):
    """Without a loadable CUDA driver "auto" is the CPU, decided without torch; with one,
    torch decides (here it finds no GPU and says the CPU)."""
    import ctypes

    import stages.engine.blocks as blocks_mod

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or False)
    for loads in (False, True):
        def cdll(name, loads=loads):
            if not loads:
                raise OSError(f"{name}: cannot open shared object file")

        monkeypatch.setattr(ctypes, "CDLL", cdll)
        blocks_mod.cuda_driver_loadable.cache_clear()
        assert blocks_mod.cuda_driver_loadable() is loads
        assert LayerBlocks("x.zarr", "l", device="auto").resolved_device() == "cpu"
        assert len(asked) == int(loads)
    blocks_mod.cuda_driver_loadable.cache_clear()
