"""The whole job at Broden geometry, run as a user runs it, and a new concept set re-scored.

    python -m benchmarks.bench_job [--sizes 2000 8000] [--rescore 3000] [--workdir /tmp/bench_job]
                                   [--forward-images N] [--out benchmarks/results/job.json]

Data: ``benchmarks.broden_data``'s Broden-shaped label directory (~1,200 labels in six
categories, Broden's plane statistics, 112x112 planes, image-level scene and texture labels)
with a 224-px JPEG per image (``broden_data.ensure_images``); resnet18 with random init (the
forward pass costs what a trained one costs).  Every command is the CLI's, in a fresh
process whose peak RSS is its own.

- ``job`` (each of ``--sizes``): ``stage=concepts``, ``extract``, ``quantile``, ``iou``,
  ``all`` (the report) on ``layer3`` and ``layer4``, then ``stage=explain`` on ``layer4``:
  wall time, images/s, peak RSS and bytes added to the workdir per stage; beside them the
  bare forward pass (decode, normalise, resnet18 to ``layer4``, batch 32) of the same images,
  the bound of ``extract`` (``--forward-images``: timed on the first N images and taken at
  that rate for all, which saves a second full pass at Broden's size);
- ``rescore`` (``--rescore`` images): after the job, a run that finds everything current;
  ``stage=rescore`` against a fresh copy of the labels (the concept store built, then the
  tally); new scoring rules on that store; the NetDissect-Lite-structured loop
  (``benchmarks.baseline``) on the same thresholds and labels; and the label PNGs decoded
  alone on one thread and on every core, by libpng (the store's decoder) and by Pillow,
  beside the concept store build alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import broden_data as data
from benchmarks.common import REPO, directory_bytes

MODEL = ["model=resnet18", "model.weights=none"]
STAGES = ("concepts", "extract", "quantile", "iou", "all")
LAYERS = ("layer3", "layer4")  # dissected by the job; explain and rescore take the last
# the optimal search with a per-unit time limit: beam search (width 5) on ~1,200 labels took
# 2.3 s per unit on 8,000 images (README), 20 minutes for 512 units: too long to benchmark
EXPLAIN = ("stage=explain", "explain.search=optimal")
# runs the CLI in this process and writes its peak RSS (VmHWM) where the caller reads it
MEASURED = ("import atexit, runpy, sys\n"
            "from benchmarks.common import peak_rss_mib\n"
            "atexit.register(lambda: open({out!r}, 'w').write(str(peak_rss_mib())))\n"
            "sys.argv = ['pipeline.run', *{args!r}]\n"
            "runpy.run_module('pipeline.run', run_name='__main__')\n")


def cli(workdir: Path, dataset: Path, *args: str, layers: str | None = None) -> dict:
    """One CLI command: wall seconds, peak RSS (MiB), bytes it added under the workdir
    (``layers`` such as ``[layer3,layer4]``; None: a stage that reads no model, such as
    ``concepts``)."""
    model = [*MODEL, f"model.layers={layers}"] if layers else []
    argv = [f"workdir={workdir}", f"dataset.path={dataset}", *model, "progress=false", *args]
    rss = workdir.parent / "rss.txt"
    before = directory_bytes(workdir) if workdir.exists() else 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED.format(out=str(rss), args=argv)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": float(rss.read_text()),
            "bytes_added": directory_bytes(workdir) - before}


def forward_pass(dataset: Path, n: int, last: str = LAYERS[-1], batch: int = 32) -> dict:
    """The bound of extract: decode, normalise and resnet18 to ``last``, nothing kept."""
    import torch
    import torchvision

    from stages.network.models import preprocess
    from storage.broden import read_broden
    from storage.broden_images import ImagesFolder, load_image

    records = read_broden(dataset).images[:n]
    model = torchvision.models.resnet18(weights=None).eval()
    names = [name for name, _ in model.named_children()]
    trunk = torch.nn.Sequential(*list(model.children())[:names.index(last) + 1])
    folder = ImagesFolder(dataset / "images")
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch):
            images = np.stack([load_image(folder.file(r.image)) for r in records[i:i + batch]])
            trunk(preprocess(images, "imagenet"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": n / seconds}


def job(workdir: Path, dataset: Path, n: int, time_limit: float = 2.0,
        forward_images: int | None = None, layers: tuple[str, ...] = LAYERS) -> dict:
    """Every stage of the main job in order (each finds the earlier ones current), from an
    empty workdir: a rerun times the builds again."""
    from storage.tables import read_table

    shutil.rmtree(workdir, ignore_errors=True)
    listed = f"[{','.join(layers)}]"

    stages = {}
    for stage in STAGES:  # each printed when done: a long run shows where it is
        stages[stage] = cli(workdir, dataset, f"stage={stage}",
                            layers=None if stage == "concepts" else listed)
        print(json.dumps({"images": n, stage: stages[stage]}), flush=True)
    stages["explain"] = cli(workdir, dataset, *EXPLAIN, f"explain.time_limit={time_limit}",
                            layers=f"[{layers[-1]}]")
    explained = read_table(workdir / "results", "explanations")
    stages["explain"]["proven_optimal"] = f"{int(explained['optimal'].sum())}/{len(explained)}"
    for row in stages.values():
        row["images_per_s"] = n / row["seconds"]
    timed = n if forward_images is None else min(n, forward_images)
    bound = forward_pass(dataset, timed, layers[-1])
    if timed < n:  # the rate of the first images, for all n (the cost per image is fixed)
        bound = {**bound, "images_timed": timed, "seconds_timed": bound["seconds"],
                 "seconds": n / bound["images_per_s"]}
    beyond = sum(r["seconds"] for s, r in stages.items() if s != "explain") - bound["seconds"]
    return {"images": n, "stages": stages, "forward_pass": bound,
            "beyond_forward_share": beyond / bound["seconds"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in stages.values()),
            "workdir_bytes": directory_bytes(workdir)}


def _label_copy(dataset: Path, copy: Path) -> Path:
    """The dataset's CSVs and label PNGs copied (real files: the store decodes them)."""
    if copy.exists():
        shutil.rmtree(copy)
    images = copy / "images"
    images.mkdir(parents=True)
    for path in dataset.glob("*.csv"):
        shutil.copyfile(path, copy / path.name)
    for path in (dataset / "images").resolve().rglob("*.png"):
        target = images / path.relative_to((dataset / "images").resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return copy


def _forget_concept_set(workdir: Path, name: str) -> None:
    """The concept set ``name`` gone from the workdir (its store, and the manifest of every
    table scored against it), so that a rerun of the benchmark times the builds again."""
    from pipeline.layout import Layout

    shutil.rmtree(Layout(workdir).concept_set_store(name), ignore_errors=True)
    for manifest in (workdir / "results" / ".artifacts").rglob("*.artifact.json"):
        params = json.loads(manifest.read_text())["fingerprint"].get("params", {})
        if params.get("concept_set") == name:
            manifest.unlink()


def _pillow(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        np.asarray(img.convert("RGB"))


def _libpng(path: Path) -> None:
    import imagecodecs

    imagecodecs.png_decode(path.read_bytes())


def _decode(paths: list[Path], threads: int, decode) -> float:
    """Label PNGs per second that one decoder alone reads and decodes to RGB."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, paths, chunksize=64))
    return len(paths) / (time.perf_counter() - start)


def rescore(workdir: Path, dataset: Path, n: int, layer: str = LAYERS[-1]) -> dict:
    """A new concept set and new rules on a cached layer, beside the classic loop."""
    from benchmarks.baseline import baseline_tally
    from pipeline.graph import Run
    from pipeline.run import compose_config
    from pipeline.workflow import GRAPH
    from stages.concepts import ConceptsConfig, build_concept_store
    from stages.tally.labels import label_space
    from storage.activations import ActivationStore
    from storage.arrays import load_thresholds
    from storage.broden import read_broden
    from storage.concepts import ConceptStore

    one = {"layers": f"[{layer}]"}
    cli(workdir, dataset, "stage=iou", **one)  # the cache and thresholds, if not yet there
    current = cli(workdir, dataset, "stage=iou", **one)
    copy = _label_copy(dataset, workdir.parent / "labels_copy")
    _forget_concept_set(workdir, "copy")
    concepts = [f"concepts.path={copy}", "concepts.name=copy"]
    new_set = cli(workdir, dataset, "stage=rescore", *concepts, **one)
    new_rules = cli(workdir, dataset, "stage=rescore", *concepts, "scoring.union=global",
                    **one)
    cfg = compose_config([f"workdir={workdir}", f"dataset.path={dataset}", *MODEL,
                          f"model.layers=[{layer}]", *concepts, "progress=false"])
    run = Run(cfg, lambda: "threads", GRAPH)
    store = ConceptStore(run.value("concept_set").path)
    thresholds = load_thresholds(run.value("quantile")[layer].path)
    acts = ActivationStore(run.value("extract").path)
    start = time.perf_counter()
    baseline_tally(acts, layer, store, thresholds, n, label_space(store, None))
    loop = time.perf_counter() - start
    ds = read_broden(copy)
    paths = [copy / "images" / p for r in ds.images for v in r.planes.values() for p in v]
    cores = os.cpu_count() or 1
    decode = {f"{name}_threads_{t}": _decode(paths, t, fn) for name, fn in
              (("libpng", _libpng), ("pillow", _pillow)) for t in sorted({1, cores})}
    again = workdir.parent / "store_alone.zarr"
    shutil.rmtree(again, ignore_errors=True)
    start = time.perf_counter()
    build_concept_store(ConceptsConfig(copy, again, progress=False), "threads", ds)
    build = time.perf_counter() - start
    planes_per_image = len(paths) / n
    beyond = {"new_concept_set": new_set["seconds"] - current["seconds"],
              "new_rules": new_rules["seconds"] - current["seconds"]}
    return {"images": n, "planes_per_image": planes_per_image, "current_run": current,
            "new_concept_set": new_set, "new_rules": new_rules, "beyond_current_s": beyond,
            "netdissect_lite_loop_s": loop,
            "speedup_new_concept_set": loop / beyond["new_concept_set"],
            "speedup_new_rules": loop / beyond["new_rules"],
            "decode_images_per_s": {k: v / planes_per_image for k, v in decode.items()},
            "store_build_s": build, "store_build_images_per_s": n / build,
            "store_build_share_of_decode": {  # of each decoder alone on every core
                name: n / build / (decode[f"{name}_threads_{cores}"] / planes_per_image)
                for name in ("libpng", "pillow")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--rescore", type=int, default=3000, help="images (0: skip)")
    parser.add_argument("--explain-time-limit", type=float, default=2.0,
                        help="seconds per unit of the optimal search")
    parser.add_argument("--forward-images", type=int, default=None,
                        help="time the bare forward pass on this many images (default all)")
    parser.add_argument("--workdir", default="/tmp/bench_job")
    parser.add_argument("--out", default="benchmarks/results/job.json")
    args = parser.parse_args()
    root = Path(args.workdir)
    sizes = sorted(set(args.sizes) | ({args.rescore} - {0}))
    data.ensure_dataset(root, sizes)
    data.ensure_images(root, max(sizes))
    results: dict = {"machine": {"cpus": os.cpu_count()}, "jobs": []}
    for n in sorted(args.sizes):
        row = job(root / f"work_{n}", data.dataset_path(root, n), n, args.explain_time_limit,
                  args.forward_images)
        results["jobs"].append(row)
        print(json.dumps({"images": n, "beyond_forward_share": row["beyond_forward_share"],
                          **{s: round(r["seconds"], 1) for s, r in row["stages"].items()}}))
    if len(results["jobs"]) > 1:
        small, large = results["jobs"][0], results["jobs"][-1]
        results["rss_growth"] = {s: large["stages"][s]["peak_rss_mib"]
                                 / small["stages"][s]["peak_rss_mib"] for s in small["stages"]}
    if args.rescore:
        results["rescore"] = rescore(root / f"work_{args.rescore}",
                                     data.dataset_path(root, args.rescore), args.rescore)
        print(json.dumps({k: v for k, v in results["rescore"].items()
                          if isinstance(v, float | dict)}, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
