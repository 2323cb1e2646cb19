"""Kernels: the mask producers must give exactly the pixels of a full upsample, and every
tally kernel exactly the counts of the reference tally (stages/tally/reference.py)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.tally.classes import pixel_classes
from stages.tally.compiled import compiled_masks
from stages.tally.counts import block_counts, replicate_counts
from stages.tally.labels import BlockLabels
from stages.tally.masks import float32_below, skip_bound
from stages.tally.statistic import TallyRule, band_needed, mask_classes
from stages.tally.torch_masks import masked_pixels, row_bands_exact
from tests.passes import count_block

PINNED_TORCH = "2.14.1"  # pyproject.toml's pin, whose CPU arithmetic the compiled loop knows


def compiled_for(shape: tuple[int, int, int, int]):
    """The compiled producer of a shape.  On the pinned torch and an x86-64 CPU its absence
    is a failure (the tally would silently run ~10x slower); elsewhere the test skips with
    the reason in the summary."""
    found = compiled_masks(*shape)
    if found is None:
        where = f"torch {torch.__version__} on {platform.machine()}"
        if torch.__version__.split("+")[0] == PINNED_TORCH and platform.machine() == "x86_64":
            pytest.fail(f"no compiled form matches torch's CPU arithmetic for {shape} on {where}")
        pytest.skip(f"torch's CPU kernel takes a form the compiled loop does not know ({where})")
    return found


def full_pixels(maps: torch.Tensor, t32: torch.Tensor, size) -> set[tuple[int, int]]:
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    q, pix = torch.nonzero((up > t32[:, None, None]).reshape(len(maps), -1), as_tuple=True)
    return set(zip(q.tolist(), pix.tolist(), strict=True))


def random_maps(rng: np.random.Generator, p: int, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    x = rng.standard_normal((p, h, w)).astype(np.float32)
    if kind == 1:  # plateaus: ties at the threshold
        x = np.round(x)
    elif kind == 2:  # mostly zeros
        x = np.maximum(x - 1.5, 0)
    elif kind == 3:  # mixed magnitudes and negatives
        x = x * rng.choice([1e-4, 1.0, 1e4], size=(p, 1, 1)).astype(np.float32)
    return x


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (14, 14, 56, 56), (7, 9, 112, 100),
                                   (4, 5, 12, 14), (13, 13, 113, 113), (2, 2, 16, 16)])
def test_masked_pixels_equal_full_upsample(shape):
    h, w, sh, sw = shape
    rng = np.random.default_rng(sum(shape))
    for _ in range(25):
        maps = torch.from_numpy(random_maps(rng, 40, h, w))
        flat = maps.reshape(40, -1)
        # thresholds equal to stored values (ties), between values, zero and negative
        pick = flat[torch.arange(40), torch.from_numpy(rng.integers(0, h * w, 40))].double()
        t = torch.where(torch.from_numpy(rng.random(40) < 0.3), pick + 1e-9, pick)
        t[:3] = torch.tensor([0.0, -0.5, 1e-12], dtype=torch.float64)
        t32 = float32_below(t)
        active = maps.amax(dim=(1, 2)) > skip_bound(t32)
        q, pix = masked_pixels(maps[active], t32[active], (sh, sw))
        fast = set(zip(torch.nonzero(active)[:, 0][q].tolist(), pix.tolist(), strict=True))
        assert fast == full_pixels(maps, t32, (sh, sw))


def test_row_bands_only_where_exact():
    assert row_bands_exact(7, 7, 112, 112) in (True, False)  # machine-dependent, but checked
    assert not row_bands_exact(13, 13, 113, 113)  # not an integer factor: never banded
    assert not row_bands_exact(1, 1, 16, 16)


def test_float32_below_is_the_exact_comparison():
    t = torch.tensor([1.0 + 0.75 * 2**-23, 0.1, -0.1, 0.0, 3.0], dtype=torch.float64)
    t32 = float32_below(t)
    assert (t32.double() <= t).all()
    nxt = torch.nextafter(t32, torch.full_like(t32, float("inf")))
    assert (nxt.double() > t).all()


def test_set_semantics_across_categories_sharing_a_label(tmp_path):
    """A label listed in two categories, at the same pixel in a plane of each, counts once;
    planes of categories that share no label are never compared (and need not be)."""
    from stages.concepts import ConceptsConfig, build_concept_store
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.engine.reduction import Pass, reduce_in_process
    from stages.tally.labels import label_space
    from stages.tally.statistic import Tally
    from storage import activations as astore
    from tests.broden_factory import BrodenBuilder

    b = BrodenBuilder(tmp_path / "ds", ["color", "part", "material", "scene"], sh=4, sw=4)
    b.label(1, "red", color=1.0).label(48, "glass", part=0.2, material=0.1)
    b.label(300, "door", part=0.3).label(40, "sky", material=0.5).label(100, "park", scene=1.0)
    glass = np.zeros((4, 4), dtype=np.int64)
    glass[:2, :2] = 48
    part = np.where(glass > 0, 48, 300)
    material = np.where(glass > 0, 48, 40)
    for _ in range(3):
        b.image(planes={"color": [np.ones((4, 4), int)], "part": [part, part],
                        "material": [material]}, scalars={"scene": [100]})
    root = b.write()
    store = build_concept_store(ConceptsConfig(root, tmp_path / "c.zarr", 2, False), None)
    space = label_space(store, None)
    path = tmp_path / "a.zarr"
    acts = np.zeros((3, 1, 4, 4), dtype=np.float32)
    astore.create_store(path, store.image_paths(), {"l": (1, 4, 4)}, 2, "float32", {"m": 1})
    astore.write_block(path, 0, 0, {"l": acts[:2]})
    astore.write_block(path, 1, 2, {"l": acts[2:]})
    astore.mark_complete(path)
    for planes, expected in (("set", 3 * 4), ("multiset", 3 * 4 * 3)):
        tally = Tally(np.array([1.0]), space, TallyRule(planes=planes))
        (counts,) = reduce_in_process(
            Pass(ScoringBlocks(LayerBlocks(str(path), "l"), str(store.path)), [tally]), range(2))
        glass_index = int(space.lut[48])
        assert counts.label_area[glass_index] == expected


# --------------------------------------------------------------------------- the tally kernel
#
# count_block on in-memory label blocks against stages/tally/reference.py, on shapes with
# integer and non-integer scale factors, with maps built to hit
# the corners of the mask rule and labels built to hit the corners of set/multiset counting.

KERNEL_CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
# number -> categories listing it; the first is the primary one
KERNEL_LABELS = {
    **{n: ["color"] for n in range(1, 6)},
    **{n: ["object"] for n in range(10, 18)},
    **{n: ["part"] for n in range(20, 26)},
    **{n: ["material"] for n in range(30, 34)},
    **{n: ["scene"] for n in range(40, 44)},
    **{n: ["texture"] for n in range(50, 54)},
    17: ["object", "part"],  # shared: in object and part planes, scored as object
    33: ["material", "part"],  # shared: scored as material
    300: ["part"],  # above 255
}


def kernel_block(rng: np.random.Generator, n: int, sh: int, sw: int):
    """Random labels of n images: reference images, and the stored layout of a concept block
    (label numbers per plane, image-level numbers) with the lut of the scored labels."""
    from stages.tally.reference import RefImage

    by_cat = {c: [k for k, cats in KERNEL_LABELS.items() if c in cats] for c in KERNEL_CATEGORIES}

    def plane(choices: list[int], blobs: int, empty: float) -> np.ndarray:
        out = np.zeros((sh, sw), dtype=np.int64)
        for _ in range(blobs):
            y0, x0 = rng.integers(0, sh), rng.integers(0, sw)
            y1, x1 = rng.integers(y0 + 1, sh + 1), rng.integers(x0 + 1, sw + 1)
            out[y0:y1, x0:x1] = 0 if rng.random() < empty else rng.choice(choices)
        return out

    images = []
    for i in range(n):
        img = RefImage()
        img.planes["color"] = [plane(by_cat["color"], 12, 0.0)]
        if i % 5 != 4:
            img.planes["object"] = [plane(by_cat["object"], 6, 0.3)]
        parts = [plane(by_cat["part"], 4, 0.5) for _ in range(i % 4)]
        if len(parts) >= 2:  # the same label in two part planes at the same pixels
            parts[1][: sh // 2, : sw // 2] = parts[0][: sh // 2, : sw // 2] = 17
        img.planes["part"] = parts
        if i % 3 == 0:
            img.planes["material"] = [plane(by_cat["material"], 3, 0.2)]
        if i % 4 != 3:
            img.scalars["scene"] = [int(rng.choice(by_cat["scene"]))] * (1 + (i % 6 == 0))
        if i % 2:
            tex = [int(rng.choice(by_cat["texture"]))]
            img.scalars["texture"] = tex + [53] * (i % 3 == 1)
            img.planes["texture"] = [np.where(plane([53], 2, 0.0) > 0, 53, 0)] * (i % 5 == 1)
        images.append(img)
    n_planes = max(sum(len(p) for p in img.planes.values()) for img in images)
    n_image = max(sum(len(s) for s in img.scalars.values()) for img in images)
    pixel = np.zeros((n, n_planes, sh * sw), dtype=np.int32)
    image = np.zeros((n, n_image), dtype=np.int32)
    for i, img in enumerate(images):
        planes = [p for c in KERNEL_CATEGORIES for p in img.planes.get(c, [])]
        scalars = [s for c in KERNEL_CATEGORIES for s in img.scalars.get(c, [])]
        pixel[i, : len(planes)] = np.array(planes).reshape(len(planes), -1) if planes else 0
        image[i, : len(scalars)] = scalars
    numbers = sorted(KERNEL_LABELS)
    lut = np.zeros(max(numbers) + 1, dtype=np.int64)
    lut[numbers] = np.arange(1, len(numbers) + 1)
    category = [-1] + [KERNEL_CATEGORIES.index(KERNEL_LABELS[k][0]) for k in numbers]
    primary = {k: KERNEL_LABELS[k][0] for k in numbers}
    return images, pixel, image, lut, np.array(category), primary


def corner_maps(rng: np.random.Generator, n: int, h: int, w: int):
    """(n, 10, h, w) float32 maps and (10,) float64 thresholds, one corner per unit."""
    acts = np.zeros((n, 10, h, w), dtype=np.float32)
    thresholds = np.zeros(10, dtype=np.float64)
    acts[:, 0] = rng.standard_normal((n, h, w))
    thresholds[0] = np.quantile(acts[:, 0], 0.97)  # a few hot cells
    acts[:, 1] = np.round(rng.standard_normal((n, h, w)))  # plateaus exactly at T
    thresholds[1] = 1.0
    t = np.float32(0.3)  # values one ulp around T, and T itself
    around = np.array([np.nextafter(t, np.float32(-1)), t, np.nextafter(t, np.float32(1))])
    acts[:, 2] = rng.choice(around, (n, h, w))
    thresholds[2] = float(t)
    thresholds[3] = 0.0  # all-zero unit: empty masks
    thresholds[4] = -1.0  # all-zero unit below its threshold: whole-image masks
    acts[:, 5] = rng.uniform(0, 1, (n, h, w))  # hot cells on every border
    acts[::2, 5, 0, :] += 2
    acts[1::2, 5, -1, :] += 2
    acts[::3, 5, :, 0] += 2
    acts[1::3, 5, :, -1] += 2
    thresholds[5] = 1.5
    acts[:, 6] = rng.standard_normal((n, h, w)) * rng.choice([1e-30, 1.0, 1e30], (n, h, w))
    thresholds[6] = 0.5  # mixed magnitudes
    acts[:, 7] = -rng.uniform(1, 2, (n, h, w))  # negative maps and threshold
    thresholds[7] = -1.2
    acts[:, 8] = np.float32(1.0) + np.float32(2**-23) * rng.integers(-2, 3, (n, h, w))
    thresholds[8] = 1.0 + 2**-24  # between two float32s, on a plateau at 1.0
    acts[:, 9] = np.maximum(rng.standard_normal((n, h, w)) - 1.0, 0)  # mostly zero, T = 0
    return acts, thresholds


def kernel_tally(acts, thresholds, pixel, image, lut, category, union, planes, size, chunk,
                 kernel="auto"):
    counts = count_block(torch.from_numpy(acts), thresholds, BlockLabels(pixel, image), lut,
                         category, len(KERNEL_CATEGORIES), size, TallyRule(union, planes),
                         kernel=kernel, pair_chunk=chunk)
    return counts._asdict()


# integer scales (row bands in the torch producer; both compiled forms) and non-integer ones
# (whole maps), square and not, and a single output row
TALLY_SHAPES = [(7, 7, 112, 112), (6, 8, 96, 128), (14, 14, 56, 56), (4, 5, 12, 14),
                (5, 4, 37, 29), (2, 5, 3, 263)]


@pytest.mark.parametrize("shape", TALLY_SHAPES)
def test_tally_block_matches_reference(shape):
    """Every count, in every union x planes mode, as a pass counts (kernel "auto"), with
    the torch producer's pairs in one chunk and in chunks of 5."""
    from stages.tally.reference import reference_counts

    h, w, sh, sw = shape
    rng = np.random.default_rng(sum(shape))
    images, pixel, image, lut, category, primary = kernel_block(rng, 6, sh, sw)
    acts, thresholds = corner_maps(rng, 6, h, w)
    for union in ("restricted", "global", "lite"):
        for planes in ("set", "multiset"):
            ref = reference_counts(acts, thresholds, images, KERNEL_CATEGORIES, primary, union,
                                   planes, (sh, sw))
            for kernel, chunk in (("auto", 2048), ("torch", 2048), ("torch", 5)):
                got = kernel_tally(acts, thresholds, pixel, image, lut, category, union, planes,
                                   (sh, sw), chunk, kernel)
                np.testing.assert_array_equal(got["intersection"][:, 1:], ref["intersection"])
                np.testing.assert_array_equal(got["unit_area"], ref["unit_area"])
                np.testing.assert_array_equal(got["label_area"][1:], ref["label_area"])
                assert (got["intersection"][:, 0] == 0).all() and got["label_area"][0] == 0


