"""notebooks/analysis.ipynb runs top to bottom on a tiny real run and draws its figures.

The tiny run (``tiny_workdir``) is shared with tests/test_report.py: the pipeline is run once
per test session through the CLI, in a subprocess, and reused by a marker file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, cli, cli_env

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
TINY_RUN = ["stage=iou", "dataset.synthetic.n_images=48", "cluster=none", "model.train.epochs=1",
            "progress=false"]


def tiny_workdir(tmp_path_factory) -> Path:
    """A workdir where ``stage=iou`` ran on 48 synthetic images (once per session)."""
    wd = tmp_path_factory.getbasetemp() / "tiny_run" / "wd"
    done = wd.parent / "done"
    if not done.exists():
        wd.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cli(*TINY_RUN, f"workdir={wd}"), cwd=REPO, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done.touch()
    return wd


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory)


def execute(workdir: Path, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("NETDISSECT_WORKDIR", str(workdir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == kind]


def figures(nb) -> int:
    return sum("image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def stdout(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


def test_committed_notebook_is_clean_and_documents_the_workdir():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear outputs"
    assert 'os.environ.get("NETDISSECT_WORKDIR", "workdir")' in code[0].source
    assert "NETDISSECT_WORKDIR" in nb.cells[0].source  # the first cell says how to point it
    headings = " ".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    for section in ("unique detectors per category", "iou distributions", "top concepts",
                    "across layers and models", "across training checkpoints", "rotation curve"):
        assert section in headings, section


def test_notebook_runs_on_a_real_run(tiny_run, tmp_path, monkeypatch):
    nb = execute(tiny_run, tmp_path, monkeypatch)
    assert not outputs(nb, "error")
    # stacked bars, IoU histograms, top concepts, layer comparison; no checkpoint or rotation
    assert figures(nb) == 4
    assert "No rotation rows" in stdout(nb) and "No checkpoint sweep" in stdout(nb)
    assert not list(tmp_path.iterdir()), "the notebook wrote files into its directory"


def test_notebook_draws_detectors_across_checkpoints(synthetic_root, tmp_path, monkeypatch):
    """A real sweep over three checkpoints of one architecture fills the checkpoint section."""
    from tests.tiny_models import save_checkpoint

    paths = []
    for epoch in (1, 5, 20):
        paths.append(tmp_path / f"ep{epoch}.pt")
        save_checkpoint(paths[-1], seed=epoch)
    wd = tmp_path / "wd"
    proc = subprocess.run(cli("-m", "stage=iou", f"workdir={wd}", f"dataset.path={synthetic_root}",
                              "model=custom", "model.factory=tests.tiny_models:tiny_cnn",
                              "model.layers=[conv3]", "cluster=none", "progress=false",
                              "scoring.quantile=0.05", "model.weights=" + ",".join(map(str, paths))),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = execute(wd, run_dir, monkeypatch)
    assert not outputs(nb, "error")
    assert "No checkpoint sweep" not in stdout(nb)
    assert figures(nb) == 5
    tables = [o["data"]["text/plain"] for o in outputs(nb, "display_data") + outputs(nb, "execute_result")
              if "ep20.pt" in o.get("data", {}).get("text/plain", "")]
    assert tables, "the checkpoint section shows its table"


def test_notebook_draws_the_rotation_curve(tiny_run, tmp_path, monkeypatch):
    """With rotate(...) rows in the units table the last section plots detectors vs alpha."""
    from storage.tables import partition_artifact, write_partition

    wd = tmp_path / "wd"
    shutil.copytree(tiny_run / "results", wd / "results")
    units = pd.read_parquet(wd / "results" / "units")
    for (model, layer), rows in units.groupby(["model", "layer"], observed=True):
        rows = rows.drop(columns=["model", "layer"]).sort_values("unit")
        for i, alpha in enumerate((0.0, 0.5, 1.0)):
            rotated = rows.assign(transform=f"rotate(alpha={alpha},seed=0)")
            # fewer detectors as alpha grows, as in the paper
            rotated["is_detector"] = rotated["is_detector"] & (rotated["unit"] % 3 >= i)
            params = {"concept_set": str(rows["concept_set"].iloc[0]),
                      "transform": rotated["transform"].iloc[0]}
            write_partition(partition_artifact(wd / "results", "units", str(model), str(layer),
                                               params, {}), rotated)
    nb = execute(wd, tmp_path, monkeypatch)
    assert not outputs(nb, "error")
    assert figures(nb) == 5
    assert "No rotation rows" not in stdout(nb)
    curve = [o for o in outputs(nb, "execute_result") + outputs(nb, "display_data")
             if "alpha" in o.get("data", {}).get("text/plain", "")]
    assert curve, "the rotation section shows its table"
    assert re.search(r"\b0\.5\b", curve[-1]["data"]["text/plain"])
