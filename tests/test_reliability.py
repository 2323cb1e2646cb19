"""Interrupted, killed or misused, the pipeline loses nothing and says one line.

Every test here drives real processes (``python -m pipeline.run``): signals, SIGKILL at a
build of each stage, a killed Dask worker, and a catalogue of bad inputs, each giving
one ``error:`` line, exit status 2 and nothing half-written.  docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.run import compose_config, run
from stages.synthetic import generate
from storage.tables import read_table, recorded_file
from tests.conftest import REPO, cli, cli_env

RUN = ["cluster=none", "progress=false"]
MODEL = ["dataset.block_size=4", "model=custom", "model.factory=tests.tiny_models:tiny_cnn",
         "model.weights=none", "model.layers=[conv2,conv3]"]
FAST = [*RUN, *MODEL, "scoring.quantile=0.02"]
KEYS = ["model_id", "layer", "unit", "label", "concept_set", "basis"]


def env() -> dict[str, str]:
    return {**cli_env(), "PYTHONUNBUFFERED": "1"}


def start(*args: str, preexec=None) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)


def finish(*args: str, expect: int = 0, preexec=None, logs: bool = False) -> str:
    """Run to the end; its stderr (with ``logs``: everything it printed, logs included)."""
    proc = subprocess.run(cli(*args), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec)
    assert proc.returncode == expect, (proc.returncode, proc.stderr[-3000:])
    return proc.stdout + proc.stderr if logs else proc.stderr


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    """Read the process's output until a line holds ``needle``; the lines so far."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}: {''.join(lines)[-2000:]}")


def process_tree(pid: int) -> dict[int, int]:
    """Every process started (directly or not) by ``pid`` -> its parent, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = {}, {pid}
    while frontier:
        new = {p: parent for p, parent in parents.items() if parent in frontier and p not in found}
        found.update(new)
        frontier = set(new)
    return found


def blocks_done(workdir: Path, layer: str, until: int, timeout: float = 120) -> int:
    """Wait until ``until`` blocks of ``layer`` are written in the workdir's store."""
    import zarr

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            (store,) = (workdir / "activations").rglob("*.zarr")
            done = int(zarr.open_group(str(store), mode="r")[f"progress/{layer}"][:].sum())
        except (ValueError, KeyError, FileNotFoundError):
            done = 0
        if done >= until:
            return done
        time.sleep(0.05)
    raise AssertionError(f"{layer}: fewer than {until} blocks written in {timeout} s")


def eventually(condition, timeout: float = 60) -> None:
    """Wait until ``condition()`` holds (polled), failing after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{condition} did not hold within {timeout} s"
        time.sleep(0.05)


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def tables(workdir: Path, table: str = "iou") -> pd.DataFrame:
    frame = read_table(workdir / "results", table)
    keys = [k for k in KEYS if k in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def half_written(workdir: Path) -> list[Path]:
    """Temporary files left behind, or table files without a manifest."""
    leftovers = [p for p in workdir.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]
    results = workdir / "results"
    orphans = [p for p in results.rglob("*.parquet")
               if not recorded_file(results, p).manifest_path.is_file()] if results.exists() else []
    return leftovers + orphans


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("rel") / "data", n_images=48, progress=False)


# ---------------------------------------------------------------- signals
@pytest.mark.parametrize("signum, code, cluster", [
    (signal.SIGINT, 130, ["cluster=local", "cluster.n_workers=2"]),
    (signal.SIGTERM, 143, ["cluster=threads"]),
])
def test_signal_during_extract_is_one_line_no_orphans_and_resumes(data, tmp_path, signum,
                                                                  code, cluster):
    wd = tmp_path / "wd"
    args = ["stage=extract", f"dataset.path={data}", f"workdir={wd}", "progress=false",
            "dataset.block_size=2", "model=custom", "model.factory=tests.tiny_models:slow_cnn",
            "model.weights=none", "model.layers=[conv3]"]
    proc = start(*args, *cluster)
    wait_for(proc, "extract: conv3")
    assert blocks_done(wd, "conv3", until=1) < 24  # in the middle of the extraction
    workers = set(process_tree(proc.pid))
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    eventually(lambda: not alive(workers), 30)  # no worker process outlives the run
    assert not half_written(wd)
    resumed = finish(*args, "cluster=none", logs=True)
    assert "resuming conv3" in resumed
    from storage.activations import ActivationStore

    clean = tmp_path / "clean"  # the reference, built in this process
    run(compose_config([*[a if not a.startswith("workdir=") else f"workdir={clean}" for a in args],
                        "cluster=none"]))

    (store,) = (wd / "activations").rglob("*.zarr")
    (again,) = (clean / "activations").rglob("*.zarr")
    np.testing.assert_array_equal(ActivationStore(store).array("conv3")[:],
                                  ActivationStore(again).array("conv3")[:])
    assert store.name == again.name


# ---------------------------------------------------------------- SIGKILL in every stage
def stage_args(stage: str, data: Path) -> list[str]:
    """A stage's command line, with only the values that stage reads."""
    dataset = [f"dataset.path={data}", "dataset.block_size=4"]
    if stage == "concepts":
        return [f"stage={stage}", *RUN, *dataset]
    if stage == "report":
        return [f"stage={stage}", *RUN]
    if stage == "extract":
        return [f"stage={stage}", *RUN, f"dataset.path={data}", *MODEL]
    return [f"stage={stage}", *RUN, f"dataset.path={data}", *MODEL, "scoring.quantile=0.02"]


