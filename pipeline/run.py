"""Entry point: ``python -m pipeline.run stage=iou [key=value ...]`` (Hydra, sweeps with -m).

With no dataset or model given, the run generates the built-in synthetic Broden-format
dataset, trains the small demo model, and dissects it.  Every job of a run (each point of a
``-m`` sweep) is composed and checked before the first starts: errors a user can cause print
one line naming what to fix and exit with status 2.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from pipeline.config import Config
from storage.errors import UserError, first_line

log = logging.getLogger("netdissect")
CONF_DIR = Path(__file__).resolve().parent / "conf"
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
               "-sc", "--version", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--resolve", "-p", "--package")
MULTIRUN_FLAGS = ("-m", "--multirun")


def override_keys(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The config keys (or groups) a list of command-line overrides sets."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The typed config the command line builds (for tests and notebooks); a bad key, value,
    preset or an override no stage of the run reads raises a one-line :class:`UserError`."""
    from hydra import compose, initialize_config_dir

    from pipeline.workflow import check_overrides_used  # the stages: not needed for --help

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(config_error(exc)) from None
    check_overrides_used(cfg, override_keys(overrides))
    return cfg



def run(cfg: Config) -> Any:
    """Check, then run one stage of a typed config (what tests and notebooks call)."""
    from pipeline.workflow import execute, preflight

    preflight(cfg)
    return execute(cfg)


def _choices(key: str) -> list[str]:
    """The allowed values of an enum-typed config key, read from the dataclasses."""
    node: Any = Config
    for part in key.split("."):
        if not (is_dataclass(node) and part in {f.name for f in fields(node)}):
            return []
        node = get_type_hints(node)[part]
    return [m.value for m in node] if isinstance(node, type) and issubclass(node, Enum) else []


