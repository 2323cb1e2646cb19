"""Coverage of the bootstrap interval (SEMANTICS.md §8): does a probe set's 95% interval
for a detector's IoU contain the population's IoU about 95% of the time?

    python -m benchmarks.bench_evidence [--population 4000] [--probe 200 800] [--draws 200]
                                        [--replicates 200] [--out benchmarks/results/evidence.json]

A synthetic population (no model): P images of 16 x 16 label planes, each holding up to
three rectangles of five object labels, and a layer of four units at the same resolution.
Unit 0 is a planted detector of label 1 (strong on its pixels, with noise: population IoU
near 0.1, a typical detector's); unit 1 a weaker one of label 2; units 2 and 3 are noise.
Each draw takes a probe set of n images without replacement, computes its thresholds
(q = 0.005), point IoU and B-replicate bootstrap with the pipeline's own passes, and asks
whether [iou_lo, iou_hi] of units 0 and 1 contains

- the population IoU (thresholds of the whole population): what a paper's number estimates;
- the population IoU at the probe set's thresholds: what a bootstrap with the thresholds
  held fixed would estimate.  Each replicate recomputes its thresholds (SEMANTICS §8), so
  the interval is for the first; the second rate shows how much that matters.

The cost of the extra pass at Broden scale (B = 200, N and 4N) is ``bench_broden``'s
``bootstrap`` stage.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from storage import activations as astore
from storage.artifacts import remove
from storage.broden_writer import BrodenWriter

SIZE, UNITS, LABELS, QUANTILE, LEVEL = 16, 4, 5, 0.005, 0.95
PLANTED = {0: 1, 1: 2}  # unit -> the label it detects
BLOCK = 64


def population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16, 16) label planes and (n, 4, 16, 16) float32 activations, seeded."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((n, SIZE, SIZE), np.int64)
    for plane in planes:
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, SIZE - 4, 2)
            h, w = rng.integers(3, 9, 2)
            plane[y : y + h, x : x + w] = rng.integers(1, LABELS + 1)
    acts = rng.random((n, UNITS, SIZE, SIZE)).astype(np.float32)
    acts[:, 0] += 0.8 * (planes == 1) * rng.random((n, SIZE, SIZE), np.float32)
    acts[:, 1] += 0.5 * (planes == 2) * rng.random((n, SIZE, SIZE), np.float32)
    return planes, acts


def write_dataset(root: Path, planes: np.ndarray) -> Path:
    writer = BrodenWriter(root, ["object"])
    for label in range(1, LABELS + 1):
        writer.label(label, f"thing{label}", ["object"])
    for i, plane in enumerate(planes):
        writer.add_image(f"im{i:05d}.jpg", "train", (SIZE, SIZE, SIZE, SIZE),
                         {"object": [(f"im{i:05d}_object.png", plane)]})
    return writer.write_tables()


def write_store(path: Path, acts: np.ndarray) -> Path:
    images = [f"im{i:05d}.jpg" for i in range(len(acts))]
    astore.create_store(path, images, {"l": acts.shape[1:]}, BLOCK, "float32", {"model": "bench"})
    for b, start in enumerate(range(0, len(acts), BLOCK)):
        astore.write_block(path, b, start, {"l": acts[start : start + BLOCK]})
    astore.mark_complete(path)
    return path


def planted_iou(source, thresholds: np.ndarray, space) -> np.ndarray:
    """IoU of each planted unit with its label (the pipeline's tally)."""
    from stages.iou import scoring_pass
    from stages.tally.statistic import TallyRule

    iou = scoring_pass(source, thresholds, space, TallyRule(), False, None).counts.iou(space)
    return np.array([iou[unit, space.lut[label] - 1] for unit, label in PLANTED.items()])


def per_unit(values: np.ndarray) -> dict[str, float]:
    return dict(zip(map(str, PLANTED), values.tolist(), strict=True))


def run(args: argparse.Namespace) -> dict:
    from stages.concepts import ConceptsConfig, build_concept_store
    from stages.engine.blocks import LayerBlocks, ScoringBlocks
    from stages.evidence.bootstrap import (
        BootstrapSummary,
        candidate_labels,
        entries_needed,
        replicate_thresholds,
    )
    from stages.iou import bootstrap_pass, scoring_pass
    from stages.quantile import threshold_pass
    from stages.tally.labels import label_space
    from stages.tally.statistic import TallyRule

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_evidence_"))
    planes, acts = population(args.population, args.seed)
    store = build_concept_store(ConceptsConfig(write_dataset(work / "data", planes),
                                               work / "concepts.zarr", BLOCK, False), None)
    space = label_space(store, None)
    whole = LayerBlocks(str(write_store(work / "population.zarr", acts)), "l")
    whole_source = ScoringBlocks(whole, str(store.path))
    truth = planted_iou(whole_source, threshold_pass(whole, QUANTILE)[0], space)
    result: dict = {"config": vars(args) | {"quantile": QUANTILE, "level": LEVEL,
                                            "planted": PLANTED, "size": SIZE},
                    "population_iou": truth.tolist(), "probes": []}
    rng = np.random.default_rng(args.seed + 1)
    for n in args.probe:
        hits = np.zeros((2, len(PLANTED)), np.int64)
        scored = np.zeros(len(PLANTED), np.int64)  # draws whose best label is the planted one
        widths, points = [], []
        for draw in range(args.draws):
            rows = np.sort(rng.choice(args.population, n, replace=False))
            path = write_store(work / f"probe{n}_{draw}.zarr", acts[rows])
            layer = LayerBlocks(str(path), "l")
            source = ScoringBlocks(layer, str(store.path), rows)
            thresholds = threshold_pass(layer, QUANTILE)[0]
            point = scoring_pass(source, thresholds, space, TallyRule(), False, None,
                                 tops=entries_needed(n, SIZE * SIZE, QUANTILE))
            iou = point.counts.iou(space)
            labels_of = candidate_labels(iou, args.candidates)
            best = np.argmax(iou, axis=1) + 1
            resampled = replicate_thresholds(point.tops, n, SIZE * SIZE, QUANTILE,
                                             args.replicates, args.seed + draw)
            found = bootstrap_pass(source, resampled, space, TallyRule(), labels_of,
                                   args.seed + draw)
            units = BootstrapSummary.of(found, space, labels_of, best).units(0.04, LEVEL)
            at_probe_thresholds = planted_iou(whole_source, thresholds, space)
            for j, (unit, label) in enumerate(PLANTED.items()):
                if best[unit] != space.lut[label]:
                    continue  # the interval is another label's
                lo, hi = units.loc[unit, "iou_lo"], units.loc[unit, "iou_hi"]
                scored[j] += 1
                hits[0, j] += lo <= truth[j] <= hi
                hits[1, j] += lo <= at_probe_thresholds[j] <= hi
                widths.append(hi - lo)
            points.append([iou[u, space.lut[lab] - 1] for u, lab in PLANTED.items()])
            remove(path)
        rate = hits / np.maximum(scored, 1)
        se = np.sqrt(LEVEL * (1 - LEVEL) / np.maximum(scored, 1))
        result["probes"].append({
            "images": n, "draws": args.draws,
            "draws_with_planted_label_best": per_unit(scored),
            "coverage_population_iou": per_unit(rate[0]),
            "coverage_at_probe_thresholds": per_unit(rate[1]),
            "nominal_standard_error": per_unit(se),
            "mean_interval_width": float(np.mean(widths)),
            "probe_iou_mean": np.mean(points, axis=0).tolist(),
            "probe_iou_std": np.std(points, axis=0, ddof=1).tolist()})
        print(f"n={n:5d}: population IoU {truth.round(4).tolist()}; coverage "
              f"{', '.join(f'unit {u} {r:.3f}' for u, r in zip(PLANTED, rate[0], strict=True))}; at the "
              f"probe's thresholds {', '.join(f'{r:.3f}' for r in rate[1])} "
              f"(nominal {LEVEL}, ± {se.max():.3f}; planted label best in {scored.tolist()} "
              f"of {args.draws} draws)", flush=True)
    result["seconds"] = time.perf_counter() - start
    remove(work)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=4000)
    parser.add_argument("--probe", type=int, nargs="+", default=[200, 800],
                        help="probe set sizes (images)")
    parser.add_argument("--draws", type=int, default=200, help="probe sets per size")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/evidence.json")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({math.ceil(result['seconds'])} s)")


if __name__ == "__main__":
    main()
