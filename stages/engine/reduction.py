"""Statistics as pure reductions, and the runners that apply them to image blocks.

A :class:`Statistic` turns one block of data into a small typed :class:`Partial` (``chunk``)
and merges partials associatively (``combine``) — the shape of dask's
``reduction(chunk, combine, aggregate)``, where the aggregate is a readout of the final
partial named for what it answers (``TallyCounts.iou``, ``TopList.sorted``,
``Moments.covariance``).  Partials have a ``state_dict`` (named numpy arrays), so a long pass
can be saved and resumed.  Statistics do no I/O: a :class:`Pass` reads each block once from a
block source (:mod:`stages.engine.blocks`) and feeds every statistic that needs that read.

The same pass runs in-process (:func:`reduce_in_process`) and as a Dask tree reduction
(:func:`reduce_with_dask`) on any scheduler (:mod:`stages.engine.dask`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import dask
import numpy as np
from tqdm.auto import tqdm

from stages.engine.dask import compute, one_torch_thread_per_task, parallelism
from storage.arrays import load_arrays, write_arrays

CHECKPOINT_EVERY = 30.0  # seconds between saved partials of a long pass


@dataclass(frozen=True)
class Partial:
    """Base of typed partials made of named numpy arrays: their state_dict is those arrays."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]):
        return cls(**{f.name: state[f.name] for f in fields(cls)})


class Statistic:
    """Base of statistics: ``chunk`` one block into a partial of ``partial_type``, ``combine``
    partials; ``refine`` may narrow what later chunks keep, given what is merged so far."""

    partial_type: type[Partial]

    def chunk(self, block: Any) -> Partial:
        raise NotImplementedError

    def combine(self, partials: Sequence[Partial]) -> Partial:
        raise NotImplementedError

    def refine(self, partial: Partial) -> Statistic:  # noqa: ARG002 - most keep everything
        return self


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
    reads its block once; the partial is the tuple of the statistics' partials.
    """

    def __init__(self, source: Any, statistics: Sequence[Statistic]):
        self.source, self.statistics = source, tuple(statistics)

    def chunk(self, index: int) -> tuple:
        block = self.source.read(index)
        return tuple(s.chunk(block) for s in self.statistics)

    def combine(self, partials: Sequence[tuple]) -> tuple:
        return tuple(s.combine([p[i] for p in partials]) for i, s in enumerate(self.statistics))

    def refine(self, partial: tuple) -> Pass:
        """The pass for the blocks still to come, each statistic refined by its partial."""
        return Pass(self.source, tuple(
            s.refine(p) for s, p in zip(self.statistics, partial, strict=True)))

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

    def save(self, reduction: Pass, partial: tuple, done: set[int]) -> None:
        if time.monotonic() - self.saved < self.every:
            return
        write_arrays(self.path, {"blocks_done": np.array(sorted(done), dtype=np.int64),
                                 **reduction.state_dict(partial)})
        self.saved = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _Progress:
    """Where a pass stands: the blocks still to do, the running partial and the blocks in it
    (resumed from a checkpoint when one is given)."""

    def __init__(self, reduction: Pass, blocks: list[int], checkpoint: Checkpoint | None):
        self.reduction, self.checkpoint = reduction, checkpoint
        self.acc: tuple | None = None
        self.done: set[int] = set()
        if checkpoint is not None and blocks:
            self.done, self.acc = checkpoint.load(reduction)
        self.todo = [b for b in blocks if b not in self.done]
        if not self.todo and self.acc is None:
            raise ValueError("no blocks to reduce")

    def current(self) -> Pass:
        """The pass for the blocks to come, refined by what is merged so far."""
        return self.reduction if self.acc is None else self.reduction.refine(self.acc)

    def add(self, part: tuple, blocks: Iterable[int]) -> None:
        self.acc = part if self.acc is None else self.reduction.combine([self.acc, part])
        self.done.update(blocks)
        if self.checkpoint is not None:
            self.checkpoint.save(self.reduction, self.acc, self.done)

    def result(self) -> tuple:
        if self.checkpoint is not None:
            self.checkpoint.remove()
        return self.acc


def reduce_in_process(reduction: Pass, blocks: Iterable[int],
                      checkpoint: Checkpoint | None = None) -> tuple:
    """Run chunk/combine sequentially: the reference semantics of every runner."""
    progress = _Progress(reduction, list(blocks), checkpoint)
    for index in progress.todo:
        progress.add(progress.current().chunk(index), [index])
    return progress.result()


def _chunk(reduction: Pass, index: int):
    return reduction.chunk(index)


def _combine(reduction: Pass, *partials):
    return reduction.combine(list(partials))


def reduction_graph(reduction: Pass, blocks: Sequence[int], split_every: int = 8):
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


def reduce_with_dask(reduction: Pass, blocks: Sequence[int], scheduler: Any = "threads",
                     desc: str = "reduce", split_every: int = 8, progress: bool = True,
                     checkpoint: Checkpoint | None = None) -> tuple:
    """Tree-reduce on a Dask scheduler.

    Blocks go in waves of a few per worker thread, each wave one tree whose result joins
    the running partial: schedulers are free to run every ready chunk before any combine,
    so one graph over all blocks could hold a partial per block; waves bound that by the
    wave size, whatever the number of images.  After each wave the running partial may be
    checkpointed, and the pass is refined with it (``Pass.refine``) for the next wave.
    """
    state = _Progress(reduction, list(blocks), checkpoint)
    parallel = parallelism(scheduler)
    todo = state.todo
    starts = wave_starts(len(todo), parallel, max(split_every, 8 * parallel), state.acc is None)
    bar = tqdm(total=len(blocks), initial=len(blocks) - len(todo), desc=desc, unit="block",
               leave=False, disable=None if progress else True)
    with bar, one_torch_thread_per_task(scheduler):
        for start, end in zip(starts, [*starts[1:], len(todo)], strict=True):
            graph = reduction_graph(state.current(), todo[start:end], split_every)
            (part,) = compute(graph, scheduler=scheduler, desc=desc, progress=False)
            state.add(part, todo[start:end])
            bar.update(end - start)
    return state.result()


def wave_starts(n_blocks: int, parallel: int, wave: int, fresh: bool) -> list[int]:
    """First block of each wave.  A fresh pass starts with one block per thread and doubles
    its waves up to ``wave``: a refinable pass narrows what later blocks keep by what is
    merged so far (top-k thresholds keep only values above the running floor), and a floor
    from few images is loose, so only small waves run under it (the Broden-scale benchmark
    measures the peak RSS this bounds)."""
    starts, size, start = [], parallel if fresh else wave, 0
    while start < n_blocks:
        starts.append(start)
        start += size
        size = min(2 * size, wave)
    return starts


def reduce_blocks(reduction: Pass, n_blocks: int, scheduler: Any = None,
                  desc: str = "reduce", progress: bool = True, split_every: int = 8,
                  checkpoint: Path | None = None) -> tuple:
    """Reduce blocks 0..n_blocks-1 into the statistics' final partials: in-process when
    ``scheduler`` is None, else on Dask; ``checkpoint`` (a file path) makes a long pass
    resumable."""
    blocks = list(range(n_blocks))
    saver = Checkpoint(checkpoint) if checkpoint is not None else None
    if scheduler is None:
        return reduce_in_process(reduction, blocks, saver)
    return reduce_with_dask(reduction, blocks, scheduler, desc, split_every, progress, saver)
