"""Entry point: ``python -m pipeline.run stage=iou [key=value ...]`` (Hydra).

With no dataset or model given, the run generates the built-in synthetic Broden-format
dataset, trains the small demo model, and dissects it.  Errors a user can cause print one
line naming what to fix and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.cluster import dask_scheduler
from pipeline.graph import Pipeline
from storage.errors import UserError

log = logging.getLogger("netdissect")


CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The same config the command line builds, as a plain dict (for tests and notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def run(cfg: dict) -> object:
    """Run one stage from a plain config dict (what tests and notebooks call)."""
    stage = str(cfg.get("stage", "iou"))
    Pipeline(cfg).validate()
    with dask_scheduler(cfg.get("cluster") or {"kind": "none"}) as scheduler:
        return Pipeline(cfg, scheduler).run(stage)


def quiet_libraries() -> None:
    """Dask and its web stack log every connection at INFO; keep their errors only
    (in this process and, through the environment, in the worker processes it starts)."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    import distributed  # noqa: F401 - configures its loggers on import; override after
    for name in list(logging.root.manager.loggerDict) + ["distributed", "tornado", "bokeh"]:
        if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    logging.getLogger("netdissect").setLevel(logging.INFO)
    quiet_libraries()
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        print(f"error: config key {key!r}: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    try:
        run(plain)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


HYDRA_FLAGS = ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info",
               "--shell-completion", "-sc", "--version", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--resolve", "-p", "--package")


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra does, so a bad key or option is one clear line
    (Hydra's own message spans several lines and exits 1)."""
    if any(arg.split("=")[0] in HYDRA_FLAGS for arg in argv):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_config(argv)
    except (HydraException, OmegaConfBaseException) as exc:
        text = f"{exc}\n{exc.__cause__ or ''}"
        print(f"error: {config_error_line(text)}", file=sys.stderr)
        sys.exit(2)


def config_error_line(text: str) -> str:
    """One line out of Hydra's or OmegaConf's multi-line composition errors."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    missing = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if missing:
        return f"config key {missing.group(1)} must be set (add {missing.group(1)}=...)"
    if "is not in struct" in text:
        quoted = re.search(r"Could not override '([^']+)'", text)
        key = quoted.group(1) if quoted else key
        return f"config key {key!r} does not exist; check its spelling (see pipeline/conf/)"
    if "Could not find" in text:
        options = []
        for line in lines[1:]:
            if line.startswith("Config search path"):
                break
            if not line.startswith("Available"):
                options.append(line)
        return f"{lines[0]}; available: {', '.join(options)}"
    return "; ".join(lines[:2])


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