def _known_keys(node: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        hint = get_type_hints(node)[f.name]
        keys.append(prefix + f.name)
        if is_dataclass(hint):
            keys += _known_keys(hint, prefix + f.name + ".")
    return keys


def config_error(exc: Exception) -> str:
    """One line from Hydra's or OmegaConf's exception objects (their attributes, not text)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None) or ""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return (f"Could not find '{exc.missing_cfg_file}'; available: "
                f"{', '.join(exc.options or [])}")
    if isinstance(cause, MissingMandatoryValue):
        return f"config key {key} must be set (add {key}=...)"
    if isinstance(cause, ConfigAttributeError | ConfigKeyError):
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        if key.startswith("model.kwargs."):
            hint = f"; add a new entry with +{key}=..."
        return f"config key {key!r} does not exist{hint}; see pipeline/config.py"
    if isinstance(cause, ValidationError) and key:
        choices = _choices(key)
        value = getattr(cause, "value", None)
        if choices:
            return f"{key}={value!r}: choose one of {', '.join(choices)}"
        return f"{key}={value!r}: {cause.msg.splitlines()[0] if cause.msg else 'invalid value'}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}; write key=value"
    return first_line(exc)


def quiet_libraries() -> None:
    """Dask and its web stack log every connection at INFO; keep their errors only (through
    the environment, in the worker processes a run starts; ``pipeline.cluster`` quiets this
    process's loggers when it imports distributed)."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    warnings.filterwarnings("ignore", module="zarr")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) turned into an exception, so clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def guarded(action: Callable[[], object]) -> None:
    """Run ``action``; whatever ends it reaches the user as one line (and an exit status):
    their mistakes as ``error: …`` with status 2, an interruption as the way to resume with
    128 + the signal number, a full disk as what to free, a lost Dask worker as what broke.
    Anything else is a bug: a short traceback and where the full one is."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        action()
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(128 + signum)
    except (HydraException, OmegaConfBaseException) as exc:
        fail(config_error(exc))
    except UserError as exc:
        fail(str(exc))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            internal_error(exc)
        fail(f"{exc.filename or 'a file'}: no space left to write it ({exc.strerror}); free "
             "some space (or choose another workdir=) and run the same command again")
    except Exception as exc:  # noqa: BLE001 - the last resort: say where the full story is
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            task = exc.args[0] if exc.args else "a task"
            fail(f"Dask workers died running {task!r} more often than Dask retries a task "
                 "(out of memory? raise cluster.memory_limit or lower "
                 "cluster.threads_per_worker)", code=1)
        internal_error(exc)


def internal_error(exc: BaseException) -> NoReturn:
    files = [h.baseFilename for h in logging.getLogger().handlers
             if isinstance(h, logging.FileHandler)]
    full = "".join(traceback.format_exception(exc))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(full)
            handler.flush()
    short = "".join(traceback.format_exception(exc, limit=-3))
    where = f"; the full traceback is in {files[0]}" if files else ""
    print(f"{short.rstrip()}\ninternal error (a bug, not your input){where}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(composed: DictConfig) -> None:
    logging.getLogger("netdissect").setLevel(logging.INFO)
    quiet_libraries()

    from pipeline.workflow import execute

    def job() -> None:  # composed and checked already, by check_command_line
        execute(OmegaConf.to_object(composed))

    guarded(job)


def jobs(argv: list[str]) -> list[list[str]]:
    """The override list of every job a command line runs (one, or each point of a sweep)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    if not any(a in MULTIRUN_FLAGS for a in argv):
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


HELP = """usage: python -m pipeline.run [-m] [key=value ...]

Network Dissection: every unit of a layer scored against every labelled concept (exact
thresholds, IoU), cached in Zarr, tables in Parquet under workdir/results.  With no dataset
or model given it runs on the built-in synthetic dataset and a small demo model.

stages (stage=...):
  iou       the dissection, running whatever is missing upstream (the default)
  all       iou, then the HTML report           report    the report alone
  rescore   score the cached activations against concepts.path= / concepts.formulas=
  explain   compositional explanations: beam search, or proven best (explain.search=optimal)
  loadings  per-concept principal axes: one unit or a combination? (loadings.concepts=[..])
  probe     a linear SVM on pooled activations, cross-validated (probe.category=scene)
  rate      a local page where people rate the units' labels (rate.rater=NAME)
  dataset, concepts, model, extract, quantile   one part of the way
  fetch     download a Broden release or Places365 weights; check   validate a dataset

main keys (all of them, with their defaults: pipeline/config.py):
  workdir=./workdir              dataset.path=DIR (Broden format) or dataset=broden1_224
  model=resnet18 | alexnet | ... model.weights=FILE|NAME|none   model.layers=[layer3,layer4]
  scoring.quantile=0.005         scoring.union=restricted|global|lite   scoring=lite
  transform=rotate|pca|linear    extract.perturb=noise:S|rotate:D|shuffle:N
  cluster=threads|local|none|cuda  cluster.address=tcp://HOST:8786
  dry_run=true                   what every stage of every job would do; builds nothing

examples:
  python -m pipeline.run stage=all
  python -m pipeline.run model=resnet18 dataset.path=/data/broden1_224 model.layers=[layer4]
  python -m pipeline.run -m model.weights=ep1.pt,ep5.pt,ep20.pt dry_run=true

README.md has the workflows; --hydra-help shows Hydra's own options.
"""


def check_command_line(argv: list[str]) -> bool:
    """Compose and check every job before Hydra starts the first (fail before work).  With
    ``dry_run=true`` print what each job would do instead; returns whether jobs remain to
    run.  ``--help`` is the project's own."""
    if any(arg in ("--help", "-h") for arg in argv):
        print(HELP, end="")
        return False
    if any(arg.split("=")[0] in HYDRA_FLAGS for arg in argv):
        return True
    checked: list[tuple[list[str], Config]] = []

    def check() -> None:
        from pipeline.workflow import preflight

        for job in jobs(argv):
            cfg = compose_config(job)
            preflight(cfg)
            checked.append((job, cfg))
        if any(cfg.dry_run for _, cfg in checked):
            print_plans(checked)

    guarded(check)
    return not any(cfg.dry_run for _, cfg in checked)


def print_plans(checked: list[tuple[list[str], Config]]) -> None:
    """The dry run: per job, what every stage would do; nothing is built or started."""
    from pipeline.workflow import plan

    for i, (job, cfg) in enumerate(checked, start=1):
        shown = " ".join(o for o in job if not o.startswith("dry_run=")) or "(defaults)"
        print(f"job {i} of {len(checked)}: {shown}")
        for step in plan(cfg):
            print(f"  {step.line()}")


if __name__ == "__main__":
    if check_command_line(sys.argv[1:]):
        main()
