"""The Dask scheduler a run uses: in-process, threads, a LocalCluster, a remote scheduler, or
dask-cuda's LocalCUDACluster — started on first use, so a run that finds everything current
starts no cluster and prints no dashboard.  Stages receive a plain ``scheduler`` value.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from pipeline.config import ClusterKind, ClusterOptions
from stages.engine.dask import Cluster
from storage.errors import UserError

log = logging.getLogger("netdissect")


def worker_env(threads: int) -> dict[str, str]:
    """Worker environment: glibc's mmap threshold fixed (torch workers ran ~40% slower with
    the adaptive one), one BLAS/OpenMP pool per worker thread budget, and Dask's own logs at
    critical only (a task's error reaches the user once, as one line, from this process)."""
    return {
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "DASK_LOGGING__DISTRIBUTED": "critical",
    }


def quiet_distributed() -> None:
    """Distributed sets its loggers to INFO when imported: import it, then keep errors only."""
    import distributed  # noqa: F401 - configures its loggers on import; override after

    for name in list(logging.root.manager.loggerDict) + ["distributed", "tornado", "bokeh"]:
        if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)


class LazyScheduler:
    """Callable giving what stages take as ``scheduler``: None (in-process), "threads", or a
    distributed :class:`~stages.engine.dask.Cluster`, made the first time it is called and
    closed with the run."""

    def __init__(self, options: ClusterOptions, stack: ExitStack):
        self.options, self.stack = options, stack
        self.value: Any = None
        self.started = False

    def __call__(self) -> Any:
        if not self.started:
            self.value = self._start()
            self.started = True
        return self.value

    def _start(self) -> Any:
        o = self.options
        if o.address or o.kind not in (ClusterKind.none, ClusterKind.threads):
            quiet_distributed()
        if o.address:
            from distributed import Client

            try:
                client = Client(o.address, timeout="20s")
            except OSError as exc:
                raise UserError(f"cluster.address={o.address}: cannot reach the scheduler "
                                f"({exc})") from None
            self.stack.callback(client.close)
            try:
                client.wait_for_workers(1, timeout=o.worker_wait)
            except TimeoutError:
                raise UserError(f"cluster.address={o.address}: the scheduler has no workers "
                                f"(waited {o.worker_wait:g} s); start some with dask worker "
                                f"{o.address}") from None
            log.info("dask: scheduler %s (dashboard %s)", o.address, client.dashboard_link)
            return Cluster(client, o.no_worker_timeout)
        if o.kind == ClusterKind.none:
            return None
        if o.kind == ClusterKind.threads:
            return "threads"
        return self._local_cluster()

    def _local_cluster(self) -> Any:
        from distributed import Client

        from stages.network.models import has_gpu

        o = self.options
        kind = o.kind
        if kind == ClusterKind.cuda and not has_gpu():
            log.info("cluster=cuda: no GPU on this machine; using a CPU LocalCluster instead")
            kind = ClusterKind.local
        if kind == ClusterKind.cuda:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise UserError("cluster=cuda needs dask-cuda: pip install -e '.[gpu]'") from None
            cluster = LocalCUDACluster(dashboard_address=":0")
        else:
            from distributed import LocalCluster

            threads = o.threads_per_worker
            n_workers = o.n_workers or max(1, (os.cpu_count() or 1) // threads)
            # worker processes inherit an ignored SIGINT: Ctrl-C reaches only this process,
            # which closes the cluster; no worker prints its own KeyboardInterrupt
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=threads, processes=True,
                    memory_limit=o.memory_limit, env=worker_env(threads),
                    dashboard_address=":0", silence_logs=logging.CRITICAL,
                )
            finally:
                signal.signal(signal.SIGINT, previous)
        self.stack.callback(cluster.close)
        client = Client(cluster)
        self.stack.callback(client.close)
        log.info("dask: %s with %d workers (dashboard %s)", type(cluster).__name__,
                 len(cluster.workers), client.dashboard_link)
        return Cluster(client, o.no_worker_timeout)


@contextmanager
def dask_scheduler(options: ClusterOptions) -> Iterator[LazyScheduler]:
    """A :class:`LazyScheduler` whose cluster, if one was started, closes on exit."""
    with ExitStack() as stack:
        yield LazyScheduler(options, stack)
