"""Broden-scale benchmark of every scoring stage, with no model and no download.

    python -m benchmarks.bench_broden [--n 2000] [--scale 4] [--out benchmarks/results/broden.json]
                                      [--schedulers threads none local] [--baseline-images 300]

Data (``benchmarks.broden_data``, generated once under ``--workdir`` and reused): a
Broden-format label directory of ~1,200 labels with up to 7 pixel planes per image at
112x112, and float32 activation stores for a 512x7x7 (resnet18 ``layer4``) and a 2048x7x7
(resnet50 ``layer4``) layer, at N and scale·N images (N's data is the first N images of the
larger set).

Measured per size, per layer and per scheduler, each in a fresh process so its peak RSS is its
own: the concept store build, exact thresholds (top-k; radix too), the tally, the top images,
the signatures, and tally + signatures in one pass.  Then a NetDissect-Lite-shaped loop
(``benchmarks.baseline``) on the first images, single-threaded, whose counts must equal the
pipeline's ``union=lite, planes=multiset`` tally.  Every timing carries the load averages
around it: on a shared machine compare ratios within one run.  ``benchmarks.readme_table``
turns the JSON into the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import broden_data as data
from benchmarks.common import REPO, directory_bytes, peak_rss_mib, run_child

FULL_BRODEN = 63_305  # images in Broden1 (index.csv rows)
QUANTILE = 0.005
TOP_IMAGES = 8  # the default report.top_n, not imported: pandas would raise the RSS floor
SCHEDULERS = ("threads", "none", "local")
PASS_STAGES = ("tally", "top_images", "signatures", "tally_signatures", "bootstrap")
REPLICATES, CANDIDATES = 200, 20  # the bootstrap stage's B and M (SEMANTICS.md §8)


# --------------------------------------------------------------------------- paths
def concept_path(workdir: Path, n: int) -> Path:
    return workdir / "concepts" / f"broden_{n}.zarr"


def thresholds_path(workdir: Path, model: str, n: int) -> Path:
    return workdir / "thresholds" / f"{model}_{n}.npy"


# --------------------------------------------------------------------------- one measurement
@dataclass
class Stopwatch:
    """Times the work of a stage; notes the load and the memory floor (imports, opened
    stores) when the work starts."""

    seconds: float = 0.0
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    rss_floor_mib: float = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        self.rss_floor_mib = peak_rss_mib()
        self.load_before = os.getloadavg()
        start = time.perf_counter()
        yield
        self.seconds = time.perf_counter() - start
        self.load_after = os.getloadavg()


@contextmanager
def open_scheduler(name: str) -> Iterator[Any]:
    """What the stages take as ``scheduler``: None, "threads", or a LocalCluster client
    sized as the pipeline's ``cluster=local`` sizes it."""
    if name == "none":
        yield None
    elif name == "threads":
        yield "threads"
    else:
        from pipeline.cluster import dask_scheduler
        from pipeline.config import ClusterKind, ClusterOptions

        with dask_scheduler(ClusterOptions(kind=ClusterKind.local)) as lazy:
            yield lazy()


def worker_peaks(scheduler: Any) -> list[float] | None:
    if scheduler is None or isinstance(scheduler, str):
        return None
    return sorted(scheduler.run(peak_rss_mib).values())


def stage_concepts(spec: dict, scheduler: Any, watch: Stopwatch) -> dict:
    from stages.concepts import ConceptsConfig, build_concept_store
    from storage.artifacts import remove

    workdir, n = Path(spec["workdir"]), spec["n"]
    store = concept_path(workdir, n)
    if store.exists():
        remove(store)  # measure a build, not a reuse
    cfg = ConceptsConfig(data.dataset_path(workdir, n), store, data.ACTIVATION_BLOCK, False)
    with watch.running():
        build_concept_store(cfg, scheduler)
    return {"store_bytes": directory_bytes(store)}


def full_list_quantile(n: int) -> tuple[float, bool]:
    """The q at which n images give each unit a top list as long as q = 0.005 over full
    Broden, so a top-k pass at n merges lists of the full run's width; capped at 0.5 (below
    about 640 images the lists cannot be that wide), and whether the lists are full-width."""
    q = QUANTILE * FULL_BRODEN / n
    return min(q, 0.5), q <= 0.5