def test_tally_corners_are_hit():
    """Guard the fixture: the corners above really occur on the benchmark's shape."""
    from stages.tally.reference import reference_mask

    rng = np.random.default_rng(7 + 7 + 112 + 112)
    kernel_block(rng, 6, 112, 112)
    acts, thresholds = corner_maps(rng, 6, 7, 7)
    areas = np.array([[reference_mask(acts[x, k], thresholds[k], (112, 112)).sum()
                       for k in range(10)] for x in range(6)])
    assert (areas[:, 3] == 0).all() and (areas[:, 4] == 112 * 112).all()
    for k in (0, 1, 2, 5, 6, 8):
        assert 0 < areas[:, k].sum() < 6 * 112 * 112, k


@pytest.mark.parametrize("shape", TALLY_SHAPES)
@pytest.mark.parametrize("kernel", ["torch", "compiled"])
def test_each_tally_kernel_matches_reference(shape, kernel):
    """Both producers, named: the torch one (GPUs, and CPUs where the compiled loop is not
    exact) and the compiled CPU loop, on every shape and union x planes mode."""
    from stages.tally.reference import reference_counts

    h, w, sh, sw = shape
    if kernel == "compiled":
        compiled_for(shape)
    rng = np.random.default_rng(sum(shape) + 1)
    images, pixel, image, lut, category, primary = kernel_block(rng, 5, sh, sw)
    acts, thresholds = corner_maps(rng, 5, h, w)
    for union in ("restricted", "global", "lite"):
        for planes in ("set", "multiset"):
            ref = reference_counts(acts, thresholds, images, KERNEL_CATEGORIES, primary, union,
                                   planes, (sh, sw))
            got = kernel_tally(acts, thresholds, pixel, image, lut, category, union, planes,
                               (sh, sw), 7, kernel=kernel)
            np.testing.assert_array_equal(got["intersection"][:, 1:], ref["intersection"])
            np.testing.assert_array_equal(got["unit_area"], ref["unit_area"])
            np.testing.assert_array_equal(got["label_area"][1:], ref["label_area"])


