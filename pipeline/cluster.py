"""The Dask scheduler a run uses: in-process, threads, a LocalCluster, a remote scheduler,
or dask-cuda's LocalCUDACluster.  Stages receive the result as a plain ``scheduler`` value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage.errors import UserError

log = logging.getLogger("netdissect")
KINDS = ("none", "threads", "local", "cuda")


def worker_env(threads: int) -> dict[str, str]:
    """Worker environment: glibc's mmap threshold fixed (torch workers ran ~40% slower with
    the adaptive one) and one BLAS/OpenMP pool per worker thread budget."""
    return {
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def dask_scheduler(cluster: Any) -> Iterator[Any]:
    """Yield what stages take as ``scheduler``: None (in-process), "threads", or a Client."""
    kind = cluster.get("kind", "local")
    address = cluster.get("address")
    if kind not in KINDS:
        raise UserError(f"cluster.kind={kind!r}: choose one of {', '.join(KINDS)}")
    if address:
        from distributed import Client

        try:
            client = Client(address, timeout="20s")
        except OSError as exc:
            raise UserError(f"cluster.address={address}: cannot reach the scheduler ({exc})") from None
        log.info("dask: using scheduler %s (dashboard %s)", address, client.dashboard_link)
        print(f"Dask dashboard: {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return
    if kind == "none":
        yield None
        return
    if kind == "threads":
        yield "threads"
        return
    from distributed import Client

    if kind == "cuda" and not _has_gpu():
        log.info("cluster=cuda: no GPU on this machine; using a CPU LocalCluster instead")
        kind = "local"
    if kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise UserError("cluster=cuda needs dask-cuda: pip install '.[gpu]'") from None
        local = LocalCUDACluster()
    else:
        from distributed import LocalCluster

        threads = int(cluster.get("threads_per_worker") or 1)
        n_workers = cluster.get("n_workers") or max(1, (os.cpu_count() or 1) // threads)
        local = LocalCluster(
            n_workers=int(n_workers),
            threads_per_worker=threads,
            processes=True,
            memory_limit=cluster.get("memory_limit", "auto"),
            env=worker_env(threads),
            dashboard_address=":0",
            silence_logs=False,
        )
    client = Client(local)
    log.info("dask: %s with %d workers", type(local).__name__, len(local.workers))
    print(f"Dask dashboard: {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
        local.close()
