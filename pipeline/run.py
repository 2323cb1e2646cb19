"""Entry point: ``python -m pipeline.run stage=iou [key=value ...]`` (Hydra).

With no dataset or model given, the run generates the built-in synthetic Broden-format
dataset, trains the small demo model, and dissects it.  Errors a user can cause print one
line naming what to fix and exit with status 2.
"""

from __future__ import annotations

import logging
import os
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


if __name__ == "__main__":
    main()
