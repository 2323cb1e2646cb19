"""notebooks/analysis.ipynb runs top to bottom on a tiny real run and draws its figures.

The tiny run (``tiny_workdir``) is shared with tests/test_report.py: the pipeline is run once
per test session through the CLI, in a subprocess, and reused by a marker file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
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
    assert 'os.environ.get("NETDISSECT_WORKDIR")' in code[0].source
    assert "NETDISSECT_WORKDIR" in nb.cells[0].source  # the first cell says how to point it
    headings = " ".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    for section in ("unique detectors per category", "iou distributions", "top concepts",
                    "across layers and models", "across training checkpoints", "rotation curve",
                    "input perturbations", "units vs pca vs sparse-autoencoder latents",
                    "per-concept loadings", "discrimination vs interpretability",
                    "human agreement", "beam search vs optimal explanations"):
        assert section in headings, section


def test_notebook_runs_on_a_real_run(tiny_run, tmp_path, monkeypatch):
    nb = execute(tiny_run, tmp_path, monkeypatch)
    assert not outputs(nb, "error")
    # stacked bars, IoU histograms, top concepts, layer comparison; no experiment sections
    assert figures(nb) == 4
    for empty in ("No rotation rows", "No checkpoint sweep", "No perturbed rows",
                  "No other bases", "No loadings rows", "No probe rows", "No ratings",
                  "No explanations"):
        assert empty in stdout(nb), empty
    assert not list(tmp_path.iterdir()), "the notebook wrote files into its directory"


@pytest.mark.parametrize("start", ["repo root", "notebooks"])
def test_notebook_finds_the_readme_workdir_without_the_variable(tiny_run, tmp_path, monkeypatch,
                                                                start):
    """Started where people start Jupyter - the repo root or notebooks/ - it finds
    ./workdir (the README's) with no NETDISSECT_WORKDIR set."""
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "workdir").symlink_to(tiny_run, target_is_directory=True)
    monkeypatch.delenv("NETDISSECT_WORKDIR", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:2]  # the setup cell is the one that looks for the workdir
    cwd = root if start == "repo root" else root / "notebooks"
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    assert not outputs(nb, "error")
    assert "unit rows" in stdout(nb)


def test_notebook_draws_detectors_across_checkpoints(synthetic_root, checkpoints, tmp_path,
                                                     monkeypatch):
    """A real sweep over three checkpoints of one architecture fills the checkpoint section."""
    paths = checkpoints
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


def test_checkpoints_of_one_file_name_stay_apart_in_tables_report_and_notebook(
        synthetic_root, checkpoints, tmp_path, monkeypatch):
    """run1/A.pt and run2/A.pt: two weights in the tables, two rows in the report, two
    identities in the notebook's figures - never one model made of both."""
    import shutil

    from storage.tables import read_table

    paths = [tmp_path / "run1" / "A.pt", tmp_path / "run2" / "A.pt"]
    for source, path in zip(checkpoints[:2], paths, strict=True):
        path.parent.mkdir()
        shutil.copy(source, path)
    wd = tmp_path / "wd"
    proc = subprocess.run(cli("-m", "stage=all", f"workdir={wd}", f"dataset.path={synthetic_root}",
                              "model=custom", "model.factory=tests.tiny_models:tiny_cnn",
                              "model.layers=[conv3]", "cluster=none", "progress=false",
                              "scoring.quantile=0.05", "model.weights=" + ",".join(map(str, paths))),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = sorted(read_table(wd / "results", "units")["weights"].unique())
    assert len(weights) == 2 and all(w.startswith("A.pt#") for w in weights), weights
    index = (wd / "report" / "index.html").read_text()
    for w in weights:
        assert f"tiny_cnn [{w}]" in index, w
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = execute(wd, run_dir, monkeypatch)
    assert not outputs(nb, "error")
    shown = " ".join(o["data"].get("text/plain", "") for o in outputs(nb, "display_data")
                     + outputs(nb, "execute_result"))
    for w in weights:
        assert f"tiny_cnn[{w}]/conv3" in shown, w


def test_notebook_draws_the_experiments_from_real_rows(synthetic_root, tmp_path, monkeypatch):
    """Rotation sweep, perturbations, PCA and an SAE-like linear map, all run for real on a
    tiny CNN: the rotation, perturbation and bases sections each draw their figure."""
    import numpy as np

    from pipeline.run import compose_config, run

    sae = tmp_path / "sae.npz"
    rng = np.random.default_rng(0)
    np.savez(sae, W_enc=rng.standard_normal((16, 32)), b_enc=np.zeros(32))
    wd = tmp_path / "wd"
    base = [f"workdir={wd}", f"dataset.path={synthetic_root}", "stage=iou", "model=custom",
            "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
            "model.layers=[conv3]", "cluster=none", "progress=false", "scoring.quantile=0.05"]
    evidence = ["scoring.bootstrap=20", "scoring.null=permute", "scoring.null_draws=5"]
    for extra in (evidence, ["transform=rotate", "transform.alpha=0.5"],
                  ["transform=rotate", "transform.alpha=0.5", "transform.seed=1"],
                  ["transform=rotate", "transform.alpha=1"], ["transform=pca"],
                  ["transform=linear", f"transform.path={sae}", "transform.activation=relu"],
                  ["extract.perturb=noise:40"], ["extract.perturb=rotate:90"],
                  ["stage=loadings", "loadings.top=5"],
                  ["stage=loadings", "loadings.top=5", "transform=rotate", "transform.alpha=1"],
                  ["stage=probe", "probe.folds=2"],
                  ["stage=probe", "probe.folds=2", "transform=rotate", "transform.alpha=1"],
                  ["stage=explain", "explain.max_length=2"],
                  ["stage=explain", "explain.max_length=2", "explain.search=optimal"]):
        run(compose_config([*base, *extra]))
    from pipeline.graph import Run
    from pipeline.rating import rated_layers
    from pipeline.workflow import GRAPH
    from stages.rate import RatingBook

    rating = Run(compose_config([*base, "stage=rate", "rate.detectors_only=false"]),
                 lambda: None, GRAPH)
    book = RatingBook(rated_layers(rating), 4, 64)
    for unit, answer in ((0, "yes"), (1, "no"), (2, "skip")):
        book.answer({"rater": "ann", "layer": "tiny_cnn/conv3", "unit": unit, "answer": answer})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = execute(wd, run_dir, monkeypatch)
    assert not outputs(nb, "error")
    text = stdout(nb)
    assert "No rotation rows" not in text and "No perturbed rows" not in text
    assert "No other bases" not in text and "No checkpoint sweep" in text
    assert "No loadings rows" not in text and "No probe rows" not in text
    assert "No ratings" not in text and "No explanations" not in text
    assert figures(nb) == 10  # 4 common + rotation, perturbations, bases, loadings, probes,
    # beam vs optimal
    shown = " ".join(o.get("data", {}).get("text/plain", "")
                     for o in outputs(nb, "execute_result") + outputs(nb, "display_data"))
    for needle in ("alpha", "pca(whiten=false)", "linear(file=sae.npz,activation=relu)", "noise",
                   "detectors_std", "unique_lo", "null_detectors", "accuracy_std",
                   "human_agreement", "beam_suboptimal"):
        assert needle in shown, needle
    assert "bootstrap intervals for" in text  # the plain run's layers rows have them
    from pipeline.api import rotation_summary

    seeds = rotation_summary(wd).query("category == 'all'").set_index("alpha")["seeds"]
    assert seeds.to_dict() == {0.5: 2, 1.0: 1}
