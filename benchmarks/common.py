"""Shared helpers for benchmarks: synthetic activation stores, store sizes, peak memory and
measurements in fresh processes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from storage import activations as astore


def write_activations(path: Path, n_images: int, units: int = 512, hw: int = 7,
                      block: int = 256, seed: int = 0) -> None:
    """ReLU-like random activations (mostly zeros, a heavy tail), written block by block."""
    rng = np.random.default_rng(seed)
    astore.create_store(path, [f"img{i}" for i in range(n_images)], {"layer4": (units, hw, hw)},
                        block, "float32", {"model": "bench", "n": n_images})
    scale = rng.gamma(2.0, 1.0, size=(1, units, 1, 1)).astype(np.float32)
    for b in range(-(-n_images // block)):
        n = min(block, n_images - b * block)
        x = np.maximum(rng.standard_normal((n, units, hw, hw), dtype=np.float32) - 0.5, 0) * scale
        astore.write_block(path, b, b * block, {"layer4": x})
    astore.mark_complete(path)


def directory_bytes(path: Path) -> int:
    """Bytes on disk of every file under ``path`` (a store's size)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM of its own address space (ru_maxrss would
    include the parent's peak for processes started by fork + exec, like Dask workers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


REPO = Path(__file__).resolve().parents[1]


def run_child(module: str, *args: str) -> dict:
    """Run a measurement in a fresh interpreter so peak memory is its own.

    The child (and any Dask worker it starts) imports this checkout's modules, whatever the
    caller's working directory; a failing child raises with the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", module, "--child", *args], capture_output=True,
                         text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{module} child {' '.join(args)[:200]} failed "
                           f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