@pytest.mark.parametrize("shape", TALLY_SHAPES + [(14, 14, 112, 112), (7, 7, 112, 16), (1, 1, 9, 9)])
def test_compiled_values_are_torch_bit_for_bit(shape):
    """The compiled form's values equal F.interpolate on maps it was not chosen on."""
    h, w, sh, sw = shape
    plan = compiled_for(shape)
    rng = np.random.default_rng(sum(shape) + 2)
    maps = np.concatenate([random_maps(rng, 30, h, w) for _ in range(8)])
    full = F.interpolate(torch.from_numpy(maps)[:, None], size=(sh, sw), mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    np.testing.assert_array_equal(plan.upsample(maps), full)


def test_compiled_tally_runs_on_cpu_and_falls_back_where_not_exact(monkeypatch):
    """"auto" takes the compiled loop on CPU for the benchmark's shape; where no form is
    exact it takes the torch producer (same counts), and "compiled" refuses."""
    import stages.tally.statistic as statistic

    compiled_for((7, 7, 112, 112))
    rng = np.random.default_rng(9)
    _, pixel, image, lut, category, _ = kernel_block(rng, 4, 112, 112)
    acts, thresholds = corner_maps(rng, 4, 7, 7)
    args = (acts, thresholds, pixel, image, lut, category, "lite", "set", (112, 112), 64)
    called = []
    monkeypatch.setattr(statistic, "compiled_masks", lambda *shape: called.append(shape) or
                        compiled_masks(*shape))
    auto = kernel_tally(*args)
    assert called == [(7, 7, 112, 112)]
    monkeypatch.setattr(statistic, "compiled_masks", lambda *shape: None)
    fallback = kernel_tally(*args)
    for key in auto:
        np.testing.assert_array_equal(auto[key], fallback[key])
    with pytest.raises(ValueError, match="not exact"):
        kernel_tally(*args, kernel="compiled")


def test_pixel_classes_group_exactly_the_equal_label_tuples():
    """Pixels share a class iff they carry the same label in every plane: runs, repeats far
    apart, and thousands of distinct tuples (hash collisions and probing)."""
    from stages.tally.classes import _pixel_classes

    rng = np.random.default_rng(4)
    for planes, alphabet, n in [(3, 4, 600), (4, 2000, 5000), (1, 1, 50), (0, 1, 40)]:
        dense = rng.integers(0, alphabet, (planes, n)).astype(np.int64)
        dense[:, 100:140] = dense[:, 99:100]  # a run
        cls, rep = np.empty(n, np.int64), np.empty(n, np.int64)
        n_classes = _pixel_classes(dense, cls, rep, np.empty(1 << (2 * n).bit_length(), np.int64))
        _, expected = np.unique(dense.T, axis=0, return_inverse=True)
        assert n_classes == expected.max() + 1 if planes else n_classes == 1
        # the same partition: class ids map one-to-one onto the unique tuples
        assert len(set(zip(cls.tolist(), expected.ravel().tolist(), strict=True))) == n_classes
        assert (dense[:, rep[cls]] == dense).all()


def test_skip_bound_keeps_a_margin_below_the_threshold():
    """Pairs whose raw max is a few ulps below T are still upsampled: float32 interpolation
    may overshoot a flat region on some backends, so the skip must not be tight."""
    t32 = float32_below(torch.tensor([1.0, -1.0, 3e-30, 7e30, 0.1], dtype=torch.float64))
    eps = torch.finfo(torch.float32).eps
    near = t32 - 8 * eps * t32.abs()
    assert (skip_bound(t32) < near).all() and (near < t32).all()


def test_tally_block_without_active_units():
    """A block where no unit reaches its threshold still counts label areas and categories."""
    from stages.tally.reference import reference_counts

    rng = np.random.default_rng(5)
    images, pixel, image, lut, category, primary = kernel_block(rng, 3, 112, 112)
    acts = np.zeros((3, 4, 7, 7), dtype=np.float32)
    thresholds = np.ones(4)
    for union in ("restricted", "lite"):
        for planes in ("set", "multiset"):
            ref = reference_counts(acts, thresholds, images, KERNEL_CATEGORIES, primary, union,
                                   planes, (112, 112))
            got = kernel_tally(acts, thresholds, pixel, image, lut, category, union, planes,
                               (112, 112), 1024)
            np.testing.assert_array_equal(got["label_area"][1:], ref["label_area"])
            assert not got["intersection"].any() and not got["unit_area"].any()


@pytest.mark.parametrize("extra", [[1], [3, 2], [10], [11], [0, 4]])
def test_merge_top_keeps_the_top_of_the_union_with_ties(extra):
    """A full list met by a few columns trades only its smallest (extra <= k/2); wider
    merges select over everything.  Either way: the top k of the union, as values."""
    from stages.thresholds.kernels import merge_top

    rng = np.random.default_rng(sum(extra))
    k = 20
    full = torch.from_numpy(np.round(rng.random((6, k)), 1).astype(np.float32))
    full[0] = 0.5  # a unit whose list is one value repeated
    parts = [full] + [torch.from_numpy(np.round(rng.random((6, c)), 1).astype(np.float32))
                      for c in extra]
    union = torch.cat(parts, dim=1).numpy()
    got = merge_top(parts, k).numpy()
    assert got.shape == (6, k)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(union, axis=1)[:, -k:])


