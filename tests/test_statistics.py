"""Statistics as pure reductions: one read per block feeds several of them, combined passes
equal separate ones, partials round-trip through state_dict, and a killed pass resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.bases.covariance import Covariance
from stages.engine.blocks import LayerBlocks, ScoringBlocks
from stages.engine.reduction import Checkpoint, Pass, reduce_blocks, reduce_in_process
from stages.quantile import threshold_pass
from stages.signatures.statistic import Signatures
from stages.tally.labels import label_space
from stages.tally.statistic import Tally, TallyRule
from tests.passes import exact_thresholds, signature_pass, tally_pass, top_images_pass
from tests.test_iou import write_activations
from tests.test_quantile import make_store, random_values, reference


class CountingSource:
    """A block source that counts its reads."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def n_blocks(self) -> int:
        return self.inner.n_blocks()

    def read(self, block: int):
        self.reads.append(block)
        return self.inner.read(block)


def _store(tmp_path: Path, n=23, k=5, hw=(3, 4), block=4, seed=0) -> tuple[str, np.ndarray]:
    values = random_values(np.random.default_rng(seed), (n, k, *hw), "mixed")
    return make_store(tmp_path / "a.zarr", values, block), values


@pytest.mark.parametrize("budget", [1, 1 << 24])  # radix (three passes) and top-k (one)
def test_thresholds_and_top_images_from_one_read(tmp_path, budget):
    path, values = _store(tmp_path)
    blocks = LayerBlocks(path, "l")
    thresholds, top = threshold_pass(blocks, 0.05, None, budget, top_n=3)
    np.testing.assert_allclose(thresholds, reference(values, 0.05), rtol=1e-6)
    (alone,) = reduce_in_process(top_images_pass(blocks, 3), range(blocks.n_blocks()))
    for name in ("index", "value", "maps"):
        np.testing.assert_array_equal(getattr(top, name), getattr(alone, name))
    maxima = values.max(axis=(2, 3)).T
    order = np.argsort(-maxima, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top.index, order)
    counting = CountingSource(blocks)
    from stages.thresholds.statistics import TopValues
    from stages.thresholds.top_images import TopImagesStat

    reduce_in_process(Pass(counting, (TopValues(4), TopImagesStat(3))), range(blocks.n_blocks()))
    assert sorted(counting.reads) == list(range(blocks.n_blocks()))  # each block read once


@pytest.mark.parametrize("scheduler", [None, "threads"])
def test_top_values_narrowed_by_the_merged_floor_are_exact_and_small(tmp_path, scheduler):
    from stages.thresholds.statistics import TopValues

    rng = np.random.default_rng(4)
    values = np.maximum(rng.standard_normal((60, 4, 3, 3)), 0).astype(np.float32)
    values[:, 1] = 0  # a dead unit: its floor is 0 and every later value ties it
    values[:, 2] = np.round(values[:, 2], 1)  # many ties
    blocks = LayerBlocks(make_store(tmp_path / "a.zarr", values, 5), "l")
    need = 20
    (tops,) = reduce_blocks(Pass(blocks, (TopValues(need),)), blocks.n_blocks(), scheduler,
                            progress=False)
    tops = tops.descending()
    flat = values.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_array_equal(tops, -np.sort(-flat, axis=1)[:, :need])
    merged = TopValues(need).chunk(blocks.read(0))
    narrowed = TopValues(need).refine(merged)
    np.testing.assert_array_equal(narrowed.floor, -np.sort(-merged.values, axis=1)[:, need - 1])
    later = narrowed.chunk(blocks.read(11)).values
    assert later.shape[1] <= int((flat[:, -45:] > narrowed.floor[:, None]).sum(axis=1).max())
    assert later.shape[1] < need


def _scoring_world(tmp_path, synthetic_root):
    """A concept store of the synthetic set, a 6-unit 7x7 layer over it, its thresholds."""
    from stages.concepts import ConceptsConfig, build_concept_store
    from storage.broden import read_broden

    store = build_concept_store(ConceptsConfig(synthetic_root, tmp_path / "c.zarr", 8, False), None)
    images = [r.image for r in read_broden(synthetic_root).images]
    rng = np.random.default_rng(3)
    acts = np.maximum(rng.standard_normal((len(images), 6, 7, 7)).astype(np.float32) - 0.5, 0)
    path = tmp_path / "a.zarr"
    write_activations(path, images, {"l": acts}, 5)
    blocks = LayerBlocks(str(path), "l")
    return store, blocks, exact_thresholds(blocks, 0.02), label_space(store, None)


def test_signatures_of_the_compiled_loop_equal_those_of_the_torch_masks(
        tmp_path, synthetic_root, monkeypatch):
    from tests.test_kernels import compiled_for

    store, blocks, thresholds, space = _scoring_world(tmp_path, synthetic_root)
    compiled_for((7, 7, store.sh, store.sw))
    n = blocks.n_blocks()
    (compiled,) = reduce_in_process(
        signature_pass(blocks, str(store.path), thresholds, space, kernel="compiled"), range(n))
    (masks,) = reduce_in_process(
        signature_pass(blocks, str(store.path), thresholds, space, kernel="torch"), range(n))
    compiled, masks = compiled.state_dict(), masks.state_dict()
    for key in masks:
        np.testing.assert_array_equal(compiled[key], masks[key])
        assert compiled[key].dtype == masks[key].dtype
    assert masks["unit_counts"].sum() > 0