def stage_quantile(spec: dict, scheduler: Any, watch: Stopwatch) -> dict:
    """Exact thresholds with the strategy asked for; the top-k run saves them for the later
    stages, the radix run checks it finds the same values.  ``stage=quantile_full_lists``
    is the top-k pass at :func:`full_list_quantile`."""
    from stages.engine.blocks import LayerBlocks
    from stages.quantile import DEFAULT_CANDIDATE_BUDGET, threshold_pass

    workdir, n, model = Path(spec["workdir"]), spec["n"], spec["model"]
    full_lists = spec["stage"] == "quantile_full_lists"
    q, full_width = full_list_quantile(n) if full_lists else (QUANTILE, False)
    blocks = LayerBlocks(str(data.activation_path(workdir, model, n)), data.LAYER)
    budget = 1 if spec["strategy"] == "radix" else DEFAULT_CANDIDATE_BUDGET
    with watch.running():
        thresholds, _ = threshold_pass(blocks, q, scheduler, budget)
    used = {"q": q, "strategy_used": quantile_strategy(data.LAYERS[model], n, budget, q)}
    if full_lists:
        return {**used, "full_width_lists": full_width}
    saved = thresholds_path(workdir, model, n)
    if spec["strategy"] == "top-k":
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.save(saved, thresholds)
        return used
    return {**used, "equals_top_k": bool(np.array_equal(np.load(saved), thresholds))}


def quantile_strategy(units: int, n_images: int, budget: int | None = None,
                      q: float = QUANTILE) -> str:
    """The strategy ``threshold_pass`` picks for a layer of ``units`` x 7 x 7 values."""
    from stages.quantile import DEFAULT_CANDIDATE_BUDGET, strategy

    values = n_images * data.MAP_SIZE * data.MAP_SIZE
    return strategy(units, values, q, budget or DEFAULT_CANDIDATE_BUDGET)


def stage_pass(spec: dict, scheduler: Any, watch: Stopwatch) -> dict:
    """One read of every block feeding the statistics of one stage (as the pipeline's
    passes do); scoring stages use the thresholds of the top-k run.  ``bootstrap`` times
    what ``scoring.bootstrap`` makes of the tally (B = 200, M = 20): the tally pass that also
    keeps each unit's largest entries, the replicate thresholds, and the bootstrap pass."""
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.engine.reduction import Pass, reduce_blocks
    from stages.evidence.bootstrap import (
        Bootstrap,
        TopEntries,
        candidate_labels,
        entries_needed,
        replicate_thresholds,
    )
    from stages.signatures.statistic import Signatures
    from stages.tally.labels import label_space
    from stages.tally.statistic import Tally
    from stages.thresholds.top_images import TopImagesStat
    from storage.concepts import ConceptStore

    workdir, n, model, stage = Path(spec["workdir"]), spec["n"], spec["model"], spec["stage"]
    blocks = LayerBlocks(str(data.activation_path(workdir, model, n)), data.LAYER)
    if stage == "top_images":
        source, statistics = blocks, [TopImagesStat(TOP_IMAGES)]
    else:
        thresholds = np.load(thresholds_path(workdir, model, n))
        concepts = concept_path(workdir, n)
        space = label_space(ConceptStore(concepts), None)
        source = ScoringBlocks(blocks, str(concepts))
        statistics = []
        if stage in ("tally", "tally_signatures"):
            statistics.append(Tally(thresholds, space))
        if stage in ("signatures", "tally_signatures"):
            statistics.append(Signatures(thresholds, space))
    with watch.running():
        if stage == "bootstrap":
            positions = data.MAP_SIZE * data.MAP_SIZE
            point, tops = reduce_blocks(
                Pass(source, [Tally(thresholds, space),
                              TopEntries(entries_needed(n, positions, QUANTILE))]),
                blocks.n_blocks(), scheduler, "tally", progress=False)
            labels_of = candidate_labels(point.iou(space), CANDIDATES)
            resampled = replicate_thresholds(tops, n, positions, QUANTILE, REPLICATES,
                                             spec["seed"])
            statistics.append(Bootstrap(resampled, space, labels_of, spec["seed"]))
        results = reduce_blocks(Pass(source, statistics), blocks.n_blocks(), scheduler, stage,
                                progress=False)
    summary = {}
    for statistic, result in zip(statistics, results, strict=True):
        if isinstance(statistic, Tally):
            summary["intersection_total"] = int(result.intersection.sum())
        elif isinstance(statistic, Signatures):
            summary["signatures"] = len(result.counts)
            summary["unit_signature_pairs"] = len(result.unit_counts)
        elif isinstance(statistic, Bootstrap):
            summary.update(replicates=REPLICATES, candidates=CANDIDATES,
                           state_mib=sum(getattr(result, f).nbytes for f in (
                               "intersection", "unit_area", "label_area")) / 2**20)
    return summary


