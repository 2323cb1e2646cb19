"""The GPU half of ``benchmarks/gpu_check.sh``: counts on the GPU against the CPU's, and speeds.

    python -m benchmarks.gpu_check [--n 2000] [--workdir /tmp/gpu_check] [--out gpu_check.json]
                                   [--tests-status 0]

On ``benchmarks.broden_data``'s Broden-geometry data (224-px JPEGs, 112x112 label planes,
~1,200 labels) and resnet18 (random init) ``layer3`` and ``layer4``:

1. the job on the CPU (``extract.device=cpu``, ``cluster=threads``);
2. the same cache scored again on dask-cuda workers (``cluster=cuda``), every table compared
   row by row with the CPU's: equal, or the differing rows counted and the first shown;
3. ``stage=extract`` of the same images on the GPU: images/s, and how far its activations
   are from the CPU's (cuDNN's kernels round differently: close, not equal).

Writes one JSON and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import broden_data as data
from benchmarks.bench_job import cli

TABLES = ("iou", "units", "layers")


def compare_tables(cpu: Path, gpu: Path) -> dict:
    """Per table: rows, and rows whose key or count columns differ (with the first one)."""
    from storage.tables import read_table

    found = {}
    for table in TABLES:
        want, got = read_table(cpu / "results", table), read_table(gpu / "results", table)
        keys = [c for c in ("layer", "unit", "label", "category") if c in want.columns]
        want, got = (f.sort_values(keys).reset_index(drop=True) for f in (want, got))
        if want.shape != got.shape or list(want.columns) != list(got.columns):
            found[table] = {"rows": len(want), "equal": False,
                            "why": f"shape {got.shape} vs {want.shape}"}
            continue
        differs = ~((want == got) | (want.isna() & got.isna())).all(axis=1)
        row = {"rows": len(want), "equal": not differs.any(), "differing_rows": int(differs.sum())}
        if differs.any():
            first = int(np.flatnonzero(differs.to_numpy())[0])
            row["first"] = {"cpu": want.iloc[first].astype(str).to_dict(),
                            "gpu": got.iloc[first].astype(str).to_dict()}
        found[table] = row
    return found


def activation_gap(cpu: Path, gpu: Path) -> dict:
    """Largest absolute and relative difference of the GPU's activations from the CPU's."""
    from storage.activations import ActivationStore

    (a,), (b,) = (list((w / "activations").rglob("*.zarr")) for w in (cpu, gpu))
    gap = {}
    for layer in ("layer3", "layer4"):
        x, y = ActivationStore(a).array(layer)[:], ActivationStore(b).array(layer)[:]
        gap[layer] = {"max_abs": float(np.abs(x - y).max()),
                      "max_relative": float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))}
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/gpu_check")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    parser.add_argument("--tests-status", type=int, default=0, help="exit status of pytest -m cuda")
    args = parser.parse_args()
    root, n = Path(args.workdir), args.n
    data.ensure_dataset(root, [n], progress=False)
    data.ensure_images(root, n, progress=False)
    dataset = data.dataset_path(root, n)
    cpu, gpu, extract = root / "cpu", root / "gpu", root / "gpu_extract"
    for path in (gpu, extract):
        shutil.rmtree(path, ignore_errors=True)
    on_cpu = {"extract": cli(cpu, dataset, "stage=extract", "extract.device=cpu"),
              "iou": cli(cpu, dataset, "stage=iou", "extract.device=cpu")}
    shutil.copytree(cpu, gpu)
    for folder in ("results", "thresholds", "signatures"):
        shutil.rmtree(gpu / folder, ignore_errors=True)
    on_gpu = {"iou": cli(gpu, dataset, "stage=iou", "cluster=cuda"),
              "extract": cli(extract, dataset, "stage=extract", "extract.device=cuda")}
    tables = compare_tables(cpu, gpu)
    result = {"images": n, "tests_status": args.tests_status, "tables": tables,
              "counts_equal": all(t["equal"] for t in tables.values()),
              "activation_gap": activation_gap(cpu, extract),
              "images_per_s": {f"{where}_{stage}": n / row["seconds"]
                               for where, rows in (("cpu", on_cpu), ("gpu", on_gpu))
                               for stage, row in rows.items()},
              "runs": {"cpu": on_cpu, "gpu": on_gpu}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    speeds = ", ".join(f"{k} {v:.0f} img/s" for k, v in result["images_per_s"].items())
    print(f"gpu_check: cuda tests {'passed' if args.tests_status == 0 else 'FAILED'}; counts "
          f"{'equal' if result['counts_equal'] else 'DIFFER'} on {n} images; {speeds}; "
          f"{args.out}")


if __name__ == "__main__":
    main()
