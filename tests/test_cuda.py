"""On a CUDA GPU: scores computed on the GPU equal the CPU's, and GPU activations match.

Skipped on machines without one; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``)
where there is a GPU.  The scoring comparison reuses one cache extracted on the CPU, so the
thresholds and counts are computed from the same float values on both devices.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.run import compose_config, run
from storage.activations import ActivationStore
from storage.tables import read_table

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]

RESULTS = ("iou", "units", "layers")


def _args(workdir: Path, root: Path, *extra: str) -> list[str]:
    return [f"workdir={workdir}", f"dataset.path={root}", "model=resnet18", "model.weights=none",
            "model.layers=[layer3,layer4]", "progress=false", *extra]


def rescored_copy(cpu: Path, other: Path) -> Path:
    """``cpu``'s workdir with its activations and labels, its scores removed."""
    shutil.copytree(cpu, other)
    for folder in ("results", "thresholds", "signatures", "report"):
        shutil.rmtree(other / folder, ignore_errors=True)
    return other


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("layer", "unit", "label", "category") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("where", [["cluster=cuda", "extract.device=auto"],
                                   ["cluster=threads", "extract.device=cuda"]],
                         ids=["dask-cuda workers", "threads on the GPU"])
def test_scores_on_the_gpu_equal_the_cpu_scores(synthetic_root, tmp_path, where):
    cpu = tmp_path / "cpu"
    run(compose_config(_args(cpu, synthetic_root, "stage=iou", "extract.device=cpu")))
    gpu = rescored_copy(cpu, tmp_path / "gpu")
    run(compose_config(_args(gpu, synthetic_root, "stage=iou", *where)))
    for table in RESULTS:
        want, got = read_table(cpu / "results", table), read_table(gpu / "results", table)
        assert len(want) > 0
        pd.testing.assert_frame_equal(_sorted(got), _sorted(want), check_exact=True)


def test_gpu_activations_match_the_cpu_activations(synthetic_root, tmp_path):
    """Not bit-equal (cuDNN picks other kernels), equal to float32 rounding."""
    stores = {}
    for device in ("cpu", "cuda"):
        workdir = tmp_path / device
        run(compose_config(_args(workdir, synthetic_root, "stage=extract",
                                 f"extract.device={device}")))
        (path,) = (workdir / "activations").rglob("*.zarr")
        stores[device] = ActivationStore(path)
    for layer in ("layer3", "layer4"):
        cpu, gpu = (stores[d].array(layer)[:] for d in ("cpu", "cuda"))
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * float(np.abs(cpu).max()))
