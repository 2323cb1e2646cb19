"""The stage graph: each stage declares what it needs, which config it reads, the artifacts
it makes (with their fingerprints) and how to build them; running a stage runs what is
missing upstream, once.

    dataset ─► concepts ───────────────────────────┐
    dataset ─► model ─► extract ─► quantile ─► iou ◄┴─ concept_set     report ◄─ results
                                           └─► explain

A stage's ``plan`` returns its :class:`Target` s: artifacts made together by one build (one
pass over the data).  :func:`realize` is the only place that decides, for every stage alike,
to skip (all current: one log line), to wait (another run holds a lock: it says what it
waits for, then finds the artifact current), or to build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.layout import Layout
from storage.artifacts import Artifact, locked_all

log = logging.getLogger("netdissect")


@dataclass(frozen=True)
class Target:
    """Artifacts one build makes together; ``build`` gets those not current and must leave
    each of them committed."""

    name: str
    artifacts: tuple[Artifact, ...]
    build: Callable[[list[Artifact]], None]


@dataclass(frozen=True)
class StageDef:
    name: str
    needs: tuple[str, ...]  # stages whose values plan/value may ask for
    uses: tuple[str, ...]  # config keys (or key prefixes) the stage reads
    plan: Callable[[Run], list[Target]]
    value: Callable[[Run], Any]


class Run:
    """One pipeline run: its config, layout, lazy scheduler and the values of stages done."""

    def __init__(self, cfg: Config, scheduler: Callable[[], Any], graph: dict[str, StageDef]):
        self.cfg, self.scheduler, self.graph = cfg, scheduler, graph
        self.layout = Layout.of(cfg)
        self.values: dict[str, Any] = {}
        self.active: list[str] = []

    def get(self, name: str) -> Any:
        """The value of stage ``name``, realizing it (and what it needs) first."""
        if self.active and name not in self.graph[self.active[-1]].needs:
            raise RuntimeError(f"stage {self.active[-1]} asked for {name}, not in its needs")
        if name not in self.values:
            stage = self.graph[name]
            self.active.append(name)
            try:
                realize(name, stage.plan(self))
                self.values[name] = stage.value(self)
            finally:
                self.active.pop()
        return self.values[name]


def realize(stage: str, targets: list[Target]) -> None:
    """Skip, wait for, or build each target of a stage."""
    def waiting(artifact: Artifact) -> None:
        log.info("%s: waiting for %s (another run is building it)", stage, artifact.label)

    if targets and all(a.is_current() for t in targets for a in t.artifacts):
        log.info("%s: skipped, %s current", stage, describe([t.name for t in targets]))
        return
    for target in targets:
        missing = [a for a in target.artifacts if not a.is_current()]
        if not missing:
            log.info("%s: skipped, %s current", stage, describe([target.name]))
            continue
        with locked_all(missing, waiting):
            missing = [a for a in missing if not a.is_current()]
            if not missing:
                log.info("%s: skipped, %s was built by another run", stage, target.name)
                continue
            log.info("%s: building %s", stage, target.name)
            target.build(missing)
        unfinished = [a.label for a in target.artifacts if not a.is_current()]
        if unfinished:
            raise RuntimeError(f"{stage}: build of {target.name} left {unfinished} incomplete")


def describe(names: list[str]) -> str:
    return f"{names[0]} is" if len(names) == 1 else f"{', '.join(names)} are"


def closure(graph: dict[str, StageDef], name: str) -> list[str]:
    """The stage and everything it may need, upstream first."""
    seen: list[str] = []

    def visit(n: str) -> None:
        for need in graph[n].needs:
            visit(need)
        if n not in seen:
            seen.append(n)

    visit(name)
    return seen