def test_tally_and_signatures_in_one_pass_equal_separate_passes(tmp_path, synthetic_root):
    store, blocks, thresholds, space = _scoring_world(tmp_path, synthetic_root)
    scoring = TallyRule(union="lite", planes="multiset")
    n = blocks.n_blocks()
    (tally,) = reduce_in_process(tally_pass(blocks, str(store.path), thresholds, space, scoring),
                                 range(n))
    (signatures,) = reduce_in_process(signature_pass(blocks, str(store.path), thresholds, space),
                                      range(n))
    tally, signatures = tally.state_dict(), signatures.state_dict()
    counting = CountingSource(ScoringBlocks(blocks, str(store.path)))
    both = reduce_in_process(Pass(counting, (Tally(thresholds, space, scoring),
                                             Signatures(thresholds, space))), range(n))
    both = [p.state_dict() for p in both]
    assert sorted(counting.reads) == list(range(n))
    for key in tally:
        np.testing.assert_array_equal(both[0][key], tally[key])
    for key in signatures:
        np.testing.assert_array_equal(both[1][key], signatures[key])
    assert tally["intersection"].sum() > 0


def test_partials_round_trip_through_state_dict(tmp_path):
    path, _ = _store(tmp_path)
    blocks = LayerBlocks(path, "l")
    from stages.thresholds.statistics import RadixHistogram, TopValues
    from stages.thresholds.top_images import TopImagesStat

    reduction = Pass(blocks, (TopValues(7), TopImagesStat(2), Covariance(),
                              RadixHistogram(np.zeros((5, 2), np.int64), 0, 11)))
    partial = reduction.combine([reduction.chunk(0), reduction.chunk(1)])
    again = reduction.load_state_dict(reduction.state_dict(partial))
    for a, b in zip(partial, again, strict=True):
        assert type(a) is type(b)
        for key, value in a.state_dict().items():
            np.testing.assert_array_equal(value, b.state_dict()[key])


class Killed(Exception):
    pass


class DiesAfter:
    """A source that raises once ``limit`` blocks were read (a killed process)."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.reads = inner, limit, 0

    def n_blocks(self) -> int:
        return self.inner.n_blocks()

    def read(self, block: int):
        self.reads += 1
        if self.reads > self.limit:
            raise Killed
        return self.inner.read(block)


@pytest.mark.parametrize("scheduler", [None, "sync"])
def test_a_killed_pass_resumes_from_its_saved_partial(tmp_path, scheduler):
    path, values = _store(tmp_path, n=40, block=3)
    blocks = LayerBlocks(path, "l")
    n = blocks.n_blocks()
    from stages.thresholds.statistics import TopValues

    expected = reduce_in_process(Pass(blocks, (TopValues(9), Covariance())), range(n))
    saved = tmp_path / "pass.partial.npz"
    dying = DiesAfter(blocks, 8)
    with pytest.raises(Killed):
        run = Pass(dying, (TopValues(9), Covariance()))
        if scheduler is None:
            reduce_in_process(run, range(n), Checkpoint(saved, every=0))
        else:
            from stages.engine.reduction import reduce_with_dask

            reduce_with_dask(run, range(n), scheduler, split_every=2, progress=False,
                             checkpoint=Checkpoint(saved, every=0))
    assert saved.exists()
    counting = CountingSource(blocks)
    got = reduce_blocks(Pass(counting, (TopValues(9), Covariance())), n, scheduler,
                        progress=False, checkpoint=saved)
    assert len(counting.reads) < n  # blocks done before the kill were not read again
    assert not saved.exists()
    np.testing.assert_array_equal(got[0].descending(), expected[0].descending())
    np.testing.assert_allclose(got[1].scatter, expected[1].scatter, rtol=1e-12)


def test_covariance_equals_numpy(tmp_path):
    path, values = _store(tmp_path, n=31, k=6, block=4, seed=5)
    (moments,) = reduce_in_process(Pass(LayerBlocks(path, "l"), (Covariance(),)),
                                range(8))
    x = values.transpose(0, 2, 3, 1).reshape(-1, values.shape[1]).astype(np.float64)
    assert int(moments.count) == len(x)
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.scatter / (len(x) - 1), np.cov(x, rowvar=False),
                               rtol=1e-10, atol=1e-10)


def test_a_missing_store_is_one_user_error_line(tmp_path):
    from storage.errors import UserError, first_line

    with pytest.raises(UserError, match="activation store not found"):
        LayerBlocks(str(tmp_path / "nope.zarr"), "l").store()
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("  one\ntwo")) == "one"


def test_non_finite_units_are_found_even_when_finite_values_overflow_the_sum():
    from stages.engine.blocks import non_finite_units

    big = torch.full((3, 4, 2, 2), 3e38)  # finite, but their float32 sum is +inf
    assert non_finite_units(big).tolist() == []
    for value in (float("nan"), float("inf"), -float("inf")):
        values = torch.randn(3, 4, 2, 2)
        values[2, 1, 0, 1] = value
        values[0, 3, 1, 1] = value
        assert non_finite_units(values).tolist() == [1, 3]
        big[1, 2, 0, 0] = value
        assert non_finite_units(big).tolist() == [2]
        big[1, 2, 0, 0] = 3e38


def test_waves_start_one_block_per_thread_and_double():
    from stages.engine.reduction import wave_starts

    assert wave_starts(125, 2, 16, fresh=True) == [0, 2, 6, 14, 30, 46, 62, 78, 94, 110]
    assert wave_starts(40, 2, 16, fresh=False) == [0, 16, 32]  # resumed: full waves at once
    assert wave_starts(3, 4, 32, fresh=True) == [0] and wave_starts(0, 2, 16, True) == []
