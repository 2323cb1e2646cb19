"""Block reads: the direct chunk read equals zarr's own, and is taken where it applies."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import storage.blocks as blocks


def make_array(tmp_path, codecs="ours", shape=(10, 3, 4), chunks=(4, 3, 4), store=None,
               dtype="float32"):
    store = store if store is not None else zarr.storage.LocalStore(str(tmp_path / "a.zarr"))
    kwargs = {"compressors": blocks.compressors()} if codecs == "ours" else {
        "compressors": [zarr.codecs.BloscCodec()]}
    array = zarr.create_array(store, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              **kwargs)
    values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    array[: shape[0] - chunks[0]] = values[: shape[0] - chunks[0]]  # the last chunk unwritten
    return array


@pytest.fixture
def direct_reads(monkeypatch):
    """Which chunk files were read directly."""
    seen = []
    original = blocks._chunk_file

    def spy(array, index):
        path = original(array, index)
        seen.append(path is not None)
        return path

    monkeypatch.setattr(blocks, "_chunk_file", spy)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "int32", "int8", "float16"])
def test_read_rows_equals_zarr_on_every_range(tmp_path, direct_reads, dtype):
    array = make_array(tmp_path, dtype=dtype)
    for start, stop in [(0, 4), (4, 8), (8, 10), (0, 10), (2, 6), (4, 6), (0, 0), (9, 10)]:
        got = blocks.read_rows(array, start, stop)
        np.testing.assert_array_equal(got, array[start:stop])
        assert got.dtype == array.dtype and got.flags.writeable
    # one whole chunk each: the first two; the third is unwritten (the fill value via zarr)
    assert direct_reads[:3] == [True, True, True]


def test_read_rows_leaves_other_layouts_to_zarr(tmp_path, direct_reads):
    other = make_array(tmp_path, codecs="blosc")
    memory = make_array(tmp_path, store=zarr.storage.MemoryStore())
    split = make_array(tmp_path / "s", chunks=(4, 2, 4))  # more than one chunk per block
    for array in (other, memory, split):
        np.testing.assert_array_equal(blocks.read_rows(array, 0, 4), array[0:4])
    assert direct_reads == [False, False, False]


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("dtype", ["int32", "int8", "float32"])
def test_write_rows_writes_the_files_zarr_writes(tmp_path, direct_reads, dtype):
    """Whole chunks, the short last chunk, a chunk of nothing but the fill value (zarr
    stores none) and a write of part of a chunk: the store's files are byte for byte those
    zarr's own writes make."""
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((10, 3, 4)) * 50).astype(dtype)
    values[4:8] = 0  # the fill value
    ours = zarr.create_array(zarr.storage.LocalStore(str(tmp_path / "ours.zarr")),
                             shape=(10, 3, 4), chunks=(4, 3, 4), dtype=dtype, fill_value=0,
                             compressors=blocks.compressors())
    theirs = zarr.create_array(zarr.storage.LocalStore(str(tmp_path / "theirs.zarr")),
                               shape=(10, 3, 4), chunks=(4, 3, 4), dtype=dtype, fill_value=0,
                               compressors=blocks.compressors())
    for start, stop in [(0, 4), (4, 8), (8, 10), (1, 3)]:
        blocks.write_rows(ours, start, values[start:stop] + (start == 1))
        theirs[start:stop] = values[start:stop] + (start == 1)
    assert direct_reads == [True, True, True]  # the whole chunks (the fill one left to zarr)
    np.testing.assert_array_equal(ours[:], theirs[:])
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "theirs.zarr")
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
