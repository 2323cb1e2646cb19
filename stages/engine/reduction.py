"""Statistics as pure reductions, and the runners that apply them to image blocks.

A :class:`Statistic` turns one block of data into a small typed *partial* (``chunk``),
merges partials associatively (``combine``) and turns the final partial into the answer
(``finish``) — the shape of dask's ``reduction(chunk, combine, aggregate)``.  Partials have a
``state_dict`` (named numpy arrays), so a long pass can be saved and resumed.  Statistics do no
I/O: a :class:`Pass` reads each block once from a block source (``stages.engine.blocks``) and feeds
every statistic that needs that read.

The same pass runs in-process (:func:`reduce_in_process`) and as a Dask tree reduction
(:func:`reduce_with_dask`) on any scheduler: ``"sync"``, ``"threads"``, ``"processes"`` or a
``distributed.Client``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from storage.errors import UserError
from storage.thresholds import load_arrays, write_arrays

P = TypeVar("P")
CHECKPOINT_EVERY = 30.0  # seconds between saved partials of a long pass
NO_WORKER_GRACE = 60.0  # seconds without any Dask worker before a pass gives up


class Statistic(Protocol[P]):
    partial_type: type  # an :class:`Arrays` subclass: how a saved partial is read back

    def chunk(self, block: Any) -> P: ...

    def combine(self, partials: Sequence[P]) -> P: ...

    def finish(self, partial: P) -> Any: ...


@dataclass(frozen=True)
class Arrays:
    """Base of typed partials made of named numpy arrays: their state_dict is those arrays."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]):
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def summed(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Elementwise sum added into one copy (``np.sum`` of a list would first stack them all:
    eight radix partials of a 2048-unit layer made a 537 MB temporary)."""
    total = np.array(arrays[0], copy=True)
    for array in arrays[1:]:
        total += array
    return total


class Pass:
    """One read of every block of ``source`` feeding several statistics.

    ``chunk`` takes a block *index*, so runners and Dask graphs deal in indices and each task
    reads its block once; the partial is the tuple of the statistics' partials.  With
    ``single=True`` (one statistic) ``finish`` returns that statistic's result alone.
    """

    def __init__(self, source: Any, statistics: Sequence[Statistic], single: bool = False):
        self.source, self.statistics, self.single = source, tuple(statistics), single

    def chunk(self, index: int) -> tuple:
        block = self.source.read(index)
        return tuple(s.chunk(block) for s in self.statistics)

    def combine(self, partials: Sequence[tuple]) -> tuple:
        return tuple(s.combine([p[i] for p in partials]) for i, s in enumerate(self.statistics))

    def refine(self, partial: tuple) -> Pass:
        """The pass for the blocks still to come: a statistic with a ``refine(partial)``
        method may narrow what its chunks keep from what is merged so far."""
        return Pass(self.source, tuple(
            s.refine(p) if hasattr(s, "refine") else s
            for s, p in zip(self.statistics, partial, strict=True)), self.single)

    def finish(self, partial: tuple) -> Any:
        results = tuple(s.finish(p) for s, p in zip(self.statistics, partial, strict=True))
        return results[0] if self.single else results

    def state_dict(self, partial: tuple) -> dict[str, np.ndarray]:
        return {f"{i}.{key}": value for i, p in enumerate(partial)
                for key, value in p.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> tuple:
        return tuple(s.partial_type.from_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})
            for i, s in enumerate(self.statistics))


class Checkpoint:
    """The running partial of a pass saved beside the artifact it builds, so a killed pass
    resumes from it: blocks done plus the partial's state_dict, written atomically at most
    every ``every`` seconds, removed once the pass is finished."""

    def __init__(self, path: Path, every: float = CHECKPOINT_EVERY):
        self.path, self.every = Path(path), every
        self.saved = time.monotonic()

    def load(self, reduction: Pass) -> tuple[set[int], tuple | None]:
        try:
            state = load_arrays(self.path)
        except (OSError, ValueError):
            return set(), None
        done = {int(b) for b in state.pop("blocks_done")}
        return done, reduction.load_state_dict(state)

    def save(self, reduction: Pass, partial: tuple, done: set[int], force: bool = False) -> None:
        if not force and time.monotonic() - self.saved < self.every:
            return
        write_arrays(self.path, {"blocks_done": np.array(sorted(done), dtype=np.int64),
                                 **reduction.state_dict(partial)})
        self.saved = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _resume(reduction: Any, blocks: list[int], checkpoint: Checkpoint | None
            ) -> tuple[list[int], Any, set[int]]:
    if checkpoint is None or not blocks:
        return blocks, None, set()
    done, acc = checkpoint.load(reduction)
    return [b for b in blocks if b not in done], acc, done


def reduce_in_process(reduction: Any, blocks: Iterable[int],
                      checkpoint: Checkpoint | None = None) -> Any:
    """Run chunk/combine/finish sequentially: the reference semantics of every runner."""
    todo, acc, done = _resume(reduction, list(blocks), checkpoint)
    for index in todo:
        part = _refined(reduction, acc).chunk(index)
        acc = part if acc is None else reduction.combine([acc, part])
        done.add(index)
        if checkpoint is not None:
            checkpoint.save(reduction, acc, done)
    if acc is None:
        raise ValueError("no blocks to reduce")
    result = reduction.finish(acc)
    if checkpoint is not None:
        checkpoint.remove()
    return result


def _refined(reduction: Pass, acc: tuple | None) -> Pass:
    return reduction if acc is None else reduction.refine(acc)


def _chunk(reduction: Any, index: int):
    return reduction.chunk(index)


def _combine(reduction: Any, *partials):
    return reduction.combine(list(partials))


def reduction_graph(reduction: Any, blocks: Sequence[int], split_every: int = 8):
    """A dask.delayed tree: chunk per block, combine ``split_every`` partials per node.  The
    reduction object is one node of the graph, so a cluster ships it once per worker."""
    if not blocks:
        raise ValueError("no blocks to reduce")
    shared = dask.delayed(reduction, pure=True)
    layer = [dask.delayed(_chunk, pure=False)(shared, i) for i in blocks]
    while len(layer) > 1:
        layer = [
            dask.delayed(_combine, pure=False)(shared, *layer[i : i + split_every])
            for i in range(0, len(layer), split_every)
        ]
    return layer[0]


def reduce_with_dask(
    reduction: Any,
    blocks: Sequence[int],
    scheduler: Any = "threads",
    desc: str = "reduce",
    split_every: int = 8,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Any:
    """Tree-reduce on a Dask scheduler; the finish step runs here, on the caller.

    Blocks go in waves of a few per worker thread, each wave one tree whose result joins
    the running partial: schedulers are free to run every ready chunk before any combine,
    so one graph over all blocks could hold a partial per block; waves bound that by the
    wave size, whatever the number of images.  After each wave the running partial may be
    checkpointed, and the pass is refined with it (``Pass.refine``) for the next wave.
    """
    todo, acc, done = _resume(reduction, list(blocks), checkpoint)
    if not todo and acc is None:
        raise ValueError("no blocks to reduce")
    parallel = _parallelism(scheduler)
    starts = wave_starts(len(todo), parallel, max(split_every, 8 * parallel), acc is None)
    bar = tqdm(total=len(blocks), initial=len(blocks) - len(todo), desc=desc, unit="block",
               leave=False, disable=None if progress else True)
    with _one_torch_thread_per_task(scheduler):
        for start, end in zip(starts, [*starts[1:], len(todo)], strict=True):
            part_blocks = todo[start:end]
            graph = reduction_graph(_refined(reduction, acc), part_blocks, split_every)
            (part,) = compute(graph, scheduler=scheduler, desc=desc, progress=False)
            acc = part if acc is None else reduction.combine([acc, part])
            done.update(part_blocks)
            if checkpoint is not None:
                checkpoint.save(reduction, acc, done)
            bar.update(len(part_blocks))
    bar.close()
    result = reduction.finish(acc)
    if checkpoint is not None:
        checkpoint.remove()
    return result


def wave_starts(n_blocks: int, parallel: int, wave: int, fresh: bool) -> list[int]:
    """First block of each wave.  A fresh pass starts with one block per thread and doubles
    its waves up to ``wave``: a refinable pass narrows what later blocks keep by what is
    merged so far (top-k thresholds keep only values above the running floor), and a floor
    from few images is loose, so only small waves run under it.  (The Broden-scale benchmark's
    top-k peak RSS from 2,000 to 8,000 images: x1.14 and x1.21 for resnet18 and resnet50
    with a full-size second wave, x1.13 and x1.16 with doubling waves.)"""
    starts, size, start = [], parallel if fresh else wave, 0
    while start < n_blocks:
        starts.append(start)
        start += size
        size = min(2 * size, wave)
    return starts


@contextmanager
def _one_torch_thread_per_task(scheduler: Any) -> Iterator[None]:
    """Dask's threaded scheduler already runs one block per core; torch's own intra-op
    threads on top would oversubscribe the cores (measured: stalls of a waiting thread)."""
    if scheduler != "threads":
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reduce_blocks(
    reduction: Any,
    n_blocks: int,
    scheduler: Any = None,
    desc: str = "reduce",
    progress: bool = True,
    split_every: int = 8,
    checkpoint: Path | None = None,
) -> Any:
    """Reduce blocks 0..n_blocks-1: in-process when ``scheduler`` is None, else on Dask;
    ``checkpoint`` (a file path) makes a long pass resumable."""
    blocks = list(range(n_blocks))
    saver = Checkpoint(checkpoint) if checkpoint is not None else None
    if scheduler is None:
        return reduce_in_process(reduction, blocks, saver)
    return reduce_with_dask(reduction, blocks, scheduler, desc, split_every, progress, saver)


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
        wait_with_workers(scheduler, futures)
        return tuple(scheduler.gather(futures))
    if progress:
        with _TqdmCallback(desc, unit, scale):
            return dask.compute(*objs, scheduler=scheduler)
    return dask.compute(*objs, scheduler=scheduler)


def _is_client(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "Client" and hasattr(scheduler, "gather")


def wait_with_workers(client: Any, futures: list, on_done: Callable[[Any], None] | None = None
                      ) -> None:
    """Wait for ``futures`` (``on_done`` is called on each as it finishes); if the cluster
    has had no worker for a while (Dask config ``netdissect.no-worker-timeout``, default
    60 s), stop with one line instead of waiting forever."""
    from distributed import wait

    grace = float(dask.config.get("netdissect.no-worker-timeout", NO_WORKER_GRACE))
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
        futures = scheduler.map(func, list(blocks), pure=False)
        results = {}
        bar = tqdm(total=len(blocks) * unit_scale, desc=desc, unit=unit,
                   disable=None if progress else True)

        def collect(future) -> None:
            results[future.key] = future.result()
            bar.update(unit_scale)

        wait_with_workers(scheduler, futures, collect)
        bar.close()
        return [results[f.key] for f in futures]
    tasks = [dask.delayed(func, pure=False)(b) for b in blocks]
    return list(
        compute(*tasks, scheduler=scheduler, desc=desc, progress=progress, unit=unit, scale=unit_scale)
    )