def test_gpus_take_the_torch_tally(monkeypatch):
    """Device selection, checked on CPU: a CUDA block never asks for a compiled form, and
    asking for the compiled loop there is an error; a CPU block gets its form."""
    import stages.tally.statistic as statistic

    monkeypatch.setattr(statistic, "compiled_masks", lambda *shape: pytest.fail("asked"))
    for kernel in ("auto", "torch"):
        assert statistic.mask_kernel(torch.device("cuda"), (7, 7, 112, 112), kernel) is None
    with pytest.raises(ValueError, match="not exact"):
        statistic.mask_kernel(torch.device("cuda"), (7, 7, 112, 112), "compiled")
    with pytest.raises(ValueError, match="unknown tally kernel"):
        statistic.mask_kernel(torch.device("cpu"), (7, 7, 112, 112), "numba")
    monkeypatch.undo()
    assert statistic.mask_kernel(torch.device("cpu"), (7, 7, 112, 112)) is \
        compiled_masks(7, 7, 112, 112)


def test_compiled_tally_refuses_label_numbers_outside_the_lut():
    """Compiled code does not check bounds itself: a stored number past the label list (a
    damaged store) is an error, in a plane or as an image-level label."""
    compiled_for((7, 7, 112, 112))
    rng = np.random.default_rng(2)
    _, pixel, image, lut, category, _ = kernel_block(rng, 2, 112, 112)
    acts, thresholds = corner_maps(rng, 2, 7, 7)
    for where in ("plane", "image"):
        bad_pixel, bad_image = pixel.copy(), image.copy()
        if where == "plane":
            bad_pixel[1, 0, 500] = len(lut)
        else:
            bad_image[0, 0] = len(lut) + 7
        with pytest.raises(IndexError, match="outside"):
            kernel_tally(acts, thresholds, bad_pixel, bad_image, lut, category, "restricted",
                         "set", (112, 112), 64, kernel="compiled")


