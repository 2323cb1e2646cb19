"""Activation store: one model's layer outputs over one dataset, chunked by image blocks.

Contract (``<workdir>/activations/<dataset-id>/<model-id>.zarr``, a Zarr v3 group that
``xarray.open_zarr`` opens):

- one array per layer, named by its dotted module name, shape (image, unit, y, x), float32
  (or float16), Zstd-compressed, chunked ``(block_size, units, y, x)``, fill value NaN, so
  an unwritten chunk can never pass for data.  Zarr dimension names are
  ``image, unit_<layer>, y_<layer>, x_<layer>`` because an xarray Dataset needs one size per
  dimension name and layers differ in size; :func:`open_layer` gives the plain
  ``(image, unit, y, x)`` view.
- ``image``: the index.csv image paths in row order (the coordinate of ``image``).
- ``progress/blocks_done`` uint8 (block,): set to 1 after every layer of a block is written.
- attributes: ``fingerprint`` (model, weights identity, layers, preprocessing, dataset index
  hash, dtype), ``layers``, ``block_size``, ``complete``.

No sharding: each block's chunks are written by exactly one task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from storage.blocks import create_index_arrays, mark_block_done, mark_complete, missing_blocks  # noqa: F401 - part of this module's API
from storage.errors import StoreMismatchError, UserError

FORMAT_VERSION = 2


def layer_dims(layer: str) -> list[str]:
    return ["image", f"unit_{layer}", f"y_{layer}", f"x_{layer}"]


def fingerprint_key(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def create_store(
    path: Path,
    image_paths: list[str],
    layer_shapes: dict[str, tuple[int, int, int]],
    block_size: int,
    dtype: str,
    fingerprint: dict,
) -> None:
    n = len(image_paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    for layer, (units, h, w) in layer_shapes.items():
        group.create_array(
            layer,
            shape=(n, units, h, w),
            chunks=(block_size, units, h, w),
            dtype=dtype,
            fill_value=np.nan,
            compressors=[zarr.codecs.ZstdCodec(level=3)],
            dimension_names=layer_dims(layer),
        )
    create_index_arrays(group, image_paths, block_size)
    group.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "layers": list(layer_shapes),
            "block_size": block_size,
            "n_images": n,
            "complete": False,
        }
    )


def store_state(path: Path, fingerprint: dict) -> str:
    """'missing', 'partial' or 'complete'; raises if the store holds other inputs' data."""
    if not (path / "zarr.json").is_file():
        return "missing"
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    theirs = attrs.get("fingerprint", {})
    if fingerprint_key(theirs) != fingerprint_key(fingerprint):
        diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        raise StoreMismatchError(
            f"{path}: activation cache was made with other inputs (differs in {', '.join(diff)}); "
            "delete it or choose another model.name"
        )
    return "complete" if attrs.get("complete") else "partial"




def stored_block_size(path: Path) -> int:
    return int(zarr.open_group(str(path), mode="r").attrs["block_size"])


def write_block(path: Path, block_index: int, start: int, outputs: dict[str, np.ndarray]) -> None:
    """Write every layer's rows for one block, then mark the block done (the resume point)."""
    group = zarr.open_group(str(path), mode="r+")
    for layer, values in outputs.items():
        arr = group[layer]
        arr[start : start + values.shape[0]] = values.astype(arr.dtype, copy=False)
    mark_block_done(group, block_index)




class ActivationStore:
    """Read access to a finished activation store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"{self.path}: activation store not found; run stage=extract first")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        if not self.attrs.get("complete"):
            raise UserError(f"{self.path}: activation store is incomplete; re-run stage=extract")
        self.layers: list[str] = list(self.attrs["layers"])
        self.block_size = int(self.attrs["block_size"])
        self.n_images = int(self.attrs["n_images"])
        self.fingerprint: dict = self.attrs["fingerprint"]

    def array(self, layer: str) -> zarr.Array:
        if layer not in self.layers:
            raise UserError(
                f"layer {layer!r} is not in {self.path}; cached layers: {', '.join(self.layers)}"
            )
        return self.group[layer]

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        return tuple(self.array(layer).shape)

    def n_blocks(self) -> int:
        return -(-self.n_images // self.block_size)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_images)

    def image_paths(self) -> list[str]:
        return [str(p) for p in self.group["image"][:]]


def open_layer(path: str | Path, layer: str):
    """xarray DataArray of one layer with dims (image, unit, y, x) and the image coordinate."""
    import xarray as xr

    ds = xr.open_zarr(str(path), consolidated=False)
    da = ds[layer]
    return da.rename(dict(zip(da.dims, ["image", "unit", "y", "x"], strict=True)))
