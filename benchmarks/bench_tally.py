"""The IoU tally kernel alone on Broden-like data, against a NetDissect-Lite-structured loop.

    python -m benchmarks.bench_tally [--images 2048] [--baseline-images 256] [--block 128]
                                     [--repeats 3] [--torch-threads N]

Everything is in memory (no stores, no Dask), so the numbers are the kernel's own:
``tally_inputs`` + ``tally_block`` per block of images, run in-process and on a pool of
two threads (what the ``threads`` scheduler does), against a loop with NetDissect-Lite's
tally structure written from SEMANTICS.md: for each image, for each unit whose raw max
exceeds T, upsample that one map with ``F.interpolate``, threshold, ``np.argwhere``, and
``np.bincount`` every label plane at the mask pixels (also timed on two threads, each taking
half the images).  The loop gets its dense label planes for free (outside the timing); the
kernel's timing includes ``tally_inputs``.  Timings are ranges over ``--repeats`` runs; the
machine's load average is printed before and after, since other work skews them.

Data (seeded): a 512-unit 7×7 layer with spatially smooth, ReLU-like maps whose per-pair
amplitudes are heavy-tailed, thresholds at the exact q = 0.005 quantile (about 13% of
(image, unit) pairs active, ~2 hot cells each); 112×112 label planes drawn as Voronoi
regions: a colour plane, an object plane, 0–4 sparse part planes, a material plane on half
the images, a scene label on most images and a texture label on some (image-level),
~1,200 labels of which some are listed in two categories.  The loop computes union=lite,
planes=multiset (NetDissect-Lite's rule); the kernel is timed on that and on the default
(restricted, set), and the lite/multiset counts of both are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.kernels import float32_below, tally_block
from stages.labels import LabelSpace, label_space, tally_inputs
from storage.broden import LabelInfo
from storage.concepts import ConceptBlock

CATEGORIES = ["object", "part", "scene", "material", "texture", "color"]
CATEGORY_SIZES = {"object": 450, "part": 234, "scene": 420, "material": 32, "texture": 47,
                  "color": 11}
SHARED = 170  # labels listed in two categories (Broden has e.g. object/part/material overlaps)
SEG = 112
UNITS, MAP = 512, 7
MAX_PARTS = 4


@dataclass
class LabelStore:
    """Just what :func:`stages.labels.label_space` reads from a concept store."""

    categories: list[str]
    labels: dict[int, LabelInfo]


def make_labels(rng: np.random.Generator) -> tuple[LabelStore, dict[str, np.ndarray]]:
    """~1,200 labels over six categories; returns the store view and each category's labels."""
    numbers: dict[str, list[int]] = {}
    coverage: dict[int, dict[str, float]] = {}
    next_number = 1
    for cat in CATEGORIES:
        numbers[cat] = list(range(next_number, next_number + CATEGORY_SIZES[cat]))
        next_number += CATEGORY_SIZES[cat]
    pool = numbers["object"] + numbers["part"] + numbers["material"]
    for n in rng.choice(pool, SHARED, replace=False).tolist():  # reuse the number elsewhere
        home = next(c for c in ("object", "part", "material") if n in numbers[c])
        other = rng.choice([c for c in ("object", "part", "material") if c != home])
        numbers[str(other)].append(int(n))
    for cat, ns in numbers.items():
        for n in ns:
            coverage.setdefault(n, {})[cat] = float(rng.uniform(0.01, 1.0))
    labels = {n: LabelInfo(n, f"l{n}", cov, {c: 1 for c in cov}) for n, cov in coverage.items()}
    return LabelStore(CATEGORIES, labels), {c: np.array(v) for c, v in numbers.items()}


def voronoi_plane(rng: np.random.Generator, choices: np.ndarray, n_regions: int,
                  empty: float) -> np.ndarray:
    """A (SEG, SEG) plane of Voronoi regions labelled from ``choices`` (0 with prob. empty)."""
    seeds = rng.uniform(0, SEG, (n_regions, 2))
    yy, xx = np.mgrid[0:SEG, 0:SEG]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    region_labels = rng.choice(choices, n_regions)
    region_labels[rng.random(n_regions) < empty] = 0
    return region_labels[d.argmin(-1)].astype(np.int32)


