"""One abstraction for both heavy statistics: a block reduction.

A :class:`BlockReduction` turns one block of inputs into a small partial result
(``chunk``), merges partials associatively (``combine``) and turns the final partial into
the answer (``finish``) — the shape of dask's ``reduction(chunk, combine, aggregate)``.
The same object runs in-process (:func:`reduce_in_process`) and as a Dask tree reduction
(:func:`reduce_with_dask`) on any scheduler: ``"sync"``, ``"threads"``, ``"processes"`` or
a ``distributed.Client``.  Partials are plain numpy arrays so they travel between processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import dask
from dask.callbacks import Callback
from tqdm.auto import tqdm

P = TypeVar("P")


class BlockReduction(Protocol[P]):
    def chunk(self, block_index: int) -> P: ...

    def combine(self, partials: Sequence[P]) -> P: ...

    def finish(self, partial: P) -> Any: ...


def reduce_in_process(reduction: BlockReduction, blocks: Iterable[int]) -> Any:
    """Run chunk/combine/finish sequentially: the reference semantics of every runner."""
    acc = None
    for index in blocks:
        part = reduction.chunk(index)
        acc = part if acc is None else reduction.combine([acc, part])
    if acc is None:
        raise ValueError("no blocks to reduce")
    return reduction.finish(acc)


def _chunk(reduction: BlockReduction, index: int):
    return reduction.chunk(index)


def _combine(reduction: BlockReduction, *partials):
    return reduction.combine(list(partials))


def reduction_graph(reduction: BlockReduction, blocks: Sequence[int], split_every: int = 8):
    """A dask.delayed tree: chunk per block, combine ``split_every`` partials per node."""
    if not blocks:
        raise ValueError("no blocks to reduce")
    layer = [dask.delayed(_chunk, pure=False)(reduction, i) for i in blocks]
    while len(layer) > 1:
        layer = [
            dask.delayed(_combine, pure=False)(reduction, *layer[i : i + split_every])
            for i in range(0, len(layer), split_every)
        ]
    return layer[0]


def reduce_with_dask(
    reduction: BlockReduction,
    blocks: Sequence[int],
    scheduler: Any = "threads",
    desc: str = "reduce",
    split_every: int = 8,
    progress: bool = True,
) -> Any:
    """Tree-reduce on a Dask scheduler; the finish step runs here, on the caller.

    Blocks go in waves of a few per worker thread, each wave one tree whose result joins
    the running partial: schedulers are free to run every ready chunk before any combine,
    so one graph over all blocks could hold a partial per block; waves bound that by the
    wave size, whatever the number of images.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("no blocks to reduce")
    wave = max(split_every, 8 * _parallelism(scheduler))
    acc = None
    bar = tqdm(total=len(blocks), desc=desc, unit="block", leave=False,
               disable=None if progress else True)
    for start in range(0, len(blocks), wave):
        part_blocks = blocks[start : start + wave]
        graph = reduction_graph(reduction, part_blocks, split_every)
        (part,) = compute(graph, scheduler=scheduler, desc=desc, progress=False)
        acc = part if acc is None else reduction.combine([acc, part])
        bar.update(len(part_blocks))
    bar.close()
    return reduction.finish(acc)


def reduce_blocks(
    reduction: BlockReduction,
    n_blocks: int,
    scheduler: Any = None,
    desc: str = "reduce",
    progress: bool = True,
    split_every: int = 8,
) -> Any:
    """Reduce blocks 0..n_blocks-1: in-process when ``scheduler`` is None, else on Dask."""
    blocks = list(range(n_blocks))
    if scheduler is None:
        return reduce_in_process(reduction, blocks)
    return reduce_with_dask(reduction, blocks, scheduler, desc, split_every, progress)


def _parallelism(scheduler: Any) -> int:
    """How many chunks a scheduler runs at once (threads of all workers on a Client)."""
    if _is_client(scheduler):
        try:
            return max(1, sum(scheduler.nthreads().values()))
        except Exception:  # noqa: BLE001 - a client that cannot answer: assume a few
            return 4
    if scheduler in (None, "sync", "synchronous", "single-threaded"):
        return 1
    return os.cpu_count() or 1


class _TqdmCallback(Callback):
    """Progress for the local schedulers: one tick per finished task."""

    def __init__(self, desc: str, unit: str = "task", scale: int = 1):
        super().__init__()
        self.desc, self.unit, self.scale = desc, unit, scale
        self.bar = None

    def _start_state(self, dsk, state):
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self.bar = tqdm(total=total * self.scale, desc=self.desc, unit=self.unit, leave=False,
                        disable=None)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bar.update(self.scale)

    def _finish(self, dsk, state, errored):
        if self.bar is not None:
            self.bar.close()


def compute(
    *objs,
    scheduler: Any = "threads",
    desc: str = "compute",
    progress: bool = True,
    unit: str = "task",
    scale: int = 1,
):
    """``dask.compute`` with a progress bar on local schedulers and on a distributed Client.

    ``scheduler=None`` means in-process (Dask's synchronous scheduler).
    """
    if scheduler is None:
        scheduler = "sync"
    if _is_client(scheduler):
        futures = scheduler.compute(list(objs))
        if progress:
            _client_progress(futures, desc)
        return tuple(scheduler.gather(futures))
    if progress:
        with _TqdmCallback(desc, unit, scale):
            return dask.compute(*objs, scheduler=scheduler)
    return dask.compute(*objs, scheduler=scheduler)


def _is_client(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "Client" and hasattr(scheduler, "gather")


def _client_progress(futures, desc: str) -> None:
    from distributed import wait

    bar = tqdm(total=len(futures), desc=desc, unit="task", leave=False, disable=None)
    wait(futures)
    bar.update(len(futures))
    bar.close()


def map_blocks(
    func: Callable[[Any], Any],
    blocks: Sequence[Any],
    scheduler: Any = "threads",
    desc: str = "blocks",
    progress: bool = True,
    unit_scale: int = 1,
    unit: str = "img",
) -> list[Any]:
    """Run ``func(item)`` for each block item (writers: extract, concept store).

    On a distributed Client the blocks are submitted as separate futures so a progress
    bar can tick per block; elsewhere they are one dask.compute call.
    """
    if not blocks:
        return []
    if _is_client(scheduler):
        from distributed import as_completed

        futures = scheduler.map(func, list(blocks), pure=False)
        results = {}
        bar = tqdm(total=len(blocks) * unit_scale, desc=desc, unit=unit,
                   disable=None if progress else True)
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            bar.update(unit_scale)
        bar.close()
        return [results[f.key] for f in futures]
    tasks = [dask.delayed(func, pure=False)(b) for b in blocks]
    return list(
        compute(*tasks, scheduler=scheduler, desc=desc, progress=progress, unit=unit, scale=unit_scale)
    )
