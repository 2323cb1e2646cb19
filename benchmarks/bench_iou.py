"""IoU tally throughput and peak memory: a 512×7×7 layer, 112×112 masks, ~7 label planes.

    python -m benchmarks.bench_iou [--sizes 1000 4000] [--scheduler local|threads|none]

The labels come from the built-in synthetic generator at 224 px images / 112 px
segmentations (5 pixel planes + 2 image-level labels per image); activations are
ReLU-like random values, so about 20% of (image, unit) pairs are active at q = 0.005.
Larger N reuses the label images cyclically (activation row i -> concept row i mod M).
Each measurement runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import peak_rss_mib, run_child, write_activations


def child(workdir: Path, n: int, scheduler: str) -> None:
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.engine.reduction import Pass, reduce_in_process, reduce_with_dask
    from stages.quantile import threshold_pass
    from stages.tally.labels import label_space
    from stages.tally.statistic import Tally
    from storage.concepts import ConceptStore

    concepts = ConceptStore(workdir / "concepts.zarr")
    store = str(workdir / f"act_{n}.zarr")
    blocks = LayerBlocks(store, "layer4")
    thresholds, _ = threshold_pass(blocks, 0.005, "threads")
    rows = np.arange(n) % concepts.n_images
    space = label_space(concepts, None)
    reduction = Pass(ScoringBlocks(blocks, str(concepts.path), rows), [Tally(thresholds, space)])
    n_blocks = blocks.store().n_blocks()
    client = cluster = None
    if scheduler == "local":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                               env={"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"})
        client = Client(cluster)
        client.run(lambda: __import__("torch").set_num_threads(1))
    start = time.perf_counter()
    if scheduler == "none":
        (counts,) = reduce_in_process(reduction, range(n_blocks))
    else:
        (counts,) = reduce_with_dask(reduction, list(range(n_blocks)), client or scheduler,
                                  progress=False)
    seconds = time.perf_counter() - start
    workers_peak = None
    if client is not None:
        rss = client.run(peak_rss_mib)
        workers_peak = max(rss.values())
        client.close()
        cluster.close()
    print(json.dumps({"images": n, "seconds": seconds, "images_per_s": n / seconds,
                      "peak_rss_mib_client": peak_rss_mib(), "labels": space.n_labels,
                      "intersections": int(counts.intersection.sum()),
                      "peak_rss_mib_worker": workers_peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--labels", type=int, default=1000, help="distinct labelled images")
    parser.add_argument("--workdir", default="/tmp/bench_iou")
    parser.add_argument("--scheduler", default="local")
    parser.add_argument("--n", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        child(workdir, args.n, args.scheduler)
        return
    from stages.concepts import ConceptsConfig, build_concept_store
    from stages.synthetic import generate, is_complete

    data = workdir / "synthetic224"
    params = {"n_images": args.labels, "image_size": 224, "seg_size": 112}
    if not is_complete(data, **params):
        generate(data, **params)
    build_concept_store(ConceptsConfig(data, workdir / "concepts.zarr", 64, False), "threads")
    for n in args.sizes:
        store = workdir / f"act_{n}.zarr"
        if not (store / "zarr.json").exists():
            write_activations(store, n, block=128)
        r = run_child("benchmarks.bench_iou", "--workdir", str(workdir), "--n", str(n),
                      "--scheduler", args.scheduler)
        print(f"N={n:6d} {args.scheduler:7s} {r['images_per_s']:7.0f} images/s  "
              f"client peak RSS {r['peak_rss_mib_client']:6.0f} MiB, worker peak RSS "
              f"{r['peak_rss_mib_worker'] or 0:6.0f} MiB  ({r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
