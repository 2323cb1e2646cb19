"""Block sources: one read of an image block feeds every statistic of a pass.

:class:`LayerBlocks` reads a layer's activations (transformed when a basis transform is given,
on the device the kernels run on); :class:`ScoringBlocks` adds the labels of the same images
from a concept store, matched by row.  Stores are opened once per process and path (and
re-opened when rebuilt, :meth:`storage.blocks.BlockStore.open`), not once per block.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from storage.activations import ActivationStore
from storage.blocks import read_rows
from storage.concepts import ConceptBlock, ConceptStore
from storage.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

# a block's activations: an array on CPU without a transform (no torch needed), else a tensor
Values = Union[np.ndarray, "torch.Tensor"]


def damaged(path: str, what: str, start: int, stop: int, exc: Exception) -> UserError:
    """A chunk that cannot be decoded: disk damage, not a bug; rebuilding the store fixes it."""
    return UserError(f"{path}: the {what} of images {start}-{stop - 1} cannot be read "
                     f"({first_line(exc)}); the store is damaged: remove {path} and run the same command "
                     "again to rebuild it")


def non_finite_units(values: Values) -> Values:
    """Units (axis 1) with a NaN or infinite value.  One sum first: NaN and infinities make it
    non-finite, so the elementwise test (25x the cost on a resnet50 block) runs only then,
    or when finite values overflow the sum."""
    if isinstance(values, np.ndarray):
        if np.isfinite(values.sum()):
            return np.zeros(0, np.int64)
        return np.flatnonzero((~np.isfinite(values)).any(axis=(0, 2, 3)))
    import torch

    if bool(torch.isfinite(values.sum())):
        return values.new_zeros(0, dtype=torch.int64)
    return torch.nonzero((~torch.isfinite(values)).any(dim=(0, 2, 3)))[:, 0]


def as_tensor(values: Values) -> torch.Tensor:
    """The values as a tensor (an array's memory, not a copy)."""
    if isinstance(values, np.ndarray):
        import torch

        return torch.from_numpy(values)
    return values


@lru_cache(maxsize=1)
def cuda_driver_loadable() -> bool:
    """Can this process load the CUDA driver library?  Without it torch sees no GPU, so
    "auto" is the CPU, known without importing torch; with it, torch decides."""
    names = {"win32": ("nvcuda.dll",), "darwin": ()}.get(sys.platform, ("libcuda.so.1",))
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


@dataclass(frozen=True)
class Block:
    """What one read of a block gives the statistics of a pass.

    :meth:`shared` holds what several statistics derive from the same read (the tally and
    the signatures both count the units' mask pixels per pixel class): made by the first
    that asks, reused by the others.
    """

    values: Values  # (B, K, h, w) float32 on the pass's device (transformed if asked)
    rows: np.ndarray  # (B,) activation-store rows of ``acts``
    labels: ConceptBlock | None = None  # the same images' labels (scoring passes)
    seg_size: tuple[int, int] | None = None
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def acts(self) -> torch.Tensor:
        """The activations as a tensor, for the statistics written in torch."""
        return as_tensor(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def shared(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per block and key."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


@dataclass(frozen=True)
class LayerBlocks:
    """Picklable reader of one layer's image blocks, with an optional per-block transform."""

    store_path: str
    layer: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: str = "cpu"  # "auto": cuda where the worker running the block has a GPU

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        if not cuda_driver_loadable():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def store(self) -> ActivationStore:
        return ActivationStore.open(self.store_path)

    def n_blocks(self) -> int:
        return self.store().n_blocks()

    def read(self, block: int) -> Block:
        values, start, stop = self.read_values(block)
        return Block(values, np.arange(start, stop))

    def load(self, block: int) -> torch.Tensor:
        return self.load_rows(block)[0]

    def load_rows(self, block: int) -> tuple[torch.Tensor, int, int]:
        """The block's values as a tensor and its image rows [start, stop)."""
        values, start, stop = self.read_values(block)
        return as_tensor(values), start, stop

    def read_values(self, block: int) -> tuple[Values, int, int]:
        """The block's values and its image rows [start, stop): on CPU without a transform an
        array, so that a pass whose statistics need no torch never imports it."""
        store = self.store()
        start, stop = store.block_range(block)
        array = store.array(self.layer)
        try:
            raw = read_rows(array, start, stop)
        except Exception as exc:  # noqa: BLE001 - codecs raise many kinds on damaged chunks
            raise damaged(self.store_path, f"layer {self.layer}", start, stop, exc) from None
        device = self.resolved_device()
        if device == "cpu" and self.transform is None:
            values = raw.astype(np.float32, copy=False)
        else:
            import torch

            values = torch.from_numpy(raw).to(device).float()
            if self.transform is not None:
                values = self.transform(values).float()
        bad = non_finite_units(values)
        if len(bad):
            unit = int(bad[0])
            raise UserError(
                f"model {store.fingerprint.get('model')!r} layer {self.layer!r} unit {unit}: "
                f"NaN or infinite activation in {self.store_path} (image block {block})"
            )
        return values, start, stop


@dataclass(frozen=True)
class ScoringBlocks:
    """Activations plus the labels of the same images from a concept store.

    ``rows`` maps activation rows to concept-store rows (-1: the image is not in the concept
    set and is left out); None means both stores list the same images in the same order.
    """

    layer: LayerBlocks
    concept_path: str
    rows: np.ndarray | None = None

    def n_blocks(self) -> int:
        return self.layer.n_blocks()

    def concepts(self) -> ConceptStore:
        return ConceptStore.open(self.concept_path)

    def read(self, block: int) -> Block:
        acts, start, stop = self.layer.read_values(block)
        store = self.concepts()
        seg = (store.sh, store.sw)
        wanted = np.arange(start, stop) if self.rows is None else self.rows[start:stop]
        keep = wanted >= 0
        if not keep.any():
            return Block(acts[:0], np.zeros(0, np.int64), None, seg)
        try:
            labels = (store.read_block(start, stop) if self.rows is None
                      else store.read_rows(wanted[keep]))
        except Exception as exc:  # noqa: BLE001 - codecs raise many kinds on damaged chunks
            raise damaged(self.concept_path, "labels", start, stop, exc) from None
        if self.rows is None:
            return Block(acts, wanted, labels, seg)
        kept = acts[keep] if isinstance(acts, np.ndarray) else acts[as_tensor(keep).to(acts.device)]
        return Block(kept, np.arange(start, stop)[keep], labels, seg)
