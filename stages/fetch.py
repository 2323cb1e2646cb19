"""Fetch stage: put a registered Broden release or Places365 checkpoint where the tool looks.

Why a stage of its own: the real data is large and served from one host, so getting it is
a step that must resume, verify, and never leave a half dataset behind, and that a second
run skips. Datasets land in ``<data_dir>/<name>/`` (the folder holding ``index.csv``);
weights in torch's hub cache, ``<torch.hub.get_dir()>/checkpoints/<file>``, where torchvision
keeps its own. A file the user already has (``archive=``) is verified and unpacked the same
way, with no network at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.archive import extract_archive
from storage.artifacts import Artifact
from storage.download import ChecksumError, download, file_md5
from storage.errors import UserError
from storage.registry import Release, release


@dataclass(frozen=True)
class FetchResult:
    """What a fetch did, for the entry point to print (``message`` is one line)."""

    name: str
    path: Path  # dataset root (holds index.csv) or checkpoint file
    md5: str | None  # None when nothing was read (dataset already present)
    md5_verified: bool  # True: equal to the registry's published checksum
    action: str  # "present" | "downloaded" | "extracted"
    message: str


def dataset_dir(name: str, data_dir: str | Path) -> Path:
    """Where ``fetch_dataset(name, data_dir)`` puts (or finds) the dataset."""
    release(name, "dataset")
    return Path(data_dir).expanduser().absolute() / name


def weights_cache_path(name: str, hub_dir: str | Path | None = None) -> Path:
    """Where ``fetch_weights(name)`` puts (or finds) a checkpoint."""
    if hub_dir is None:
        import torch.hub

        hub_dir = torch.hub.get_dir()
    return Path(hub_dir).expanduser().absolute() / "checkpoints" / release(name, "weights").filename


def fetch_dataset(
    name: str,
    data_dir: str | Path,
    *,
    archive: str | Path | None = None,
    urls: Sequence[str] | None = None,
    mirrors: Sequence[str] = (),
    keep_archive: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> FetchResult:
    """Make ``<data_dir>/<name>/`` a complete copy of the registered Broden release ``name``.

    Downloads the zip (``urls`` replaces the official URL list, ``mirrors`` are tried after
    it) or takes the local ``archive``, checks its MD5 where one is published, and unpacks
    it atomically. A dataset folder that already holds ``index.csv`` is left alone. The
    downloaded zip is deleted after unpacking unless ``keep_archive``; a user's own
    ``archive`` is never deleted.
    """
    entry = release(name, "dataset")
    root = dataset_dir(name, data_dir)
    if (root / "index.csv").is_file():
        made = fetched_artifact(root, entry).manifest()
        how = "fetched" if made else "placed there by hand, not verified by this tool"
        return FetchResult(name, root, None, False, "present", f"{name}: already at {root} ({how})")
    if root.exists():
        raise UserError(
            f"{root} exists but holds no index.csv (an interrupted copy?); remove it and fetch again"
        )
    if archive is not None:
        zip_path, source = Path(archive).expanduser().absolute(), str(archive)
        if not zip_path.is_file():
            raise UserError(f"archive {zip_path} not found")
        md5, verified = _verify_local(zip_path, entry)
    else:
        zip_path = root.parent / entry.filename
        result = download(
            entry.url_list(urls, mirrors),
            zip_path,
            md5=entry.md5,
            progress=progress,
            timeout=timeout,
            attempts=attempts,
            retry_wait=retry_wait,
            manual_hint="or pass its path as the archive to use",
        )
        md5, verified, source = result.md5, result.verified, result.url or str(zip_path)
    extract_archive(zip_path, root.parent, dest_name=name, require="index.csv", progress=progress)
    fetched_artifact(root, entry).commit(source=source, md5=md5, md5_verified=verified,
                                         md5_source=entry.md5_source)
    if archive is None and not keep_archive:
        zip_path.unlink()
    return FetchResult(
        name,
        root,
        md5,
        verified,
        "extracted",
        f"{name}: unpacked to {root} from {source}; {_md5_note(entry, md5, verified)}",
    )


def fetch_weights(
    name: str,
    *,
    hub_dir: str | Path | None = None,
    urls: Sequence[str] | None = None,
    mirrors: Sequence[str] = (),
    progress: bool = True,
    timeout: float = 60.0,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> FetchResult:
    """Make ``<hub_dir>/checkpoints/<file>`` the registered checkpoint ``name`` (default
    hub dir: ``torch.hub.get_dir()``); an existing file is checked, not downloaded again."""
    entry = release(name, "weights")
    dest = weights_cache_path(name, hub_dir)
    result = download(
        entry.url_list(urls, mirrors),
        dest,
        md5=entry.md5,
        progress=progress,
        timeout=timeout,
        attempts=attempts,
        retry_wait=retry_wait,
    )
    note = _md5_note(entry, result.md5, result.verified)
    if result.url is None:
        return FetchResult(
            name, dest, result.md5, result.verified, "present", f"{name}: already at {dest}; {note}"
        )
    return FetchResult(
        name,
        dest,
        result.md5,
        result.verified,
        "downloaded",
        f"{name}: downloaded to {dest} from {result.url}; {note}",
    )


def _verify_local(path: Path, entry: Release) -> tuple[str, bool]:
    actual = file_md5(path)
    if entry.md5 and actual != entry.md5:
        raise ChecksumError(
            f"{path}: MD5 {actual} differs from the published {entry.md5} of {entry.filename}; "
            "the file is damaged or another release"
        )
    return actual, entry.md5 is not None


def _md5_note(entry: Release, md5: str, verified: bool) -> str:
    if verified:
        return f"MD5 {md5} matches the published checksum"
    return (
        f"MD5 {md5} computed; no published checksum for {entry.filename} to compare with, "
        "so record this one (storage/registry.py) once another copy confirms it"
    )


def fetched_artifact(root: Path, entry: Release) -> Artifact:
    """A fetched dataset as an artifact: its manifest records the release and where it came
    from (source, MD5 and whether that MD5 was the published one)."""
    return Artifact(root, {"release": entry.name, "file": entry.filename, "md5": entry.md5})
