"""Activation store: one model identity's layer outputs over one dataset, chunked by image blocks.

Contract (``<workdir>/activations/<dataset-id>/<model-identity>.zarr``, a Zarr v3 group that
``xarray.open_zarr`` opens; metadata consolidated whenever a layer completes):

- one independent array per layer, named by its dotted module name, shape (image, unit, y,
  x), float32 (or float16), Zstd-compressed, chunked ``(block_size, units,
  y, x)``, fill value NaN, so an unwritten chunk can never pass for data.  Zarr dimension
  names are ``image, unit_<layer>, y_<layer>, x_<layer>`` because an xarray Dataset needs one
  size per dimension name and layers differ in size; :func:`open_layer` gives the plain
  ``(image, unit, y, x)`` view.
- ``image``: the index.csv image paths in row order (the coordinate of ``image``).
- ``progress/<layer>`` uint8 (block,): each layer's own resume markers.
- attributes: ``fingerprint`` (what the store's activations depend on: model identity,
  dataset index, image size, dtype), ``layers``, ``block_size``, ``n_images``,
  ``dataset_root`` (where the images were read).

Each layer is its own artifact (``storage.artifacts``) with its own completeness, so a new
layer is added to a cached store without rewriting any chunk of the others.  No sharding:
each block's chunks are written by exactly one task.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr

from storage.artifacts import Artifact
from storage.blocks import (
    BlockStore,
    compressors,
    create_image_coordinate,
    create_progress,
    mark_block_done,
    n_blocks,
)
from storage.errors import UserError

FORMAT_VERSION = 3


def layer_dims(layer: str) -> list[str]:
    return ["image", f"unit_{layer}", f"y_{layer}", f"x_{layer}"]


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    """The store's group, read without consolidated metadata (layers come and go)."""
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def store_artifact(path: Path, fingerprint: dict) -> Artifact:
    return Artifact(Path(path), {"format": FORMAT_VERSION, **fingerprint})


def layer_artifact(path: Path, fingerprint: dict, layer: str) -> Artifact:
    """One layer of a store: complete once every block of it is written."""
    store_key = store_artifact(path, fingerprint).key
    return Artifact(Path(path), {"store": store_key, "layer": layer}, member=layer)


def create_group(path: Path, image_paths: list[str], block_size: int, fingerprint: dict,
                 dataset_root: str = "") -> None:
    """An empty store: the image coordinate and the attributes, no layers yet.
    ``dataset_root`` records where the images were read (for the report's strips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    create_image_coordinate(group, image_paths)
    group.attrs.update({
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "layers": [],
        "block_size": block_size, "n_images": len(image_paths), "dataset_root": dataset_root,
    })
    store_artifact(path, fingerprint).commit()


def add_layer(path: Path, layer: str, shape: tuple[int, int, int], dtype: str) -> None:
    """Create (or re-create, if a killed run left it half made) one layer's array."""
    group = open_group(path, "r+")
    n, block_size = int(group.attrs["n_images"]), int(group.attrs["block_size"])
    units, h, w = shape
    group.create_array(
        layer, shape=(n, units, h, w), chunks=(block_size, units, h, w), dtype=dtype,
        fill_value=np.nan, compressors=compressors(), dimension_names=layer_dims(layer),
        overwrite=True,
    )
    create_progress(group, layer, n_blocks(n, block_size))
    layers = [name for name in group.attrs["layers"] if name != layer]
    group.attrs["layers"] = [*layers, layer]
    layer_artifact(path, group.attrs["fingerprint"], layer).begin()


def create_store(
    path: Path,
    image_paths: list[str],
    layer_shapes: dict[str, tuple[int, int, int]],
    block_size: int,
    dtype: str,
    fingerprint: dict,
) -> None:
    """A store with every layer of ``layer_shapes`` created empty (tests, benchmarks)."""
    create_group(path, image_paths, block_size, fingerprint)
    for layer, shape in layer_shapes.items():
        add_layer(path, layer, shape, dtype)


def write_block(path: Path, block_index: int, start: int, outputs: dict[str, np.ndarray]) -> None:
    """Write every given layer's rows of one block, then mark the block done per layer."""
    group = open_group(path, "r+")
    for layer, values in outputs.items():
        arr = group[layer]
        arr[start : start + values.shape[0]] = values.astype(arr.dtype, copy=False)
        mark_block_done(group, layer, block_index)


def mark_complete(path: Path, layers: list[str] | None = None) -> None:
    """Record layers as complete (default: every layer) and consolidate the metadata."""
    attrs = dict(open_group(path).attrs)
    for layer in attrs["layers"] if layers is None else layers:
        layer_artifact(path, attrs["fingerprint"], layer).commit()
    consolidate(path)


def consolidate(path: Path) -> None:
    """Consolidated metadata, so ``xarray.open_zarr(path)`` lists every layer in one read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes that v3 has no consolidation spec yet
        zarr.consolidate_metadata(str(path))


class ActivationStore(BlockStore):
    """Read access to an activation store (completeness is the artifact layer's business)."""

    def __init__(self, path: str | Path):
        if not (Path(path) / "zarr.json").is_file():
            raise UserError(f"{path}: activation store not found; run stage=extract first")
        super().__init__(path)
        self.layers: list[str] = list(self.attrs["layers"])
        self.fingerprint: dict = self.attrs["fingerprint"]
        self._arrays: dict[str, zarr.Array] = {}  # opened once: every block reads through them

    def array(self, layer: str) -> zarr.Array:
        if layer not in self.layers:
            raise UserError(
                f"layer {layer!r} is not in {self.path}; cached layers: {', '.join(self.layers)}"
            )
        if layer not in self._arrays:
            self._arrays[layer] = self.group[layer]
        return self._arrays[layer]

    def is_complete(self, layer: str) -> bool:
        return layer in self.layers and layer_artifact(self.path, self.fingerprint, layer).is_current()

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        return tuple(self.array(layer).shape)


def open_layer(path: str | Path, layer: str):
    """xarray DataArray of one layer with dims (image, unit, y, x) and the image coordinate."""
    import xarray as xr

    ds = xr.open_zarr(str(path))
    da = ds[layer]
    return da.rename(dict(zip(da.dims, ["image", "unit", "y", "x"], strict=True)))