STAGES = {  # stage -> (what the workdir holds first, extra arguments, what it logs building)
    "concepts": (None, [], "concepts"),
    "extract": (None, [], "extract"),
    "quantile": ("extract", [], "quantile"),
    "iou": ("quantile", [], "iou"),
    "rescore": ("iou", ["concepts.name=again"], "iou"),
    "explain": ("iou", ["explain.beam=2", "explain.max_length=2"], "explain"),
    "report": ("iou", [], "report"),
}


def own_args(stage: str, data: Path) -> list[str]:
    args = [*stage_args(stage, data), *STAGES[stage][1]]
    return [*args, f"concepts.path={data}"] if stage == "rescore" else args


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory) -> dict[str, Path]:
    """Workdirs holding what each stage needs first, and one where every stage ran (built in
    this process: only the runs under test need processes of their own)."""
    root = tmp_path_factory.mktemp("prepared")
    out, previous = {}, None
    for before in ("extract", "quantile", "iou"):  # each starts from a copy of the one before
        out[before] = root / before
        if previous is not None:
            shutil.copytree(previous, out[before])
        run(compose_config([*stage_args(before, data), f"workdir={out[before]}"]))
        previous = out[before]
    out["reference"] = root / "reference"
    shutil.copytree(out["iou"], out["reference"])
    for stage in ("concepts", "rescore", "explain", "report"):
        run(compose_config([*own_args(stage, data), f"workdir={out['reference']}"]))
    return out


def same_rows(workdir: Path, reference: Path) -> None:
    """Every table row the workdir holds equals the reference's row of the same keys."""
    for table in ("iou", "units", "layers", "explanations"):
        got = tables(workdir, table)
        if got.empty:
            continue
        want = tables(reference, table)
        want = want[want["concept_set"].isin(got["concept_set"].unique())].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, obj=table)


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_during_each_stages_build_then_rerun_equals_a_clean_run(
        data, prepared, tmp_path, stage):
    before, _, logs = STAGES[stage]
    killed = tmp_path / "killed"
    if before:
        shutil.copytree(prepared[before], killed)
    proc = start(*own_args(stage, data), f"workdir={killed}")
    try:
        wait_for(proc, f"{logs}: building")  # the build has started: its locks are held
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed in the build, not finished before it
    finish(*own_args(stage, data), f"workdir={killed}")
    assert not half_written(killed)
    reference = prepared["reference"]
    same_rows(killed, reference)
    if stage in ("iou", "rescore", "explain"):
        assert not tables(killed, "explanations" if stage == "explain" else "iou").empty
    if stage == "report":
        pages = sorted(p.relative_to(killed / "report") for p in (killed / "report").rglob("*.html"))
        assert pages and "</html>" in (killed / "report" / "index.html").read_text()
    if stage in ("concepts", "extract"):
        from storage.activations import ActivationStore
        from storage.concepts import ConceptStore

        if stage == "concepts":
            (a,) = (killed / "concepts").glob("*.zarr")
            b = reference / "concepts" / a.name
            assert ConceptStore.open(str(a)).complete
            np.testing.assert_array_equal(ConceptStore.open(str(a)).read_block(0, 48).pixel_labels,
                                          ConceptStore.open(str(b)).read_block(0, 48).pixel_labels)
        else:
            (a,) = (killed / "activations").rglob("*.zarr")
            b = reference / a.relative_to(killed)
            for layer in ("conv2", "conv3"):
                assert ActivationStore.open(str(a)).is_complete(layer)
                np.testing.assert_array_equal(ActivationStore.open(str(a)).array(layer)[:],
                                              ActivationStore.open(str(b)).array(layer)[:])


