"""Optimal compositional explanations at Broden scale, and beam search beside them.

    python -m benchmarks.bench_explain [--n 8000] [--workers 2] [--out benchmarks/results/explain.json]

Data: ``benchmarks.bench_broden``'s Broden-shaped label set (~1,200 labels, Broden's plane
statistics) and resnet18 ``layer4``-shaped activations (512 units, 7x7) at N images, with
their exact thresholds; made by that benchmark when missing.  Each measurement runs in a
fresh process (its peak RSS is its own; the search's worker processes report theirs):

- ``signatures``: the signatures pass (one read of every block), saved for the rest;
- ``optimal``: ``explain.search=optimal`` at ``max_length`` 3 for every unit;
- ``beam``: beam search at widths 5 and 10 (compexp's settings) for every unit, and how
  often and by how much each is below the optimum;
- ``labels``: the optimal search on a sample of units over random label subsets;
- ``lengths``: the same sample at ``max_length`` 1 to 4 (4 under a per-unit time limit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import broden_data as data
from benchmarks.bench_broden import concept_path, machine, thresholds_path
from benchmarks.common import REPO, peak_rss_mib, run_child

MODEL = "resnet18"


def partial_path(workdir: Path, n: int) -> Path:
    return workdir / "signatures" / f"{MODEL}_{n}.npz"


def _names(workdir: Path, n: int) -> list[str]:
    from stages.tally.labels import label_space
    from storage.concepts import ConceptStore

    return list(label_space(ConceptStore(concept_path(workdir, n)), None).names)


def _partial(workdir: Path, n: int):
    from stages.signatures.statistic import SignaturePartial

    return SignaturePartial.from_state_dict(dict(np.load(partial_path(workdir, n))))


def stage_signatures(spec: dict) -> dict:
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.engine.reduction import Pass, reduce_blocks
    from stages.signatures.statistic import Signatures
    from stages.tally.labels import label_space
    from storage.concepts import ConceptStore

    workdir, n = Path(spec["workdir"]), spec["n"]
    blocks = LayerBlocks(str(data.activation_path(workdir, MODEL, n)), data.LAYER)
    space = label_space(ConceptStore(concept_path(workdir, n)), None)
    statistic = Signatures(np.load(thresholds_path(workdir, MODEL, n)), space)
    start = time.perf_counter()
    (partial,) = reduce_blocks(Pass(ScoringBlocks(blocks, str(concept_path(workdir, n))),
                                    [statistic]), blocks.n_blocks(), "threads", "signatures",
                               progress=False)
    seconds = time.perf_counter() - start
    partial_path(workdir, n).parent.mkdir(parents=True, exist_ok=True)
    np.savez(partial_path(workdir, n), **partial.state_dict())
    return {"seconds": seconds, "images_per_s": n / seconds, "signatures": len(partial.counts),
            "unit_signature_pairs": len(partial.unit_counts), "peak_rss_mib": peak_rss_mib()}


def _summary(frame) -> dict:
    return {"units": len(frame), "proven_optimal": int(frame["optimal"].sum()),
            "seconds_per_unit": {q: float(frame["seconds"].quantile(v)) for q, v in
                                 (("median", 0.5), ("p90", 0.9), ("max", 1.0))},
            "nodes": {q: int(frame["nodes"].quantile(v)) for q, v in
                      (("median", 0.5), ("p90", 0.9), ("max", 1.0))},
            "iou_mean": float(frame["iou"].mean()), "max_gap": float(frame["gap"].max()),
            "lengths": {str(k): int(v) for k, v in frame["length"].value_counts().items()}}


def stage_optimal(spec: dict) -> dict:
    from stages.explain import optimal_explanations

    workdir, n = Path(spec["workdir"]), spec["n"]
    partial, names = _first_units(_partial(workdir, n), spec["units"]), _names(workdir, n)
    start = time.perf_counter()
    frame = optimal_explanations(partial, names, 3, workers=spec["workers"])
    seconds = time.perf_counter() - start
    frame.to_parquet(workdir / "signatures" / f"optimal_{n}.parquet")
    return {"seconds": seconds, "workers": spec["workers"], "labels": len(set(names)),
            "peak_rss_mib": peak_rss_mib(), **_summary(frame)}


def stage_beam(spec: dict) -> dict:
    import pandas as pd

    from stages.explain import beam_explanations

    workdir, n = Path(spec["workdir"]), spec["n"]
    partial, names = _first_units(_partial(workdir, n), spec["units"]), _names(workdir, n)
    optimal = pd.read_parquet(workdir / "signatures" / f"optimal_{n}.parquet")
    out = {}
    for width in (5, 10):
        start = time.perf_counter()
        frame = beam_explanations(partial, names, 3, width)
        seconds = time.perf_counter() - start
        below = optimal["iou"].to_numpy() - frame["iou"].to_numpy()
        worse = below > 0
        out[f"beam{width}"] = {
            "seconds": seconds, "suboptimal_units": int(worse.sum()),
            "suboptimal_share": float(worse.mean()),
            "iou_below_optimal": {"mean_when_below": float(below[worse].mean()) if worse.any()
                                  else 0.0, "max": float(below.max()),
                                  "max_relative": float((below / optimal["iou"]).max())},
            "above_optimal_units": int((below < 0).sum())}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _first_units(partial, units: int | None):
    """The counts of the layer's first ``units`` units (all when None)."""
    from stages.signatures.statistic import SignaturePartial

    if units is None:
        return partial
    keep = partial.unit < units
    return SignaturePartial(partial.table, partial.counts, partial.unit[keep],
                            partial.sig[keep], partial.unit_counts[keep],
                            np.array(min(units, int(partial.units))))