def test_class_signatures_are_every_pixels_label_set():
    """labels[pixel_class] is each pixel's signature: its planes' and image-level dense
    labels, each once, ascending, zeros first (SEMANTICS.md §6), and occurrences counts each
    of them once per plane and image-level entry carrying it - checked pixel by pixel."""
    rng = np.random.default_rng(12)
    _, pixel, image, lut, _, _ = kernel_block(rng, 6, 20, 24)
    lut = lut.copy()
    lut[[12, 31]] = 0  # unscored labels vanish from signatures
    classes = pixel_classes(BlockLabels(pixel, image), lut)
    cls, rows = classes.pixel_class, classes.labels
    width = pixel.shape[1] + image.shape[1]
    assert rows.shape == (cls.max() + 1, width) and len(np.unique(cls)) == len(rows)
    assert (np.bincount(cls.ravel(), minlength=len(rows)) == classes.size).all()
    for b in range(len(pixel)):
        assert (classes.image()[cls[b]] == b).all()
        for s in range(pixel.shape[2]):
            entries = [int(lut[v]) for v in [*pixel[b, :, s], *image[b]] if lut[v]]
            labels = sorted(set(entries))
            expected = [0] * (width - len(labels)) + labels
            assert rows[cls[b, s]].tolist() == expected, (b, s)
            counts = classes.occurrences[cls[b, s]]
            assert counts[width - len(labels):].tolist() == [entries.count(n) for n in labels]


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (4, 5, 12, 14), (5, 4, 37, 29)])
@pytest.mark.parametrize("kernel", ["torch", "compiled"])
def test_banded_masks_count_as_each_threshold_alone(shape, kernel):
    """Several thresholds per unit in one read (the bootstrap's replicates, SEMANTICS.md §8):
    the counts of replicate r, all weights 1, equal the counts at its thresholds alone, in
    every union x planes mode - ties, repeats and unordered replicates included."""
    h, w, sh, sw = shape
    if kernel == "compiled":
        compiled_for(shape)
    rng = np.random.default_rng(sum(shape) + 3)
    _, pixel, image, lut, category, _ = kernel_block(rng, 5, sh, sw)
    acts, base = corner_maps(rng, 5, h, w)
    spread = np.abs(base) * 0.2 + 0.05
    columns = [base, base - spread, base, base + spread, base - 2 * spread]
    thresholds = np.stack(columns, axis=1)
    thresholds[1, 3] = 1.0  # a replicate exactly at a plateau
    classes = pixel_classes(BlockLabels(pixel, image), lut)
    banded = mask_classes(torch.from_numpy(acts), thresholds, classes, (sh, sw), kernel, 7)
    need = band_needed(thresholds)
    n_labels, n_units = len(category) - 1, acts.shape[1]
    every = np.tile(np.arange(1, n_labels + 1), (n_units, 1))
    weights = np.ones((len(acts), len(columns)), np.int64)
    for union in ("restricted", "global", "lite"):
        for planes in ("set", "multiset"):
            got = replicate_counts(banded, classes, n_units, category, len(KERNEL_CATEGORIES),
                                   planes, union, every, weights, need)
            for r in range(len(columns)):
                alone = mask_classes(torch.from_numpy(acts), thresholds[:, r], classes,
                                     (sh, sw), kernel, 7)
                want = block_counts(alone, classes, n_units, category, len(KERNEL_CATEGORIES),
                                    planes, union)
                np.testing.assert_array_equal(got.intersection[r], want.intersection[:, 1:])
                np.testing.assert_array_equal(got.unit_area[r], want.unit_area)
                np.testing.assert_array_equal(got.label_area[r][1:], want.label_area[1:])


