"""What every block-written Zarr store shares: the codec, the image coordinate, resume
markers, direct chunk reads, one base class for reading (:class:`BlockStore`) and one cache
of open stores per process (:meth:`BlockStore.open`).

``progress/<name>`` is a uint8 array with one chunk per image block; a writer sets its block's
flag only after every chunk of the block is written, so a killed build resumes at the first
unset flag.  (A subgroup, so ``xarray.open_zarr`` of the store does not list it.)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Endian, ZstdCodec
from zarr.storage import LocalStore

from storage.artifacts import atomic_file


def compressors() -> list:
    """Zstd level 3.  Measured on ReLU activations (the demo's trained layers: 0.47 and 0.40
    of raw float32), it beat byte- and bit-shuffle before Zstd on size and read speed; on
    dense random-init activations every lossless codec tried stayed near 0.62."""
    return [zarr.codecs.ZstdCodec(level=3)]


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` along the image axis, as a writable array.

    A read of exactly one chunk of a local array in the layout these stores are written in
    (one chunk across the other axes, bytes then Zstd) is decoded in the calling thread.
    Zarr's own read copies every decoded chunk on its one event-loop thread, so reader
    threads barely add up through it (measured by the Broden-scale benchmark's commit
    95e7ebf).  Any other read goes through zarr.
    """
    chunk = array.chunks[0]
    whole = start % chunk == 0 and stop == min(start + chunk, array.shape[0])
    key = _chunk_file(array, start // chunk) if whole else None
    if key is None:
        return array[start:stop]
    try:
        encoded = key.read_bytes()
    except FileNotFoundError:  # never written: zarr returns the fill value
        return array[start:stop]
    out = np.empty((chunk, *array.shape[1:]), dtype=array.dtype.newbyteorder("<"))
    numcodecs.Zstd().decode(encoded, out=out)
    return out[: stop - start].astype(array.dtype, copy=False)


def write_rows(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """``array[start:start + len(values)] = values`` along the image axis.

    A write of exactly one chunk of a local array in the layout :func:`read_rows` reads
    directly is encoded and written (atomically) in the calling thread, as zarr writes it:
    the same bytes, without zarr's event loop, which writer threads otherwise queue on.  A
    chunk of nothing but the fill value, and any other write, go through zarr (which does
    not store such a chunk).
    """
    chunk, stop = array.chunks[0], start + len(values)
    whole = start % chunk == 0 and stop == min(start + chunk, array.shape[0])
    key = _chunk_file(array, start // chunk) if whole else None
    fill = array.metadata.fill_value
    if key is None or not (values != fill).any():
        array[start:stop] = values
        return
    little = array.dtype.newbyteorder("<")
    if len(values) == chunk:
        padded = np.ascontiguousarray(values, dtype=little)
    else:  # the last chunk: zarr stores it whole, the rest the fill value
        padded = np.full((chunk, *array.shape[1:]), fill, dtype=little)
        padded[: len(values)] = values
    zstd = array.metadata.codecs[1]
    encoded = numcodecs.Zstd(level=zstd.level, checksum=zstd.checksum).encode(padded)
    with atomic_file(key) as partial:
        partial.write_bytes(encoded)


def _chunk_file(array: zarr.Array, index: int) -> Path | None:
    """The file of chunk ``index`` along axis 0, if the array's layout allows a direct read."""
    store = array.store_path.store
    meta = array.metadata
    if not isinstance(store, LocalStore) or meta.zarr_format != 3 or \
            tuple(array.chunks[1:]) != tuple(array.shape[1:]):
        return None
    codecs = meta.codecs
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or \
            not isinstance(codecs[1], ZstdCodec) or codecs[0].endian not in (None, Endian.little):
        return None
    return Path(store.root) / array.store_path.path / meta.encode_chunk_key(
        (index,) + (0,) * (array.ndim - 1))


def n_blocks(n_images: int, block_size: int) -> int:
    return -(-n_images // block_size)


S = TypeVar("S", bound="BlockStore")


class BlockStore:
    """Read access to a store of image blocks: its group, attributes, images and blocks.

    Stores are read block by block by every task of a pass; :meth:`open` gives each process
    one open store per path (opened again once the store is rewritten), not one per block.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        self.attrs = dict(self.group.attrs)
        self.n_images = int(self.attrs["n_images"])
        self.block_size = int(self.attrs["block_size"])

    @classmethod
    def open(cls: type[S], path: str | Path) -> S:
        """The store at ``path``, opened once per process (again after it was rewritten)."""
        return _open(cls, str(path), _mtime(Path(path)))

    def image_paths(self) -> list[str]:
        return [str(p) for p in self.group["image"][:]]

    def n_blocks(self) -> int:
        return n_blocks(self.n_images, self.block_size)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_images)


def _mtime(path: Path) -> int:
    """When the store was last rewritten; 0 for none, so opening it says it is missing."""
    try:
        return (path / "zarr.json").stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@lru_cache(maxsize=16)
def _open(cls: type[BlockStore], path: str, _mtime_ns: int) -> BlockStore:
    return cls(path)


def open_for_writing(path: Path, names: tuple[str, ...]) -> tuple[zarr.Group, tuple[zarr.Array, ...]]:
    """The store's group and its arrays ``names``, opened once per process and store (again
    after it was rewritten): each open reads metadata through zarr's event loop, which the
    writer threads would otherwise queue on for every block."""
    return _open_for_writing(str(path), names, _mtime(Path(path)))


@lru_cache(maxsize=16)
def _open_for_writing(path: str, names: tuple[str, ...], _mtime_ns: int
                      ) -> tuple[zarr.Group, tuple[zarr.Array, ...]]:
    group = zarr.open_group(path, mode="r+")
    return group, tuple(group[name] for name in names)


def create_image_coordinate(group: zarr.Group, image_paths: list[str]) -> None:
    """The ``image`` coordinate: index.csv paths in row order."""
    n = len(image_paths)
    image = group.create_array(
        "image", shape=(n,), chunks=(max(n, 1),), dtype=str, dimension_names=["image"]
    )
    image[:] = np.array(image_paths)


def create_progress(group: zarr.Group, name: str, blocks: int) -> None:
    """Resume markers of one block-written array (or of a whole store)."""
    group.require_group("progress").create_array(
        name, shape=(blocks,), chunks=(1,), dtype="uint8", fill_value=0,
        dimension_names=[f"block_{name}"], overwrite=True,
    )


def missing_blocks(path: Path, name: str) -> list[int]:
    """Blocks whose marker is unset, in order."""
    done = zarr.open_group(str(path), mode="r")[f"progress/{name}"][:]
    return [int(i) for i in np.flatnonzero(done == 0)]


def mark_block_done(group: zarr.Group, name: str, block: int) -> None:
    group[f"progress/{name}"][block] = 1