def _restricted(partial, names: list[str], keep: np.ndarray):
    """The signature counts of the label set ``keep`` (dense numbers), renumbered 1..len:
    every other label dropped from the signatures."""
    from stages.signatures.statistic import SignaturePartial

    number = np.zeros(len(names) + 1, np.int64)
    number[keep] = np.arange(1, len(keep) + 1)
    return SignaturePartial(np.sort(number[partial.table], axis=1), partial.counts,
                            partial.unit, partial.sig, partial.unit_counts,
                            partial.units), [names[k - 1] for k in keep]


def stage_growth(spec: dict) -> dict:
    from stages.signatures.optimal import LayerTables, optimal_search

    workdir, n = Path(spec["workdir"]), spec["n"]
    partial, names = _partial(workdir, n), _names(workdir, n)
    rng = np.random.default_rng(spec["seed"])
    units = sorted(rng.choice(int(partial.units), spec["sample_units"], replace=False).tolist())

    def measure(layer, length, limit=None) -> dict:
        start = time.perf_counter()
        found = optimal_search(layer, length, time_limit=limit, units=units)
        return {"seconds_per_unit": (time.perf_counter() - start) / len(units),
                "proven_optimal": sum(e.optimal for e in found),
                "median_nodes": float(np.median([e.nodes for e in found])),
                "max_gap": max(e.bound - e.iou for e in found),
                "iou_mean": float(np.mean([e.iou for e in found]))}

    out: dict = {"units": units, "labels": {}, "lengths": {}}
    for count in (*spec["label_counts"], len(names)):
        keep = np.sort(rng.choice(np.arange(1, len(names) + 1), count, replace=False))
        sub, sub_names = _restricted(partial, names, keep)
        out["labels"][str(count)] = measure(LayerTables(sub, sub_names), 3)
    layer = LayerTables(partial, names)
    for length in (1, 2, 3, 4):
        out["lengths"][str(length)] = measure(layer, length,
                                              spec["length4_seconds"] if length == 4 else None)
    out["length4_time_limit_s"] = spec["length4_seconds"]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


STAGES = {"signatures": stage_signatures, "optimal": stage_optimal, "beam": stage_beam,
          "growth": stage_growth}


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    if not thresholds_path(workdir, MODEL, args.n).exists():
        subprocess.run([sys.executable, "-m", "benchmarks.bench_broden", "--n", str(args.n),
                        "--scale", "1", "--models", MODEL, "--stages", "quantile", "--quiet",
                        "--workdir", str(workdir), "--out", str(workdir / "prepare.json")],
                       check=True, cwd=REPO)
    result = {"machine": machine(), "config": {
        "n": args.n, "model": MODEL, "layer": data.LAYER, "units": args.units or
        data.LAYERS[MODEL], "workers": args.workers, "seed": args.seed,
        "sample_units": args.sample_units, "length4_seconds": args.length4_seconds,
        "label_counts": args.label_counts}}
    for stage in args.stages:
        spec = {"stage": stage, "workdir": str(workdir), "n": args.n, "workers": args.workers,
                "seed": args.seed, "units": args.units, "sample_units": args.sample_units,
                "length4_seconds": args.length4_seconds, "label_counts": args.label_counts}
        result[stage] = run_child("benchmarks.bench_explain", json.dumps(spec))
        print(stage, json.dumps(result[stage])[:400], file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8000, help="images")
    parser.add_argument("--workers", type=int, default=2, help="processes of the search")
    parser.add_argument("--units", type=int, help="search only the first units (default: all)")
    parser.add_argument("--sample-units", type=int, default=16,
                        help="units of the growth measurements")
    parser.add_argument("--length4-seconds", type=float, default=20.0,
                        help="per-unit time limit at max_length 4")
    parser.add_argument("--label-counts", type=int, nargs="+", default=[150, 300, 600],
                        help="label subsets of the growth measurement (all labels too)")
    parser.add_argument("--workdir", default="/tmp/bench_broden")
    parser.add_argument("--out", default="benchmarks/results/explain.json")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(STAGES[spec["stage"]](spec), default=float))
        return
    run(args)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
