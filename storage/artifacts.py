"""One artifact layer: every file or store the pipeline writes says what made it, is written
atomically, is locked while it is built, and is skipped when it is current.

An artifact is a path (a file, a directory or a Zarr store) plus a *fingerprint*: a JSON-able
mapping of everything that determines its content (upstream artifacts' keys, parameters,
input hashes).  Its *manifest* is a hidden sidecar beside it,
``.<name>.artifact.json`` (``.<store>[<member>].artifact.json`` for one member of a store,
e.g. one layer of an activation store), holding the fingerprint, its short key and whether
the artifact is complete.  Hidden names keep manifests and locks out of what pyarrow, duckdb,
polars, zarr and xarray list.

- *current* = the manifest exists, says complete, carries the same fingerprint, and the
  path exists;
- *partial* = same fingerprint, not complete (a resumable store: resume it);
- *stale* = made from other inputs;
- *missing* = no manifest or no path.

The manifest is written last, atomically (write to a temporary name, then ``os.replace``), so
a killed build is never read as complete.  Files and directories are written the same way
(:func:`atomic_file`, :func:`atomic_dir`): a reader sees the old version or the new one,
never half.  :meth:`Artifact.locked` is a ``filelock`` lock per artifact, so concurrent runs
on one workdir never build the same artifact twice: the second waits, then finds it current.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

MANIFEST_FORMAT = 1
State = Literal["missing", "partial", "complete", "stale"]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def digest(obj: Any, length: int = 16) -> str:
    """Short stable hash of a JSON-able object (dict key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_digest(path: Path) -> str:
    """sha256 of a file's content, streamed."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A path and the fingerprint of what made it; see the module docstring."""

    path: Path
    fingerprint: Mapping[str, Any] = field(hash=False)
    member: str | None = None
    records: Path | None = None  # folder of the manifest and lock; default: beside the path

    @property
    def key(self) -> str:
        return digest(dict(self.fingerprint))

    @property
    def _stem(self) -> str:
        return f".{self.path.name}" + (f"[{self.member}]" if self.member else "")

    @property
    def _records(self) -> Path:
        return self.path.parent if self.records is None else self.records

    @property
    def manifest_path(self) -> Path:
        return self._records / f"{self._stem}.artifact.json"

    @property
    def lock_path(self) -> Path:
        return self._records / f"{self._stem}.lock"

    @property
    def target(self) -> Path:
        """What must exist on disk: the path, or the member's entry inside it."""
        return self.path / self.member if self.member else self.path

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" [{self.member}]" if self.member else "")

    def manifest(self) -> dict | None:
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def state(self) -> State:
        data = self.manifest()
        if data is None or not self.target.exists():
            return "missing"
        if data.get("format") != MANIFEST_FORMAT or data.get("key") != self.key:
            return "stale"
        return "complete" if data.get("complete") else "partial"

    def is_current(self) -> bool:
        return self.state() == "complete"

    def begin(self) -> None:
        """Record that a resumable build of these inputs has started."""
        self._write_manifest(False)

    def commit(self, **info: Any) -> None:
        """Record that the artifact is complete (always the last write of a build)."""
        self._write_manifest(True, info)

    def _write_manifest(self, complete: bool, info: Mapping[str, Any] | None = None) -> None:
        data = {
            "format": MANIFEST_FORMAT,
            "key": self.key,
            "complete": complete,
            "made": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": dict(self.fingerprint),
            **({"info": dict(info)} if info else {}),
        }
        write_text_atomic(self.manifest_path, json.dumps(data, indent=1, sort_keys=True,
                                                         default=str) + "\n")

    def forget(self) -> None:
        """Drop the manifest, so the artifact reads as missing (before rebuilding it)."""
        self.manifest_path.unlink(missing_ok=True)

    def is_locked(self) -> bool:
        """Does another process hold this artifact's lock now?  Asked without creating or
        changing any file (a dry run writes nothing)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False  # no lock file: nobody has ever held it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    @contextmanager
    def locked(self, on_wait: Callable[[Artifact], None] | None = None) -> Iterator[None]:
        """Hold this artifact's lock; ``on_wait`` is told when another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(self)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()


def recorded(folder: Path, suffix: str, recursive: bool = False) -> list[tuple[Path, dict]]:
    """Every artifact with a manifest in ``folder`` (its records folder) whose name ends in
    ``suffix`` (a whole artifact, not a store member): the artifact's name in that folder and
    its manifest, sorted."""
    pattern = f".*{suffix}.artifact.json"
    found = []
    for manifest in sorted(folder.rglob(pattern) if recursive else folder.glob(pattern)):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        found.append((manifest.parent / manifest.name[1 : -len(".artifact.json")], data))
    return found


def scratch_path(artifacts: list[Artifact], suffix: str = "partial.npz") -> Path:
    """A hidden working file beside the first artifact, named by the keys of all of them
    (e.g. the saved partial of the pass that builds them, so a killed pass resumes)."""
    first = artifacts[0]
    return first._records / f"{first._stem}.{digest([a.key for a in artifacts], 12)}.{suffix}"


@contextmanager
def locked_all(artifacts: list[Artifact],
               on_wait: Callable[[Artifact], None] | None = None) -> Iterator[None]:
    """Hold several artifacts' locks, taken in path order so two runs never deadlock."""
    with ExitStack() as stack:
        for artifact in sorted(artifacts, key=lambda a: (str(a.path), a.member or "")):
            stack.enter_context(artifact.locked(on_wait))
        yield


def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _clear_leftovers(path: Path) -> None:
    """Remove what a killed writer of ``path`` left (its temporary siblings).  Writers hold
    the artifact's lock, so any such sibling belongs to a run that is gone."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        remove(leftover)
    for leftover in path.parent.glob(f".{path.name}.old-*"):
        remove(leftover)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = _temporary_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it takes ``path``'s place
    (two renames on one filesystem: a reader sees the old directory or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = _temporary_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = _temporary_sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove(path: Path) -> None:
    """Remove a file or directory (a stale artifact before it is rebuilt)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