def make_concepts(rng: np.random.Generator, n: int, by_cat: dict[str, np.ndarray]) -> ConceptBlock:
    """Label planes and image-level labels of n images, in the concept store's layout."""
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    n_planes = 3 + MAX_PARTS
    pixel = np.zeros((n, n_planes, SEG, SEG), np.int32)
    plane_cat = np.full((n, n_planes), -1, np.int8)
    image = np.zeros((n, 2), np.int32)
    image_cat = np.full((n, 2), -1, np.int8)
    for i in range(n):
        planes = [("color", voronoi_plane(rng, rng.choice(by_cat["color"], 6), 40, 0.0)),
                  ("object", voronoi_plane(rng, rng.choice(by_cat["object"], 8), 24, 0.2))]
        for _ in range(int(rng.choice(MAX_PARTS + 1, p=[0.05, 0.1, 0.2, 0.3, 0.35]))):
            planes.append(("part", voronoi_plane(rng, rng.choice(by_cat["part"], 4), 30, 0.8)))
        if rng.random() < 0.5:
            planes.append(("material", voronoi_plane(rng, by_cat["material"], 12, 0.3)))
        for j, (cat, plane) in enumerate(planes):
            pixel[i, j] = plane
            plane_cat[i, j] = cat_index[cat]
        slot = 0
        for cat, p in (("scene", 0.9), ("texture", 0.3)):
            if rng.random() < p:
                image[i, slot] = rng.choice(by_cat[cat])
                image_cat[i, slot] = cat_index[cat]
                slot += 1
    return ConceptBlock(pixel, plane_cat, image, image_cat)


