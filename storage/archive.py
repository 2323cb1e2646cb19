"""Safe extraction of .zip, .tar, .tar.gz (and other compressed tar) archives.

Why not ``extractall``: an archive from a mirror is untrusted input. Every member is checked
before a single byte is written (no absolute paths, no ``..``, no links, no device files or
fifos), so a refused archive extracts nothing; files are then copied out one by one (no
permission bits or owners from the archive) into a hidden temporary sibling of the target,
which is renamed into place only when complete. A reader sees no directory or a whole one.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from storage.errors import UserError


class ArchiveError(UserError):
    """An archive is unreadable, unsafe, or cannot be extracted where asked."""


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]  # normalized relative path components
    is_dir: bool
    size: int
    handle: object  # ZipInfo or TarInfo, to open the member's data


def extract_archive(
    archive: str | Path,
    target_dir: str | Path,
    *,
    dest_name: str | None = None,
    require: str | None = None,
    progress: bool = True,
) -> Path:
    """Extract ``archive`` into ``target_dir`` and return the extracted dataset root.

    An archive holding one top-level folder (Broden's ``broden1_224/``) yields that folder's
    contents as the root; any other layout is kept whole. The root is named ``dest_name``
    (default: that folder's name, else the archive's name without its suffixes) and must
    not exist yet. ``require`` names a file the root must contain (``index.csv``), checked
    before anything is written.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    target_dir = Path(target_dir)
    with _open_members(archive) as (members, read):
        top = _single_top_folder(members)
        strip = 1 if top else 0
        if require and not any(
            not m.is_dir and m.parts[strip:] == PurePosixPath(require).parts for m in members
        ):
            where = f"its top folder {top}/" if top else "its top level"
            raise ArchiveError(f"{archive}: no {require} in {where}; not the expected archive")
        name = dest_name or top or _stem(archive)
        final = target_dir / name
        if final.exists():
            raise ArchiveError(f"{final} already exists; remove it to extract {archive.name} again")
        _check_space(archive, target_dir, members)
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=target_dir))
        try:
            _write_members(members, read, tmp, strip=strip, label=archive.name, progress=progress)
            try:
                os.rename(tmp, final)  # same file system: atomic
            except OSError as exc:
                raise ArchiveError(
                    f"{final}: cannot move the unpacked files there ({exc.strerror})"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------- reading


@contextmanager
def _open_members(archive: Path) -> Iterator[tuple[list[_Member], object]]:
    """Yield (checked members, function opening a member's bytes) for a zip or a tar."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = [_zip_member(archive, info) for info in zf.infolist()]
                _check_layout(archive, members)
                yield members, zf.open
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, mode="r:*") as tf:
                members = [_tar_member(archive, info) for info in tf.getmembers()]
                _check_layout(archive, members)
                yield members, tf.extractfile
        else:
            raise ArchiveError(f"{archive}: neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        # OSError: gzip/lzma stream errors and read errors; write errors became ArchiveError
        raise ArchiveError(f"{archive}: damaged or unreadable archive ({exc})") from None


def _zip_member(archive: Path, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(
            f"{archive}: member {info.filename!r} is {_kind_name(kind)}; refusing the archive"
        )
    return _Member(_safe_parts(archive, info.filename), info.is_dir(), info.file_size, info)


def _tar_member(archive: Path, info: tarfile.TarInfo) -> _Member:
    if not (info.isfile() or info.isdir()):
        kind = "a link" if info.issym() or info.islnk() else "a device file or fifo"
        raise ArchiveError(f"{archive}: member {info.name!r} is {kind}; refusing the archive")
    return _Member(_safe_parts(archive, info.name), info.isdir(), info.size, info)


def _kind_name(kind: int) -> str:
    return "a link" if kind == stat.S_IFLNK else "a device file, socket or fifo"


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """Path components of a member name; refuses anything that could land outside."""
    unified = name.replace("\\", "/")
    parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
    if unified.startswith("/") or (parts and ":" in parts[0]):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    if ".." in parts:
        raise ArchiveError(
            f"{archive}: member {name!r} leaves the target folder ('..'); refusing the archive"
        )
    if not parts:
        raise ArchiveError(f"{archive}: member {name!r} has no file name; refusing the archive")
    return parts


def _check_layout(archive: Path, members: list[_Member]) -> None:
    """Refuse names listed twice and files that other members treat as folders."""
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    for member in members:
        if not member.is_dir:
            if member.parts in files:
                raise ArchiveError(
                    f"{archive}: member {'/'.join(member.parts)!r} is listed twice; refusing the archive"
                )
            files.add(member.parts)
        folders.update(member.parts[:i] for i in range(1, len(member.parts)))
        if member.is_dir:
            folders.add(member.parts)
    clash = files & folders
    if clash:
        name = "/".join(min(clash))
        raise ArchiveError(f"{archive}: {name!r} is both a file and a folder; refusing the archive")


def _single_top_folder(members: list[_Member]) -> str | None:
    """The one folder every member lies in, if there is exactly one such folder."""
    tops = {m.parts[0] for m in members}
    if len(tops) != 1:
        return None
    (top,) = tops
    inside = [m for m in members if len(m.parts) > 1]
    return top if inside and all(m.is_dir for m in members if len(m.parts) == 1) else None


def _stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def _check_space(archive: Path, target_dir: Path, members: list[_Member]) -> None:
    existing = target_dir
    while not existing.exists():
        existing = existing.parent
    needed = sum(m.size for m in members)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ArchiveError(
            f"{archive}: unpacking needs {needed / 1e9:.2f} GB but {existing} has "
            f"{free / 1e9:.2f} GB free"
        )


# --------------------------------------------------------------------------- writing


def _write_members(
    members: list[_Member], read, tmp: Path, *, strip: int, label: str, progress: bool
) -> None:
    bar = tqdm(
        total=sum(m.size for m in members),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"unpack {label}",
        disable=None if progress else True,
    )
    with bar:
        for member in members:
            parts = member.parts[strip:]
            if not parts:
                continue
            path = tmp.joinpath(*parts)
            if member.is_dir:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            source: IO[bytes] | None = read(member.handle)
            if source is None:  # a tar entry without data; only files reach here
                raise ArchiveError(f"{label}: member {'/'.join(member.parts)!r} has no data")
            try:
                with source, path.open("xb") as out:
                    for block in iter(lambda src=source: src.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
            except OSError as exc:
                raise ArchiveError(f"{path}: cannot write ({exc.strerror or exc})") from None
