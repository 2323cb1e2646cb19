"""What every block-written Zarr store shares: the image coordinate and the resume markers.

``progress/blocks_done`` is a uint8 array with one chunk per image block; a writer sets its
block's flag only after every chunk of the block is written, so a killed run resumes at the
first unset flag.  (A subgroup, so ``xarray.open_zarr`` of the store does not list it.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def create_index_arrays(group: zarr.Group, image_paths: list[str], block_size: int) -> None:
    """The ``image`` coordinate (index.csv paths in row order) and the block markers."""
    n = len(image_paths)
    image = group.create_array(
        "image", shape=(n,), chunks=(max(n, 1),), dtype=str, dimension_names=["image"]
    )
    image[:] = np.array(image_paths)
    group.require_group("progress").create_array(
        "blocks_done", shape=(-(-n // block_size),), chunks=(1,), dtype="uint8", fill_value=0,
        dimension_names=["block"],
    )


def missing_blocks(path: Path) -> list[int]:
    """Blocks whose marker is unset, in order."""
    done = zarr.open_group(str(path), mode="r")["progress/blocks_done"][:]
    return [int(i) for i in np.flatnonzero(done == 0)]


def mark_block_done(group: zarr.Group, block: int) -> None:
    group["progress/blocks_done"][block] = 1


def mark_complete(path: Path) -> None:
    zarr.open_group(str(path), mode="r+").attrs["complete"] = True
