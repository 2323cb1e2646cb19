"""Shared fixtures: tiny generated data only, nothing downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A 24-image built-in synthetic Broden dataset (112 px images, 56 px segmentations)."""
    from stages.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "synthetic", n_images=24, progress=False)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *args]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Three checkpoints of tests.tiny_models' tiny_cnn, named like a training sweep."""
    from tests.tiny_models import save_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    paths = [folder / f"ep{epoch}.pt" for epoch in (1, 5, 20)]
    for epoch, path in zip((1, 5, 20), paths, strict=True):
        save_checkpoint(path, seed=epoch)
    return paths
