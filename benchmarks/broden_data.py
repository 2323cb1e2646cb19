"""Broden-scale synthetic data for benchmarks: a label directory and activation stores.

Why not the tool's own synthetic generator: it draws ~50 labels from rendered scenes, while
the tally's cost depends on Broden's shape — ~1,200 labels over six categories, Zipf-like
label frequencies, up to 7 pixel planes per image at 112x112, blob-shaped regions — and on
activation sparsity (~13% of (image, unit) pairs reach the threshold).  Everything here is
drawn from seeded generators keyed by (seed, image) or (seed, layer, block), so any prefix
of a dataset equals the smaller dataset and reruns reuse what is on disk.

- :func:`ensure_dataset`: a *pool* of the largest size (label PNGs, CSVs) plus, for each
  smaller size, a directory with the pool's first rows in ``index.csv`` and ``images/``
  linked to the pool's.  No RGB images are written: building a concept store decodes only
  the label planes (the ``image`` column is never opened).
- :func:`ensure_activations`: float32 stores written with ``storage.activations`` (no model),
  ReLU-like, spatially smooth maps with a few hot cells per active pair.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from storage import activations as astore
from storage.artifacts import Artifact, atomic_dir
from storage.broden_writer import BrodenWriter

LABELS_VERSION = 2  # bump whenever the label directory's bytes change
ACTIVATIONS_VERSION = 1  # bump whenever the activation stores' values change
IMAGE_SIZE, SEG_SIZE = 224, 112
IMAGE_DIR = "bench"
CATEGORY_ORDER = ("color", "object", "part", "material", "scene", "texture")  # category.csv
# labels each c_<category>.csv lists: Broden1's counts (1,376 listings of 1,197 labels)
CATEGORY_SIZES = {"color": 11, "object": 584, "part": 234, "material": 32, "scene": 468,
                  "texture": 47}
SHARED_WITH_OBJECT = {"part": 170, "material": 9}  # object labels also listed there
ZIPF_EXPONENT = {"color": 0.3, "object": 1.0, "part": 1.0, "material": 0.8, "scene": 0.9,
                 "texture": 0.2}
PART_PLANES_P = (0.1, 0.1, 0.2, 0.25, 0.35)  # P(0..4 part planes)
TEXTURES_P = (0.5, 0.35, 0.15)  # P(0..2 image-level textures)
VAL_FRACTION = 0.2

# activations: per (image, unit) Poisson(rate) Gaussian bumps over a weak smooth background;
# BUMP_RATE was tuned once so that about 13% of pairs reach their q=0.005 threshold (the
# benchmark measures and reports the actual fraction)
MAP_SIZE = 7
BUMP_RATE = 0.13
ACTIVATION_BLOCK = 64  # the pipeline's default dataset.block_size
LAYERS = {"resnet18": 512, "resnet50": 2048}  # model -> units of its layer4 (7x7 at 224 px)
LAYER = "layer4"


# --------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelTable:
    """Label numbers listed per category, in Zipf rank order (most frequent first)."""

    names: dict[int, str]
    ranked: dict[str, list[int]]  # category -> listed label numbers, rank order

    def zipf(self, category: str) -> np.ndarray:
        ranks = np.arange(1, len(self.ranked[category]) + 1, dtype=np.float64)
        p = ranks ** -ZIPF_EXPONENT[category]
        return p / p.sum()


def label_table(seed: int) -> LabelTable:
    """Broden1-like numbering: colours 1-11, objects, part-only, material-only, scenes,
    textures; some object labels are also parts or materials (as in Broden)."""
    rng = np.random.default_rng([seed, 1])
    names: dict[int, str] = {}
    listed: dict[str, list[int]] = {}
    number = 1
    for cat in CATEGORY_ORDER:
        own = CATEGORY_SIZES[cat] - SHARED_WITH_OBJECT.get(cat, 0)
        listed[cat] = list(range(number, number + own))
        for i, n in enumerate(listed[cat]):
            names[n] = f"{cat}-{i:03d}"
        number += own
    for cat, shared in SHARED_WITH_OBJECT.items():
        listed[cat] += sorted(rng.choice(listed["object"], size=shared, replace=False).tolist())
    ranked = {cat: rng.permutation(listed[cat]).tolist() for cat in CATEGORY_ORDER}
    return LabelTable(names, ranked)


# --------------------------------------------------------------------------- one image
def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates a coarse grid (corners aligned)."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(pos.astype(int), n_in - 2)
    frac = pos - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] = 1 - frac
    w[np.arange(n_out), lo + 1] = frac
    return w


_COARSE = 6
_WARP = _bilinear_weights(_COARSE, SEG_SIZE)
_AXIS = (np.arange(SEG_SIZE) + 0.5) / SEG_SIZE


def blob_partition(rng: np.random.Generator, n_regions: int) -> np.ndarray:
    """(S, S) region index: a weighted Voronoi diagram over smoothly warped coordinates, so
    regions are irregular blobs of varied size (not salt-and-pepper)."""
    warp_y = _WARP @ rng.standard_normal((_COARSE, _COARSE)) @ _WARP.T * 0.08
    warp_x = _WARP @ rng.standard_normal((_COARSE, _COARSE)) @ _WARP.T * 0.08
    yy = _AXIS[:, None] + warp_y
    xx = _AXIS[None, :] + warp_x
    seeds = rng.random((n_regions, 2))
    weight = rng.uniform(0.5, 1.5, n_regions)
    dist = ((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
    return np.argmin(dist / weight[:, None, None] ** 2, axis=0)


def _labelled(partition: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return labels[partition].astype(np.int32)


def _draw(rng: np.random.Generator, table: LabelTable, cat: str, n: int,
          p_none: float = 0.0) -> np.ndarray:
    """n labels of ``cat`` by Zipf rank; each is 0 (unlabelled) with probability p_none."""
    labels = rng.choice(table.ranked[cat], size=n, p=table.zipf(cat))
    return np.where(rng.random(n) < p_none, 0, labels)


@dataclass
class ImageLabels:
    planes: dict[str, list[np.ndarray]]  # category -> (S, S) int32 label planes
    scalars: dict[str, list[int]]  # category -> image-level labels


def render_labels(index: int, seed: int, table: LabelTable) -> ImageLabels:
    """The labels of image ``index``: pure in (index, seed)."""
    rng = np.random.default_rng([seed, 2, index])
    color = _labelled(blob_partition(rng, int(rng.integers(4, 11))),
                      _draw(rng, table, "color", 10))
    n_obj = int(rng.integers(2, 10))
    obj_regions = blob_partition(rng, n_obj)
    obj_labels = _draw(rng, table, "object", n_obj, p_none=0.1)
    obj = _labelled(obj_regions, obj_labels)
    parts = []
    area = np.bincount(obj_regions.ravel(), minlength=n_obj) * (obj_labels > 0)
    n_parts = int(rng.choice(len(PART_PLANES_P), p=PART_PLANES_P)) if area.any() else 0
    for _ in range(n_parts):
        host = rng.choice(n_obj, p=area / area.sum())
        n_part = int(rng.integers(2, 5))
        plane = _labelled(blob_partition(rng, n_part), _draw(rng, table, "part", n_part, 0.25))
        plane = np.where(obj_regions == host, plane, 0).astype(np.int32)
        if plane.any():
            parts.append(plane)
    n_mat = int(rng.integers(2, 6))
    material = _labelled(blob_partition(rng, n_mat), _draw(rng, table, "material", n_mat, 0.3))
    scene = [int(_draw(rng, table, "scene", 1)[0])]
    n_tex = int(rng.choice(len(TEXTURES_P), p=TEXTURES_P))
    texture = [int(t) for t in rng.choice(table.ranked["texture"], size=n_tex, replace=False,
                                          p=table.zipf("texture"))]
    planes = {"color": [color], "object": [obj], "part": parts, "material": [material]}
    return ImageLabels(planes, {"scene": scene, "texture": texture})


def image_name(index: int) -> str:
    return f"{IMAGE_DIR}/{index:06d}.jpg"


def plane_name(index: int, cat: str, k: int) -> str:
    return f"{IMAGE_DIR}/{index:06d}_{cat}_{k + 1}.png"


# --------------------------------------------------------------------------- the directory
@dataclass
class Census:
    """What a generated dataset holds (written beside it, reported by the benchmark)."""

    images: int
    labels: int  # distinct label numbers in label.csv
    listed: dict[str, int]  # labels each c_<category>.csv lists
    occurring: dict[str, int]  # labels of each category that occur at least once
    pixel_planes_mean: float
    pixel_planes_max: int
    image_labels_mean: float
    png_bytes_mean: float
    png_bytes_total: int
    top10_share: dict[str, float]  # share of occurrences taken by the 10 most frequent labels


def _pool_artifact(path: Path, n_images: int, seed: int) -> Artifact:
    return Artifact(path, {"generator": "benchmarks.broden_data", "version": LABELS_VERSION,
                           "n_images": n_images, "seed": seed, "image_size": IMAGE_SIZE,
                           "seg_size": SEG_SIZE})


def _subset_artifact(path: Path, n_images: int, pool: Artifact) -> Artifact:
    return Artifact(path, {"pool": pool.key, "n_images": n_images})


def _split(index: int, seed: int) -> str:
    return "val" if np.random.default_rng([seed, 3, index]).random() < VAL_FRACTION else "train"


def _generate_pool(path: Path, n_images: int, seed: int, progress: bool) -> Census:
    from tqdm.auto import tqdm

    table = label_table(seed)
    plane_counts, scalar_counts, png_bytes = [], [], 0
    with atomic_dir(path) as tmp:
        writer = BrodenWriter(tmp, CATEGORY_ORDER)
        for n in sorted(table.names):
            writer.label(n, table.names[n], [c for c in CATEGORY_ORDER if n in table.ranked[c]])
        for index in tqdm(range(n_images), desc="broden labels", unit="img",
                          disable=None if progress else True):
            labels = render_labels(index, seed, table)
            entries = {cat: [*((plane_name(index, cat, k), plane)
                               for k, plane in enumerate(labels.planes.get(cat, []))),
                             *labels.scalars.get(cat, [])] for cat in CATEGORY_ORDER}
            writer.add_image(image_name(index), _split(index, seed),
                             (IMAGE_SIZE, IMAGE_SIZE, SEG_SIZE, SEG_SIZE), entries)
            png_bytes += sum((writer.images_dir / e[0]).stat().st_size
                             for items in entries.values() for e in items if isinstance(e, tuple))
            plane_counts.append(sum(len(p) for p in labels.planes.values()))
            scalar_counts.append(sum(len(s) for s in labels.scalars.values()))
        writer.write_tables()
        freq = {c: np.array(sorted(writer.frequency[c].values(), reverse=True) or [0])
                for c in CATEGORY_ORDER}
        census = Census(
            images=n_images, labels=len(table.names),
            listed={c: len(table.ranked[c]) for c in CATEGORY_ORDER},
            occurring={c: int((freq[c] > 0).sum()) for c in CATEGORY_ORDER},
            pixel_planes_mean=float(np.mean(plane_counts)), pixel_planes_max=max(plane_counts),
            image_labels_mean=float(np.mean(scalar_counts)),
            png_bytes_mean=png_bytes / max(sum(plane_counts), 1), png_bytes_total=png_bytes,
            top10_share={c: float(freq[c][:10].sum() / max(freq[c].sum(), 1))
                         for c in CATEGORY_ORDER},
        )
        (tmp / "census.json").write_text(json.dumps(asdict(census), indent=1) + "\n")
    return census


def _write_subset(path: Path, pool: Path, n_images: int) -> None:
    """The pool's first ``n_images`` rows: its own index.csv, the pool's tables and images."""
    with atomic_dir(path) as tmp:
        lines = (pool / "index.csv").read_text(encoding="utf-8").splitlines()
        (tmp / "index.csv").write_text("\n".join(lines[: n_images + 1]) + "\n", encoding="utf-8")
        for name in ["category.csv", "label.csv", *[f"c_{c}.csv" for c in CATEGORY_ORDER]]:
            (tmp / name).write_bytes((pool / name).read_bytes())
        os.symlink(pool.resolve() / "images", tmp / "images")


def render_image(index: int, seed: int, table: LabelTable) -> np.ndarray:
    """(224, 224, 3) uint8 RGB of image ``index``: its object regions in colours of their
    labels, upsampled, with pixel noise (JPEG-decoding costs what a photograph's does)."""
    objects = render_labels(index, seed, table).planes["object"][0]
    palette = np.random.default_rng([seed, 6]).integers(0, 256, (max(table.names) + 1, 3))
    rgb = palette[np.repeat(np.repeat(objects, 2, axis=0), 2, axis=1)].astype(np.float32)
    noise = np.random.default_rng([seed, 7, index]).normal(0, 12, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _render_range(pool: Path, seed: int, start: int, stop: int) -> int:
    from PIL import Image

    table = label_table(seed)
    for index in range(start, stop):
        Image.fromarray(render_image(index, seed, table)).save(
            pool / "images" / image_name(index), quality=90)
    return stop - start


def ensure_images(workdir: Path, n_images: int, seed: int = 0, progress: bool = True) -> None:
    """A 224-px JPEG for every image of the pool of ``n_images`` (what ``extract`` decodes;
    the label pool itself writes none), made once, on every core (each image is a function
    of its index and the seed alone)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    pool = dataset_path(workdir, n_images).absolute()
    made = Artifact(pool / "jpegs.json", {"pool": _pool_artifact(pool, n_images, seed).key,
                                          "quality": 90})
    if made.is_current():
        return
    starts = range(0, n_images, 500)
    with ProcessPoolExecutor(os.cpu_count() or 1) as workers, tqdm(
            total=n_images, desc="broden images", unit="img",
            disable=None if progress else True) as bar:
        for done in workers.map(_render_range, *zip(*[
                (pool, seed, a, min(a + 500, n_images)) for a in starts], strict=True)):
            bar.update(done)
    made.path.write_text(json.dumps({"images": n_images}) + "\n")
    made.commit(images=n_images)


def dataset_path(workdir: Path, n_images: int) -> Path:
    return workdir / "data" / f"broden_{n_images}"


def ensure_dataset(workdir: Path, sizes: list[int], seed: int = 0,
                   progress: bool = True) -> Census:
    """Label directories for every size in ``sizes`` (the largest is the pool); reused when
    current.  Returns the pool's census."""
    largest = max(sizes)
    pool = _pool_artifact(dataset_path(workdir, largest).absolute(), largest, seed)
    if not pool.is_current():
        pool.forget()
        _generate_pool(pool.path, largest, seed, progress)
        pool.commit(images=largest)
    for n in sorted(set(sizes) - {largest}):
        subset = _subset_artifact(dataset_path(workdir, n).absolute(), n, pool)
        if not subset.is_current():
            subset.forget()
            _write_subset(subset.path, pool.path, n)
            subset.commit(images=n)
    return Census(**json.loads((pool.path / "census.json").read_text()))


# --------------------------------------------------------------------------- activations
_SMOOTH = np.array([0.25, 0.5, 0.25], np.float32)


def _smooth(x: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur over the last two axes, edges replicated."""
    for axis in (-2, -1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(_SMOOTH))
    return x


@dataclass(frozen=True)
class UnitProfile:
    scale: np.ndarray  # (K,) overall magnitude of each unit
    rate: np.ndarray  # (K,) expected hot bumps per image


def unit_profile(seed: int, units: int) -> UnitProfile:
    rng = np.random.default_rng([seed, 4, units])
    return UnitProfile(rng.gamma(2.0, 1.0, units).astype(np.float32),
                       (BUMP_RATE * rng.lognormal(0.0, 0.5, units)).astype(np.float32))


def activation_block(seed: int, units: int, block: int, profile: UnitProfile) -> np.ndarray:
    """(ACTIVATION_BLOCK, K, 7, 7) float32: ReLU of a weak smooth background plus Gaussian
    bumps (a few hot cells) on a Poisson number of pairs.  Pure in (seed, units, block)."""
    rng = np.random.default_rng([seed, 5, units, block])
    shape = (ACTIVATION_BLOCK, units, MAP_SIZE, MAP_SIZE)
    maps = _smooth(rng.standard_normal(shape, dtype=np.float32)) - 0.2
    counts = rng.poisson(np.broadcast_to(profile.rate, shape[:2]))
    cells = np.arange(MAP_SIZE, dtype=np.float32)
    for j in range(int(counts.max(initial=0))):
        bi, ki = np.nonzero(counts > j)
        centre = rng.uniform(-0.5, MAP_SIZE - 0.5, (len(bi), 2)).astype(np.float32)
        sigma = rng.uniform(0.5, 1.0, len(bi)).astype(np.float32)
        height = (1.5 + rng.exponential(1.0, len(bi))).astype(np.float32)
        dy = (cells[None, :] - centre[:, :1]) ** 2
        dx = (cells[None, :] - centre[:, 1:]) ** 2
        bump = np.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma[:, None, None] ** 2))
        maps[bi, ki] += height[:, None, None] * bump
    return np.maximum(maps, 0) * profile.scale[None, :, None, None]


def activation_path(workdir: Path, model: str, n_images: int) -> Path:
    return workdir / "activations" / f"{model}_{n_images}.zarr"


def _activation_fingerprint(model: str, units: int, n_images: int, seed: int) -> dict:
    return {"model": f"bench-{model}", "generator": "benchmarks.broden_data",
            "version": ACTIVATIONS_VERSION, "units": units, "n": n_images, "seed": seed,
            "bump_rate": BUMP_RATE}


def _blocks(n_images: int) -> Iterator[tuple[int, int]]:
    for block in range(-(-n_images // ACTIVATION_BLOCK)):
        start = block * ACTIVATION_BLOCK
        yield block, min(ACTIVATION_BLOCK, n_images - start)


def ensure_activations(workdir: Path, sizes: list[int], models: list[str], seed: int = 0,
                       progress: bool = True) -> dict[str, dict[int, Path]]:
    """``<model>_<n>.zarr`` with one layer ``layer4`` for each model (a key of
    :data:`LAYERS`) and size; each block is drawn once and written to every store holding it."""
    from tqdm.auto import tqdm

    paths: dict[str, dict[int, Path]] = {}
    for model in models:
        units = LAYERS[model]
        paths[model] = {n: activation_path(workdir, model, n) for n in sizes}
        todo = []
        for n, path in paths[model].items():
            fingerprint = _activation_fingerprint(model, units, n, seed)
            if astore.layer_artifact(path, fingerprint, LAYER).is_current():
                continue
            astore.create_store(path, [image_name(i) for i in range(n)],
                                {LAYER: (units, MAP_SIZE, MAP_SIZE)}, ACTIVATION_BLOCK,
                                "float32", fingerprint)
            todo.append(n)
        if not todo:
            continue
        profile = unit_profile(seed, units)
        for block, size in tqdm(list(_blocks(max(todo))), desc=f"activations {model}",
                                unit="block", disable=None if progress else True):
            values = activation_block(seed, units, block, profile)[:size]
            for n in todo:
                start = block * ACTIVATION_BLOCK
                if start < n:
                    astore.write_block(paths[model][n], block, start, {LAYER: values[: n - start]})
        for n in todo:
            astore.mark_complete(paths[model][n])
    return paths