def baseline_images(n: int, wanted: int) -> int:
    """The first whole activation blocks holding at least ``wanted`` images (at most n):
    the pipeline's pass on the same images then reads exactly those blocks."""
    return min(n, -(-wanted // data.ACTIVATION_BLOCK) * data.ACTIVATION_BLOCK)


def stage_baseline(spec: dict, scheduler: Any, watch: Stopwatch) -> dict:
    """The per-image, per-unit loop on one thread, then the pipeline's lite/multiset tally
    on the same images and thread, and whether their counts agree."""
    import torch

    from benchmarks.baseline import baseline_tally
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.engine.reduction import Pass, reduce_in_process
    from stages.tally.labels import label_space
    from stages.tally.statistic import Tally, TallyRule
    from storage.activations import ActivationStore
    from storage.concepts import ConceptStore

    torch.set_num_threads(1)
    workdir, n, model = Path(spec["workdir"]), spec["n"], spec["model"]
    images = baseline_images(n, spec["images"])
    store = data.activation_path(workdir, model, n)
    concepts = ConceptStore(concept_path(workdir, n))
    thresholds = np.load(thresholds_path(workdir, model, n))
    space = label_space(concepts, None)
    with watch.running():
        ours = baseline_tally(ActivationStore(store), data.LAYER, concepts, thresholds, images,
                              space)
    lite = Tally(thresholds, space, TallyRule(union="lite", planes="multiset"))
    source = ScoringBlocks(LayerBlocks(str(store), data.LAYER), str(concepts.path))
    lite.chunk(source.read(0))  # untimed: the first block loads the compiled kernel (once a process)
    start = time.perf_counter()
    (theirs,) = reduce_in_process(Pass(source, (lite,)),
                                  range(-(-images // data.ACTIVATION_BLOCK)))
    theirs = theirs.state_dict()
    pipeline_seconds = time.perf_counter() - start
    differs = {name: int((getattr(ours, name) != theirs[name]).sum())
               for name in ("intersection", "unit_area", "label_area")}
    units = data.LAYERS[model]
    return {
        "images": images,
        "counts_equal": not any(differs.values()) and int(theirs["images"]) == images,
        "differing_counts": differs,
        "active_pairs": ours.active_pairs,
        "active_pair_fraction": ours.active_pairs / (images * units),
        "mask_pixels_per_active_pair": ours.mask_pixels / max(ours.active_pairs, 1),
        "pipeline_one_thread_seconds": pipeline_seconds,
        "pipeline_one_thread_images_per_s": images / pipeline_seconds,
        "load_after_pipeline": os.getloadavg(),
    }


STAGES: dict[str, Callable[[dict, Any, Stopwatch], dict]] = {
    "concepts": stage_concepts, "quantile": stage_quantile, "quantile_full_lists": stage_quantile,
    "baseline": stage_baseline,
    **dict.fromkeys(PASS_STAGES, stage_pass),
}


def measure(spec: dict) -> dict:
    """Run one stage as ``spec`` says; its timing, load, memory and what it found."""
    watch = Stopwatch()
    with open_scheduler(spec["scheduler"]) as scheduler:
        found = STAGES[spec["stage"]](spec, scheduler, watch)
        workers = worker_peaks(scheduler)
    images = found.pop("images", spec["n"])
    return {**{k: v for k, v in spec.items() if k != "workdir"}, "images": images,
            "seconds": watch.seconds, "images_per_s": images / watch.seconds,
            "load_before": watch.load_before, "load_after": watch.load_after,
            "rss_floor_mib": watch.rss_floor_mib, "peak_rss_mib": peak_rss_mib(),
            "worker_peak_rss_mib": workers, **found}


# --------------------------------------------------------------------------- the whole run
def machine() -> dict:
    import dask
    import torch
    import zarr

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__, "zarr": zarr.__version__, "dask": dask.__version__,
            "commit": commit, "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_at_start": os.getloadavg()}


def activation_census(workdir: Path, model: str, n: int) -> dict:
    """How sparse the stored activations are against their own thresholds (SEMANTICS §2):
    the fraction of (image, unit) pairs whose raw max exceeds T_k, and their hot cells."""
    from storage.activations import ActivationStore

    store = ActivationStore(data.activation_path(workdir, model, n))
    thresholds = np.load(thresholds_path(workdir, model, n))[None, :, None, None]
    array = store.array(data.LAYER)
    active = hot = zero = 0
    for block in range(store.n_blocks()):
        values = array[slice(*store.block_range(block))]
        active += int((values.max(axis=(2, 3), keepdims=True) > thresholds).sum())
        hot += int((values > thresholds).sum())
        zero += int((values == 0).sum())
    units = data.LAYERS[model]
    cells = n * units * data.MAP_SIZE ** 2
    return {"active_pair_fraction": active / (n * units), "hot_cells_per_active_pair":
            hot / max(active, 1), "zero_fraction": zero / cells}


def store_sizes(workdir: Path, sizes: list[int], models: list[str]) -> dict:
    out: dict[str, Any] = {"concepts": {}, "activations": {}}
    for n in sizes:
        path = concept_path(workdir, n)
        out["concepts"][str(n)] = directory_bytes(path) if path.exists() else None
    for model in models:
        units = data.LAYERS[model]
        out["activations"][model] = {}
        for n in sizes:
            raw = n * units * data.MAP_SIZE ** 2 * 4
            stored = directory_bytes(data.activation_path(workdir, model, n))
            out["activations"][model][str(n)] = {"bytes": stored, "raw_float32_bytes": raw,
                                                 "ratio": stored / raw}
    return out


def _find(measurements: list[dict], **keys: Any) -> dict | None:
    return next((m for m in measurements if all(m.get(k) == v for k, v in keys.items())), None)


def projections(measurements: list[dict], stores: dict, sizes: list[int]) -> dict:
    """Full Broden (63,305 images) for each layer, from the largest size's threads rates,
    assuming time linear in images; peak RSS extrapolated linearly through both sizes (an
    upper bound when memory is flat); store sizes scaled per image.  A top-k pass merges
    lists that widen with the images, so its time is scaled from the run with full-width
    lists where there is one: an upper bound, as every block there keeps more values."""
    small, large = sizes[0], sizes[-1]
    models = list(stores["activations"])
    out = {"images": FULL_BRODEN, "from_images": large,
           "assumption": f"time linear in images at the {large}-image threads rate; peak RSS "
                         f"linear through the {small}- and {large}-image runs",
           "layers": {}}
    for model in models:
        units = data.LAYERS[model]
        strategy = quantile_strategy(units, FULL_BRODEN)
        quantile = _find(measurements, stage="quantile", model=model, n=large,
                         scheduler="threads", strategy=strategy)
        tally = _find(measurements, stage="tally", model=model, n=large, scheduler="threads")
        layer = {"units": units, "quantile_strategy": strategy}
        full_lists = _find(measurements, stage="quantile_full_lists", model=model, n=large,
                           scheduler="threads")
        if strategy == "top-k" and full_lists and full_lists["full_width_lists"]:
            quantile = full_lists
            layer["quantile_basis"] = "upper bound from full-width lists"
        if quantile and tally:
            q_s = FULL_BRODEN / quantile["images_per_s"]
            t_s = FULL_BRODEN / tally["images_per_s"]
            layer.update({"quantile_seconds": q_s, "tally_seconds": t_s,
                          "quantile_plus_tally_seconds": q_s + t_s})
        stored = stores["activations"][model][str(large)]
        layer["activation_store_bytes"] = stored["bytes"] / large * FULL_BRODEN
        layer["activation_raw_bytes"] = stored["raw_float32_bytes"] / large * FULL_BRODEN
        rss = {}
        for stage in ("quantile", "tally"):
            keys = {"stage": stage, "model": model, "scheduler": "threads"}
            if stage == "quantile":
                keys["strategy"] = strategy
            a, b = _find(measurements, n=small, **keys), _find(measurements, n=large, **keys)
            if a and b and large > small:
                slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (large - small)
                rss[stage] = {"small_mib": a["peak_rss_mib"], "large_mib": b["peak_rss_mib"],
                              "ratio": b["peak_rss_mib"] / a["peak_rss_mib"],
                              "full_mib": b["peak_rss_mib"] + slope * (FULL_BRODEN - large)}
        layer["peak_rss"] = rss
        out["layers"][model] = layer
    concepts = stores["concepts"].get(str(large))
    if concepts:
        out["concept_store_bytes"] = concepts / large * FULL_BRODEN
    return out


@dataclass
class Run:
    """The benchmark's plan and what it has measured so far (saved after every step)."""

    args: argparse.Namespace
    result: dict = field(default_factory=dict)

    def measure(self, **spec: Any) -> dict:
        spec = {"workdir": str(self.args.workdir), **spec}
        found = (measure(spec) if self.args.in_process
                 else run_child("benchmarks.bench_broden", json.dumps(spec)))
        found["isolated_process"] = not self.args.in_process
        self.result["measurements"].append(found)
        self.save()
        label = " ".join(str(spec[k]) for k in ("stage", "model", "strategy") if k in spec)
        print(f"{label:28s} N={spec['n']:6d} {spec['scheduler']:7s} "
              f"{found['images_per_s']:8.1f} images/s {found['seconds']:7.1f} s  peak RSS "
              f"{found['peak_rss_mib']:6.0f} MiB  load {found['load_before'][0]:.1f}", flush=True)
        return found

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.result, indent=1, default=float) + "\n")


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    sizes = sorted({args.n, args.n * args.scale})
    bench = Run(args, {"machine": machine(), "config": {
        "n": args.n, "scale": args.scale, "sizes": sizes, "quantile": QUANTILE,
        "block_size": data.ACTIVATION_BLOCK, "schedulers": args.schedulers, "seed": args.seed,
        "layers": {m: [data.LAYERS[m], data.MAP_SIZE, data.MAP_SIZE] for m in args.models},
        "segmentation": [data.SEG_SIZE, data.SEG_SIZE], "full_broden": FULL_BRODEN},
        "measurements": []})
    start = time.perf_counter()
    census = data.ensure_dataset(workdir, sizes, args.seed, progress=not args.quiet)
    data.ensure_activations(workdir, sizes, args.models, args.seed, progress=not args.quiet)
    bench.result["data"] = {"labels": asdict(census), "preparation_seconds":
                            time.perf_counter() - start, "activations": {}}
    wanted = set(args.stages or STAGES)

    def asked(stage: str, inputs_missing: bool = False) -> bool:
        return stage in wanted or inputs_missing  # what a later stage reads is made anyway

    for scheduler in args.schedulers:  # each stage at every size in a row: similar load
        for n in sizes:
            if asked("concepts", not concept_path(workdir, n).exists()):
                bench.measure(stage="concepts", n=n, scheduler=scheduler)
        for model in args.models:
            for strategy in ("top-k", "radix"):
                for n in sizes:
                    missing = strategy == "top-k" and not thresholds_path(workdir, model,
                                                                           n).exists()
                    if asked("quantile", missing):
                        bench.measure(stage="quantile", model=model, n=n, scheduler=scheduler,
                                      strategy=strategy)
            if asked("quantile_full_lists"):
                bench.measure(stage="quantile_full_lists", model=model, n=sizes[-1],
                              scheduler=scheduler, strategy="top-k")
            for stage in filter(asked, PASS_STAGES):
                for n in sizes:
                    bench.measure(stage=stage, model=model, n=n, scheduler=scheduler,
                                  seed=args.seed)
    for model in args.models:
        bench.result["data"]["activations"][model] = {
            str(n): activation_census(workdir, model, n) for n in sizes}
        if asked("baseline"):
            bench.measure(stage="baseline", model=model, n=sizes[0], scheduler="none",
                          images=args.baseline_images)
    bench.result["stores"] = store_sizes(workdir, sizes, args.models)
    bench.result["projections"] = projections(bench.result["measurements"],
                                              bench.result["stores"], sizes)
    bench.result["machine"]["load_at_end"] = os.getloadavg()
    bench.result["run_seconds"] = time.perf_counter() - start
    bench.save()
    return bench.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=2000, help="images of the smaller size")
    parser.add_argument("--scale", type=int, default=4, help="the larger size is scale·n")
    parser.add_argument("--out", default="benchmarks/results/broden.json")
    parser.add_argument("--workdir", default="/tmp/bench_broden",
                        help="generated data and stores (reused across runs)")
    parser.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=["threads"])
    parser.add_argument("--models", nargs="+", choices=list(data.LAYERS), default=list(data.LAYERS),
                        help="layers to measure: resnet18 layer4 (512x7x7), resnet50 layer4 (2048x7x7)")
    parser.add_argument("--baseline-images", type=int, default=300)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES),
                        help="measure only these (default: all; inputs they need are made)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (quick checks; peak RSS is cumulative)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child)), default=float))
        return
    run(args)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
