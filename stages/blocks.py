"""Reading activation blocks: shared by every stage that reduces over the activation store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from storage.activations import ActivationStore
from storage.errors import UserError


@dataclass(frozen=True)
class LayerBlocks:
    """Picklable loader of one layer's image blocks, with an optional per-block transform."""

    store_path: str
    layer: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: str = "cpu"  # "auto": cuda where the worker running the block has a GPU

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def store(self) -> ActivationStore:
        return ActivationStore(self.store_path)

    def load(self, block: int) -> torch.Tensor:
        return self.load_rows(block)[0]

    def load_rows(self, block: int) -> tuple[torch.Tensor, int, int]:
        """The block's values and its image rows [start, stop), from one store open."""
        store = self.store()
        start, stop = store.block_range(block)
        values = torch.from_numpy(store.array(self.layer)[start:stop])
        values = values.to(self.resolved_device()).float()
        if self.transform is not None:
            values = self.transform(values).float()
        bad = ~torch.isfinite(values)
        if bad.any():
            unit = int(torch.nonzero(bad.any(dim=(0, 2, 3)))[0])
            raise UserError(
                f"model {store.fingerprint.get('model')!r} layer {self.layer!r} unit {unit}: "
                f"NaN or infinite activation in {self.store_path} (image block {block})"
            )
        return values, start, stop
