"""The stage graph: each stage declares what it needs, which config it reads, the artifacts
it makes (with their fingerprints) and how to build them; running a stage runs what is
missing upstream, once.

    dataset ─► concepts ─────────────────────────────┐
    dataset ─► model ─► extract ─► basis ─► quantile ─► iou ◄┴─ concept_set     report ◄─ results
                          └─ cache (rescore)        └─► signatures ─► explain

A stage's ``targets`` are its :class:`Target` s: artifacts made together by one build (one
pass over the data).  They are a pure function of the run: the config, the values of the
stages it needs and files already on disk — computing them never builds anything, so a whole
run can be planned before any work starts (:meth:`Run.plan`, the dry run).  A value that
needs what an upstream build makes raises :class:`NotReady` while that build is pending.
:func:`realize` is the only place that decides, for every stage alike, to skip (all current:
one log line), to wait (another run holds a lock: it says what it waits for, then finds the
artifact current), or to build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.layout import Layout
from storage.artifacts import Artifact, locked_all

log = logging.getLogger("netdissect")


class NotReady(Exception):  # noqa: N818 - a state, not an error
    """What a plan needs is made by stage ``stage``, which has not been built yet."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


@dataclass(frozen=True)
class Target:
    """Artifacts one build makes together; ``build`` gets those not current and must leave
    each of them committed."""

    name: str
    artifacts: tuple[Artifact, ...]
    build: Callable[[list[Artifact]], None]


def no_targets(_run: Run) -> list[Target]:
    return []


def no_value(_run: Run) -> None:
    return None


@dataclass(frozen=True)
class StageDef:
    name: str
    needs: tuple[str, ...]  # stages whose values targets/value may ask for
    uses: tuple[str, ...]  # config keys (or key prefixes) the stage reads
    targets: Callable[[Run], list[Target]] = no_targets
    value: Callable[[Run], Any] = no_value
    reads_results: bool = False  # plans from what earlier stages of the run write


@dataclass(frozen=True)
class Step:
    """What a stage of a run would do: ``build``, ``skip`` (current), ``wait`` (another run
    holds a lock) or ``after`` (its artifacts depend on what stage ``after`` builds first)."""

    stage: str
    status: str
    targets: tuple[str, ...] = ()
    after: str = ""

    def line(self) -> str:
        if self.status == "after":
            return f"{self.stage:12s} after {self.after} (decided once {self.after} is built)"
        what = "; ".join(self.targets) if self.targets else "nothing to make"
        return f"{self.stage:12s} {self.status:5s} {what}"


class Run:
    """One pipeline run: its config, layout, lazy scheduler, and per stage its targets and
    value (each computed once)."""

    def __init__(self, cfg: Config, scheduler: Callable[[], Any], graph: dict[str, StageDef]):
        self.cfg, self.scheduler, self.graph = cfg, scheduler, graph
        self.layout = Layout.of(cfg)
        self._memo: dict[Hashable, Any] = {}
        self._active: list[str] = []

    def shared(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per run: what several stages derive from the same values."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _of(self, kind: str, name: str) -> Any:
        if self._active and name not in self.graph[self._active[-1]].needs:
            raise RuntimeError(f"stage {self._active[-1]} asked for {name}, not in its needs")
        stage = self.graph[name]
        self._active.append(name)
        try:
            return self.shared((kind, name), lambda: getattr(stage, kind)(self))
        finally:
            self._active.pop()

    def value(self, name: str) -> Any:
        """The value of stage ``name`` (what the stages after it read)."""
        return self._of("value", name)

    def targets(self, name: str) -> list[Target]:
        return self._of("targets", name)

    def get(self, name: str) -> Any:
        """Realize ``name`` and everything it needs, upstream first; then its value."""
        for stage in closure(self.graph, name):
            realize(stage, self.targets(stage))
        return self.value(name)

    def plan(self, name: str) -> list[Step]:
        """What :meth:`get` would do, stage by stage, without building or locking anything."""
        steps: list[Step] = []
        for stage in closure(self.graph, name):
            pending = next((s.stage for s in steps if s.status != "skip"), None)
            if self.graph[stage].reads_results and pending:
                steps.append(Step(stage, "after", after=pending))
                continue
            try:
                targets = self.targets(stage)
            except NotReady as exc:
                steps.append(Step(stage, "after", after=exc.stage))
                continue
            steps.append(_step(stage, targets))
        return steps


def _step(stage: str, targets: list[Target]) -> Step:
    todo = [t for t in targets if not all(a.is_current() for a in t.artifacts)]
    if not todo:
        return Step(stage, "skip", tuple(t.name for t in targets))
    locked = any(a.is_locked() for t in todo for a in t.artifacts if not a.is_current())
    return Step(stage, "wait" if locked else "build", tuple(t.name for t in todo))


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