def test_a_recorded_form_is_taken_only_for_its_own_machine_and_shape(monkeypatch):
    """A run records the compiled form it checked (:class:`VerifiedForm`); a block on the
    same machine and shape takes it without checking again, any other record is ignored
    and the form is checked here."""
    import stages.tally.statistic as statistic
    from stages.tally.compiled import VARIANTS, VerifiedForm, form_of, machine_digest

    shape = (7, 7, 112, 112)
    found = compiled_masks(*shape)
    variant = next(v for v in range(len(VARIANTS)) if form_of(shape, v) is found)
    other = (variant + 1) % len(VARIANTS)
    foreign = (VerifiedForm("0" * 16, shape, other), VerifiedForm(machine_digest(),
                                                                  (7, 7, 56, 56), other))
    mine = VerifiedForm(machine_digest(), shape, variant)
    monkeypatch.setattr(statistic, "compiled_masks", lambda *s: pytest.fail("checked again"))
    assert statistic.mask_kernel("cpu", shape, "auto", (*foreign, mine)) is found
    none_exact = VerifiedForm(machine_digest(), shape, -1)
    assert statistic.mask_kernel("cpu", shape, "auto", (none_exact,)) is None
    called = []
    monkeypatch.setattr(statistic, "compiled_masks",
                        lambda *s: called.append(s) or compiled_masks(*s))
    assert statistic.mask_kernel("cpu", shape, "auto", foreign) is found
    assert called == [shape]