def make_activations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, UNITS, MAP, MAP) smooth ReLU-like maps: one blob per map, heavy-tailed amplitude."""
    yy, xx = np.mgrid[0:MAP, 0:MAP].astype(np.float32)
    centre = rng.uniform(-0.5, MAP - 0.5, (n, UNITS, 2, 1, 1)).astype(np.float32)
    width = rng.uniform(0.55, 1.3, (n, UNITS, 1, 1)).astype(np.float32)
    amp = rng.lognormal(0.0, 0.5, (n, UNITS, 1, 1)).astype(np.float32)
    unit_scale = rng.gamma(2.0, 1.0, (1, UNITS, 1, 1)).astype(np.float32)
    blob = np.exp(-((yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2) / (2 * width**2))
    noise = rng.standard_normal((n, UNITS, MAP, MAP)).astype(np.float32) * 0.15
    return (np.maximum(amp * blob + noise - 0.3, 0) * unit_scale).astype(np.float32)


def exact_thresholds(acts: np.ndarray, q: float = 0.005) -> np.ndarray:
    """numpy's linear quantile 1 - q of every unit's raw values (SEMANTICS.md §1)."""
    values = acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1).astype(np.float64)
    return np.quantile(values, 1 - q, axis=1, method="linear")


def lite_loop(acts: np.ndarray, thresholds: np.ndarray, pixel: np.ndarray, image: np.ndarray,
              label_category: np.ndarray, n_categories: int) -> dict[str, np.ndarray]:
    """NetDissect-Lite's tally structure, per image and per unit (union=lite, multiset).

    pixel (B, P, S) and image (B, Q) hold dense label indices (0 = none).
    """
    b, k = acts.shape[:2]
    width = len(label_category)
    t32 = float32_below(torch.from_numpy(thresholds)).numpy()
    inter = np.zeros((k, width), np.int64)
    unit_area = np.zeros((k, n_categories), np.int64)
    label_area = np.zeros(width, np.int64)
    onehot = np.zeros((width, n_categories), np.int64)
    known = label_category >= 0
    onehot[np.nonzero(known)[0], label_category[known]] = 1
    for x in range(b):
        planes = pixel[x].reshape(-1, SEG, SEG)
        scalars = image[x][image[x] > 0]
        for plane in planes:
            label_area += np.bincount(plane.ravel(), minlength=width)
        label_area += np.bincount(scalars, minlength=width) * SEG * SEG
        maxima = acts[x].reshape(k, -1).max(axis=1)
        for unit in np.nonzero(maxima > t32)[0]:
            up = F.interpolate(torch.from_numpy(acts[x, unit])[None, None], size=(SEG, SEG),
                               mode="bilinear", align_corners=False)[0, 0].numpy()
            idx = np.argwhere(up > t32[unit])
            if len(idx) == 0:
                continue
            counts = np.zeros(width, np.int64)
            for plane in planes:
                counts += np.bincount(plane[idx[:, 0], idx[:, 1]], minlength=width)
            counts[scalars] += len(idx)
            counts[0] = 0
            inter[unit] += counts
            unit_area[unit] += len(idx) * ((counts > 0) @ onehot > 0)
    label_area[0] = 0
    return {"intersection": inter, "unit_area": unit_area, "label_area": label_area}


def time_loop(acts, thresholds, dense_pixel, dense_image, space: LabelSpace,
              threads: int) -> tuple[float, dict]:
    """Seconds for the loop over all images, split between ``threads`` threads."""
    def run(part: slice) -> dict[str, np.ndarray]:
        return lite_loop(acts[part], thresholds, dense_pixel[part], dense_image[part],
                         space.dense_category(), len(space.categories))

    half = -(-len(acts) // threads)
    parts = [slice(i, i + half) for i in range(0, len(acts), half)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(run, parts))
    seconds = time.perf_counter() - start
    return seconds, {key: np.sum([c[key] for c in counts], axis=0) for key in counts[0]}


def rows_of(concepts: ConceptBlock, rows: slice) -> ConceptBlock:
    return ConceptBlock(*(getattr(concepts, f)[rows] for f in ConceptBlock.__dataclass_fields__))


def kernel_block(acts, thresholds, concepts: ConceptBlock, space: LabelSpace, start: int,
                 block: int, union: str, planes: str) -> dict[str, np.ndarray]:
    """One block through the kernel exactly as the tally stage calls it.  Activation rows
    [start, start + block) take the labels of the same rows modulo the distinct label sets
    (a multiple of the block size, so the labels are a view, not a copy)."""
    labels = start % len(concepts.pixel_labels)
    inputs = tally_inputs(rows_of(concepts, slice(labels, labels + block)), space, planes, "cpu")
    counts = tally_block(torch.from_numpy(acts[start : start + block]),
                         torch.from_numpy(thresholds), inputs, space.n_labels, (SEG, SEG), union)
    return {key: value.numpy() for key, value in counts.items()}


def time_kernel(acts, thresholds, concepts, space, block: int, union: str, planes: str,
                threads: int) -> tuple[float, dict]:
    def run(start: int) -> dict[str, np.ndarray]:
        return kernel_block(acts, thresholds, concepts, space, start, block, union, planes)

    starts = range(0, len(acts), block)
    start = time.perf_counter()
    if threads == 1:
        parts = [run(s) for s in starts]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(run, starts))
    seconds = time.perf_counter() - start
    return seconds, {key: np.sum([p[key] for p in parts], axis=0) for key in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--baseline-images", type=int, default=256)
    parser.add_argument("--label-images", type=int, default=512, help="distinct label sets")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    store, by_cat = make_labels(rng)
    space = label_space(store, None)  # type: ignore[arg-type]
    if args.label_images % args.block or args.baseline_images > args.label_images:
        raise SystemExit("--label-images must be a multiple of --block and >= --baseline-images")
    concepts = make_concepts(rng, args.label_images, by_cat)
    acts = make_activations(rng, args.images)
    thresholds = exact_thresholds(acts)
    active = acts.reshape(*acts.shape[:2], -1).max(-1) > float32_below(
        torch.from_numpy(thresholds)).numpy()
    hot = (acts > thresholds[None, :, None, None]).sum(axis=(2, 3))
    planes = (concepts.plane_category >= 0).sum(1) + (concepts.image_label_category >= 0).sum(1)
    print(json.dumps({"images": args.images, "labels": space.n_labels,
                      "active_pairs": round(float(active.mean()), 4),
                      "hot_cells_per_active_pair": round(float(hot[active].mean()), 2),
                      "label_planes_per_image": round(float(planes.mean()), 2),
                      "torch_threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()}))

    nb = args.baseline_images
    dense = tally_inputs(rows_of(concepts, slice(0, nb)), space, "multiset", "cpu")
    loop_rates = {}
    for threads in (1, 2):
        rates = []
        for _ in range(args.repeats):
            seconds, loop_counts = time_loop(acts[:nb], thresholds, dense.pixel.numpy(),
                                             dense.image.numpy(), space, threads)
            rates.append(nb / seconds)
        loop_rates[threads] = rates
        print(f"NetDissect-Lite loop lite       multiset threads={threads}: "
              f"{min(rates):8.1f}–{max(rates):8.1f} images/s ({nb} images)")
    _, check = time_kernel(acts[:nb], thresholds, concepts, space, args.block, "lite",
                           "multiset", 1)
    for key in ("intersection", "unit_area", "label_area"):
        if not np.array_equal(check[key], loop_counts[key]):
            raise SystemExit(f"kernel and loop disagree on {key}")
    base = max(loop_rates[1])
    for union, plane_mode in (("lite", "multiset"), ("restricted", "set")):
        for threads in (1, 2):
            rates = []
            for _ in range(args.repeats):
                seconds, _ = time_kernel(acts, thresholds, concepts, space, args.block, union,
                                         plane_mode, threads)
                rates.append(args.images / seconds)
            print(f"kernel                {union:10s} {plane_mode:8s} threads={threads}: "
                  f"{min(rates):8.1f}–{max(rates):8.1f} images/s, best {max(rates) / base:5.1f}x "
                  f"the best single-thread loop")
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