# ---------------------------------------------------------------- worker faults
def test_a_killed_worker_is_replaced_and_the_tables_are_identical(data, tmp_path):
    local = ["cluster=local", "cluster.n_workers=2", "progress=false"]
    model = [a for a in MODEL if not a.startswith("dataset.")]
    args = ["stage=iou", f"dataset.path={data}", *local, *model, "dataset.block_size=1",
            "scoring.quantile=0.02"]
    wd, clean = tmp_path / "wd", tmp_path / "clean"  # the cache, and the reference: in-process
    run(compose_config(["stage=extract", f"dataset.path={data}", "cluster=none", "progress=false",
                        *model, "dataset.block_size=1", f"workdir={wd}"]))
    shutil.copytree(wd, clean)
    proc = start(*args, f"workdir={wd}")
    wait_for(proc, "iou: building")

    def workers() -> list[int]:  # nannies live in the run's process; workers are children
        return [p for p in alive(set(process_tree(proc.pid)))
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]

    eventually(lambda: len(workers()) == 2)
    os.kill(workers()[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    run(compose_config([*[a for a in args if a not in local], "cluster=none", "progress=false",
                        f"workdir={clean}"]))
    a, b = tables(wd), tables(clean)
    pd.testing.assert_frame_equal(a.drop(columns=["model"]), b.drop(columns=["model"]))


def test_no_worker_left_on_an_external_scheduler_is_one_line(data, tmp_path):
    import json

    scheduler_file = tmp_path / "scheduler.json"
    dask = [os.sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", "0",
                                  "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                                  str(scheduler_file)], cwd=REPO, env=cli_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen([os.sys.executable, "-m", "distributed.cli.dask_worker",
                                   address, "--nthreads", "1", "--no-nanny", "--host",
                                   "127.0.0.1", "--no-dashboard"], cwd=REPO, env=cli_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.Popen(
            cli("stage=extract", f"dataset.path={data}", f"workdir={tmp_path / 'wd'}",
                f"cluster.address={address}", "cluster.no_worker_timeout=3", "progress=false",
                "dataset.block_size=1",
                "model=resnet18", "model.weights=none", "model.layers=[layer3]"),
            cwd=REPO, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(proc, "extract: building")
        blocks_done(tmp_path / "wd", "layer3", until=1)  # the workers are extracting
        worker.kill()
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no Dask worker left" in errors[0], out[-3000:]
        assert "Traceback" not in out
    finally:
        for p in (worker, scheduler):
            if p is not None:
                p.kill()
                p.wait(30)


# ---------------------------------------------------------------- one line, every cluster
@pytest.mark.parametrize("cluster", ["cluster=none", "cluster=threads", "cluster=local"])
def test_a_user_error_inside_a_dask_task_is_one_line_in_every_cluster(tmp_path, cluster):
    root = generate(tmp_path / "data", n_images=8, progress=False)
    (root / "images" / "synthetic" / "000005.png").write_bytes(b"not an image")
    proc = subprocess.run(cli("stage=extract", f"dataset.path={root}", f"workdir={tmp_path}/w",
                              cluster, "cluster.n_workers=2", "progress=false",
                              "dataset.block_size=2", "model=resnet18", "model.weights=none",
                              "model.layers=[layer1]"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [line for line in lines if line.startswith("error:")], proc.stderr[-3000:]
    assert len(lines) == 1 and "000005.png: not a readable image" in lines[0]
    assert "distributed" not in proc.stderr


def test_an_internal_error_gives_a_short_traceback_and_the_log(data, tmp_path):
    proc = subprocess.run(cli("stage=extract", f"dataset.path={data}", f"workdir={tmp_path}",
                              "cluster=none", "progress=false", "model=custom",
                              "model.factory=tests.tiny_models:broken_model",
                              "model.layers=[conv]"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("internal error (a bug, not your input); the full traceback is in ")
    log = Path(last.rsplit(" ", 1)[1])
    assert log.is_file() and "RuntimeError: a bug in the model" in log.read_text()
    assert "RuntimeError: a bug in the model" in proc.stderr
    assert proc.stderr.count('File "') <= 3  # short: the last frames only


# ---------------------------------------------------------------- fail before work
def test_formula_and_layer_errors_come_before_any_work(tmp_path, data):
    bad = tmp_path / "f.yaml"
    bad.write_text('x: "car AND (wheel"\n')
    for extra, needle in ((f"concepts.formulas={bad}", "f.yaml"),
                          ("model.layers=[conv9]", "'conv9' is not a layer")):
        wd = tmp_path / extra.split("=")[0]
        err = finish("stage=iou", f"dataset.path={data}", f"workdir={wd}",
                     *[a for a in FAST if not a.startswith("model.layers")],
                     *(["model.layers=[conv3]"] if "layers" not in extra else []), extra,
                     expect=2)
        assert err.strip().startswith("error:") and needle in err and err.count("\n") == 1
        assert not wd.exists() or not [p for p in wd.rglob("*") if "logs" not in p.parts]


def test_a_truncated_label_png_stops_the_default_run_before_any_model(data, tmp_path):
    """A broken file in one's own Broden copy is found while the labels are decoded, which
    comes before the demo model is trained and before any forward pass."""
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    plane = copy / "images" / "synthetic" / "000005_object.png"
    plane.write_bytes(plane.read_bytes()[:60])  # truncated mid-file
    wd = tmp_path / "wd"
    err = finish("stage=all", f"dataset.path={copy}", f"workdir={wd}", "progress=false",
                 "cluster=none", expect=2)
    assert err.strip().startswith("error:") and err.count("\n") == 1, err
    assert "000005_object.png" in err and "index.csv line 7" in err, err
    assert not (wd / "models").exists() and not (wd / "activations").exists()


def test_a_folder_of_plain_images_says_what_a_broden_directory_is(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    err = finish("stage=iou", f"dataset.path={folder}", f"workdir={tmp_path / 'wd'}",
                 expect=2)
    assert err.count("\n") == 1 and "not a Broden-format directory" in err, err
    assert "index.csv, category.csv, label.csv" in err and "docs/REAL_DATA.md" in err


# ---------------------------------------------------------------- bad-input catalogue
def _damage(root: Path, case: str) -> str:
    """Damage a fresh 8-image dataset; the text the one error line must hold."""
    images = root / "images" / "synthetic"
    index = root / "index.csv"
    lines = index.read_text().splitlines()
    if case == "missing image":
        (images / "000003.png").unlink()
        return "000003.png: image not found"
    if case == "corrupt image":
        (images / "000003.png").write_bytes(b"\x89PNG garbage")
        return "000003.png: not a readable image"
    if case == "missing label png":
        (images / "000002_object.png").unlink()
        return "000002_object.png: label image not found"
    if case == "corrupt label png":
        (images / "000002_object.png").write_bytes(b"garbage")
        return "000002_object.png: not a readable image"
    if case == "label png of the wrong size":
        from PIL import Image

        Image.new("RGB", (9, 9)).save(images / "000002_object.png")
        return "differs from index.csv sw x sh"
    if case == "malformed csv row":
        index.write_text("\n".join([*lines[:3], lines[3] + ",extra"] + lines[4:]) + "\n")
        return "index.csv line 4"
    if case == "label number not in label.csv":
        head = lines[0].split(",")
        cells = lines[2].split(",")
        cells[head.index("scene")] = "9999"
        index.write_text("\n".join([lines[0], lines[1], ",".join(cells), *lines[3:]]) + "\n")
        return "label 9999 is not in label.csv"
    if case == "path traversal":
        index.write_text("\n".join([lines[0], lines[1].replace("synthetic/000000.png",
                                                               "../../etc/passwd", 1),
                                    *lines[2:]]) + "\n")
        return "escapes the dataset's images/ folder"
    if case == "symlink leaving the dataset":
        outside = root.parent / "outside.png"
        shutil.move(images / "000001.png", outside)
        (images / "000001.png").symlink_to(outside)
        return "outside the dataset's images/ folder"
    if case == "empty dataset":
        index.write_text(lines[0] + "\n")
        return "index.csv: lists no images"
    raise ValueError(case)


CATALOGUE = ["missing image", "corrupt image", "missing label png", "corrupt label png",
             "label png of the wrong size", "malformed csv row", "label number not in label.csv",
             "path traversal", "symlink leaving the dataset", "empty dataset"]


@pytest.mark.parametrize("case", CATALOGUE)
def test_bad_input_is_one_line_exit_2_nothing_half_written(tmp_path, case):
    root = generate(tmp_path / "data", n_images=8, progress=False)
    needle = _damage(root, case)
    wd = tmp_path / "wd"
    err = finish("stage=iou", f"dataset.path={root}", f"workdir={wd}", *FAST, expect=2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not half_written(wd) and not (wd / "results").exists()


def test_unknown_category_and_nan_activations_are_one_line(data, tmp_path):
    err = finish("stage=iou", f"dataset.path={data}", f"workdir={tmp_path / 'a'}", *FAST,
                 "scoring.categories=[object,nope]", expect=2)
    assert "unknown category 'nope'" in err and "object" in err and err.count("\n") == 1
    err = finish("stage=iou", f"dataset.path={data}", f"workdir={tmp_path / 'b'}",
                 *[a for a in FAST if not a.startswith("model.")], "model=custom",
                 "model.factory=tests.tiny_models:nan_model", "model.layers=[conv]", expect=2)
    assert "model 'nan_model' layer 'conv' unit 1: NaN or infinite activation" in err
    assert err.count("\n") == 1 and not (tmp_path / "b" / "results").exists()


def test_full_disk_during_a_write_is_one_line_and_the_rerun_completes(data, tmp_path):
    def small_files() -> None:  # files over 256 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    wd = tmp_path / "wd"
    args = ["stage=iou", f"dataset.path={data}", f"workdir={wd}", "cluster=none",
            "progress=false", "dataset.block_size=48", "model=resnet18", "model.weights=none",
            "model.layers=[layer1]"]
    err = finish(*args, expect=2, preexec=small_files)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no space left to write it" in lines[0], err
    assert not half_written(wd)
    run(compose_config(args))
    assert len(read_table(wd / "results", "units")) == 64


def test_a_corrupt_chunk_is_one_line_naming_the_store(data, tmp_path):
    wd = tmp_path / "wd"
    args = [f"dataset.path={data}", f"workdir={wd}", *RUN, *MODEL]
    run(compose_config(["stage=extract", *args]))  # the cache: in-process
    (store,) = (wd / "activations").rglob("*.zarr")
    chunk = next(p for p in (store / "conv3").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00" * 40)
    err = finish("stage=quantile", *args, expect=2)
    assert err.count("\n") == 1 and f"{store}: the layer conv3 of images" in err
    assert "remove" in err and "to rebuild it" in err


def test_a_concept_set_of_other_images_or_sizes_is_one_line_before_decoding(data, tmp_path):
    wd = tmp_path / "wd"
    base = ["stage=iou", f"dataset.path={data}", f"workdir={wd}", *FAST]
    run(compose_config(base))  # the cache: in-process
    bigger = generate(tmp_path / "bigger", n_images=8, image_size=224, seg_size=112,
                      progress=False)
    err = finish(*base, f"concepts.path={bigger}", expect=2)
    assert "line 2: image synthetic/000000.png is 224x224 but the cache was made from 112x112" in err
    assert err.count("\n") == 1
    assert not list((wd / "concepts").glob("set-*"))  # nothing decoded
