"""Threshold throughput and peak memory for a 512×7×7 layer at two dataset sizes.

    python -m benchmarks.bench_quantile [--sizes 2000 8000] [--workdir /tmp/bench_q]

Each measurement runs in a fresh process (peak RSS is per process); memory should stay
flat as N grows because the reduction keeps only per-unit candidates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import peak_rss_mib, run_child, write_activations


def child(store: str, q: float, scheduler: str, budget: int | None) -> None:
    from stages.engine.blocks import LayerBlocks
    from stages.quantile import DEFAULT_CANDIDATE_BUDGET, threshold_pass

    n = int(json.loads((Path(store) / "zarr.json").read_text())["attributes"]["n_images"])
    start = time.perf_counter()
    sched = None if scheduler == "none" else scheduler
    t, _ = threshold_pass(LayerBlocks(store, "layer4"), q, sched,
                          budget or DEFAULT_CANDIDATE_BUDGET)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": n, "seconds": seconds, "images_per_s": n / seconds,
                      "peak_rss_mib": peak_rss_mib(), "mean_threshold": float(np.mean(t))}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--workdir", default="/tmp/bench_quantile")
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--q", type=float, default=0.005)
    parser.add_argument("store", nargs="?")
    args = parser.parse_args()
    if args.child:
        child(args.store, args.q, args.scheduler, args.budget)
        return
    rows = []
    for n in args.sizes:
        store = Path(args.workdir) / f"act_{n}.zarr"
        if not (store / "zarr.json").exists():
            write_activations(store, n)
        for budget, name in ((0, "top-k"), (1, "radix")):
            r = run_child("benchmarks.bench_quantile", "--scheduler", args.scheduler,
                          "--budget", str(budget), "--q", str(args.q), str(store))
            r["method"] = name
            rows.append(r)
            print(f"N={n:6d} {name:6s} {r['images_per_s']:8.0f} images/s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB  ({r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
