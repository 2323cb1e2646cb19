"""Dask plumbing shared by every pass and writer: what a ``scheduler`` value is, progress
bars, waiting on a cluster that may lose its workers, and block writers.

A ``scheduler`` is None (in-process), a local scheduler name (``"threads"``, ``"sync"``), a
:class:`Cluster` (a distributed client and how long to wait when it has no worker), or a
plain ``distributed.Client``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
from tqdm.auto import tqdm
from tqdm.dask import TqdmCallback

from storage.errors import UserError

NO_WORKER_GRACE = 60.0  # seconds without any Dask worker before a pass gives up


@dataclass(frozen=True)
class Cluster:
    """A distributed client and the seconds to wait while it has no worker at all."""

    client: Any
    no_worker_timeout: float = NO_WORKER_GRACE


def distributed_client(scheduler: Any) -> Cluster | None:
    """The scheduler as a :class:`Cluster` when it is a distributed one, else None."""
    if scheduler is None or isinstance(scheduler, str):
        return None
    if isinstance(scheduler, Cluster):
        return scheduler
    from distributed import Client

    return Cluster(scheduler) if isinstance(scheduler, Client) else None


def parallelism(scheduler: Any) -> int:
    """How many chunks a scheduler runs at once (threads of all workers on a cluster)."""
    cluster = distributed_client(scheduler)
    if cluster is not None:
        try:
            return max(1, sum(cluster.client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a client that cannot answer: assume a few
            return 4
    if scheduler in (None, "sync", "synchronous", "single-threaded"):
        return 1
    return os.cpu_count() or 1


@contextmanager
def one_torch_thread_per_task(scheduler: Any) -> Iterator[None]:
    """Dask's threaded scheduler already runs one block per core; torch's own intra-op
    threads on top would oversubscribe the cores (measured: stalls of a waiting thread).
    A pass whose statistics need no torch (the compiled CPU tally) has not imported it, and
    is not made to."""
    torch = sys.modules.get("torch")
    if scheduler != "threads" or torch is None:
        yield
        return

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute(*objs, scheduler: Any = "threads", desc: str = "compute", progress: bool = True,
            unit: str = "task", unit_scale: int = 1):
    """``dask.compute`` with a progress bar on local schedulers, and on a distributed
    cluster with the no-worker watchdog.  ``scheduler=None`` means in-process."""
    cluster = distributed_client(scheduler)
    if cluster is not None:
        futures = cluster.client.compute(list(objs))
        wait_with_workers(cluster, futures)
        return tuple(cluster.client.gather(futures))
    scheduler = scheduler or "sync"
    if progress:
        with TqdmCallback(desc=desc, unit=unit, unit_scale=unit_scale, leave=False, disable=None):
            return dask.compute(*objs, scheduler=scheduler)
    return dask.compute(*objs, scheduler=scheduler)


def wait_with_workers(cluster: Cluster, futures: list,
                      on_done: Callable[[Any], None] | None = None) -> None:
    """Wait for ``futures`` (``on_done`` is called on each as it finishes); if the cluster
    has had no worker for ``cluster.no_worker_timeout`` seconds, stop with one line instead
    of waiting forever."""
    from distributed import wait

    client, grace = cluster.client, cluster.no_worker_timeout
    pending, alone_since = set(futures), None
    while pending:
        try:
            done, pending = wait(pending, timeout=2, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        for future in done:
            if on_done is not None:
                on_done(future)
        if done or client.scheduler_info().get("workers"):
            alone_since = None
            continue
        alone_since = alone_since or time.monotonic()
        if time.monotonic() - alone_since > grace:
            raise UserError(f"no Dask worker left on {client.scheduler.address} for {grace:g} s; "
                            "start workers (or use another cluster) and run the same command "
                            "again")


def _nth(func: Callable[[Any], Any], blocks: Sequence[Any], index: int) -> Any:
    return func(blocks[index])


def map_blocks(func: Callable[[Any], Any], blocks: Sequence[Any], scheduler: Any = "threads",
               desc: str = "blocks", progress: bool = True, unit_scale: int = 1,
               unit: str = "img") -> list[Any]:
    """Run ``func(item)`` for each block item (writers: extract, concept store).

    On a distributed cluster the blocks are submitted as separate futures so a progress
    bar can tick per block; elsewhere they are one dask.compute call.
    """
    if not blocks:
        return []
    cluster = distributed_client(scheduler)
    if cluster is None:
        # by position: dask would walk every record of every block item to look for
        # collections in it (a tenth of a concept store build's time)
        tasks = [dask.delayed(partial(_nth, func, blocks), pure=False)(i)
                 for i in range(len(blocks))]
        return list(compute(*tasks, scheduler=scheduler, desc=desc, progress=progress,
                            unit=unit, unit_scale=unit_scale))
    futures = cluster.client.map(func, list(blocks), pure=False)
    results = {}
    with tqdm(total=len(blocks) * unit_scale, desc=desc, unit=unit,
              disable=None if progress else True) as bar:

        def collect(future) -> None:
            results[future.key] = future.result()
            bar.update(unit_scale)

        wait_with_workers(cluster, futures, collect)
    return [results[f.key] for f in futures]
