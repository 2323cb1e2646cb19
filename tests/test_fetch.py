"""Fetching: resumable verified downloads, safe extraction, registry fetches, Places365 weights.

Every byte is served by an HTTP server on 127.0.0.1 started here; nothing is downloaded from
the internet. Datasets are generated (stages.synthetic), checkpoints are saved from randomly
initialised torchvision models in the Places365 layout (``module.`` keys, no
``num_batches_tracked``, as PyTorch 0.2 wrote them).
"""

from __future__ import annotations

import hashlib
import io
import socket
import stat
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from stages.check import check_dataset
from stages.fetch import (
    dataset_dir,
    fetch_dataset,
    fetch_weights,
    fetched_artifact,
    weights_cache_path,
)
from stages.network.models import (
    build_model,
    legacy_checkpoint_key,
    load_checkpoint,
    record_layers,
)
from stages.synthetic import generate
from storage.archive import ArchiveError, extract_archive
from storage.download import ChecksumError, DownloadError, download
from storage.errors import UserError
from storage.registry import RELEASES, Release, release

# --------------------------------------------------------------------------- local server


@dataclass
class Served:
    """What the test server holds and how it misbehaves."""

    files: dict[str, bytes] = field(default_factory=dict)
    no_range: set[str] = field(default_factory=set)  # paths served whole whatever Range says
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, first request only
    drop_always: dict[str, int] = field(default_factory=dict)  # path -> bytes, every request
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, then go silent
    fail_first: dict[str, int] = field(default_factory=dict)  # path -> HTTP status, once
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    release_stall: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    served: Served  # set on a per-server subclass

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        served = self.served
        path = self.path
        served.requests.append((path, self.headers.get("Range")))
        if path in served.fail_first:
            self.send_error(served.fail_first.pop(path))
            return
        if path not in served.files:
            self.send_error(404)
            return
        data = served.files[path]
        start = 0
        ranged = self.headers.get("Range")
        if ranged and path not in served.no_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if path in served.drop_after or path in served.drop_always:
                cut = served.drop_after.pop(path, None) or served.drop_always[path]
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if path in served.stall_after:
                self.wfile.write(body[: served.stall_after.pop(path)])
                self.wfile.flush()
                served.release_stall.wait(10)  # the client times out long before
                return
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to do
            pass


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    served = Served()
    handler = type("BoundHandler", (Handler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        served.release_stall.set()
        httpd.shutdown()
        httpd.server_close()


def closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def payload(n: int = 300_000, seed: int = 0) -> bytes:
    return (
        torch.randint(
            0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
        )
        .numpy()
        .tobytes()
    )


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- download


def test_interrupted_download_resumes_with_range_and_verifies(server, tmp_path: Path) -> None:
    base, served = server
    data = payload()
    served.files["/f.bin"] = data
    served.drop_after["/f.bin"] = 100_000
    result = download(
        [base + "/f.bin"], tmp_path / "f.bin", md5=md5(data), progress=False, retry_wait=0
    )
    assert result.verified and result.md5 == md5(data) and result.url == base + "/f.bin"
    assert (tmp_path / "f.bin").read_bytes() == data
    assert served.requests == [("/f.bin", None), ("/f.bin", "bytes=100000-")]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["f.bin"]


def test_part_left_by_an_earlier_run_is_resumed(server, tmp_path: Path) -> None:
    base, served = server
    data = payload()
    served.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:120_000])  # what a killed run leaves
    dead = closed_port_url("f.bin")
    with pytest.raises(DownloadError, match="120000 bytes kept in .*f.bin.part to resume"):
        download([dead], tmp_path / "f.bin", md5=md5(data), progress=False, retry_wait=0)
    assert (tmp_path / "f.bin.part").read_bytes() == data[:120_000]
    result = download([base + "/f.bin"], tmp_path / "f.bin", md5=md5(data), progress=False)
    assert result.verified and (tmp_path / "f.bin").read_bytes() == data
    assert served.requests == [("/f.bin", "bytes=120000-")]
    assert not (tmp_path / "f.bin.part").exists()


def test_without_checksum_a_part_is_resumed_from_its_own_url(server, tmp_path: Path) -> None:
    base, served = server
    data = payload()
    served.files["/f.bin"] = data
    served.drop_after["/f.bin"] = 90_000
    result = download([base + "/f.bin"], tmp_path / "f.bin", progress=False, retry_wait=0)
    assert not result.verified and result.md5 == md5(data)
    assert served.requests == [("/f.bin", None), ("/f.bin", "bytes=90000-")]


@pytest.mark.parametrize("checksum_known", [False, True])
def test_a_part_moves_to_a_mirror_only_when_a_checksum_guards_it(
    server, tmp_path: Path, checksum_known: bool
) -> None:
    """Without a checksum, bytes from two URLs could mix unnoticed: start afresh instead."""
    base, served = server
    data = payload()
    served.files["/a.bin"] = served.files["/b.bin"] = data
    served.no_range.add("/a.bin")
    served.drop_always["/a.bin"] = 90_000  # never completes: each retry restarts at 0
    expected = md5(data) if checksum_known else None
    with pytest.raises(DownloadError, match="90000 bytes kept"):
        download([base + "/a.bin"], tmp_path / "f.bin", md5=expected, progress=False, retry_wait=0)
    download([base + "/b.bin"], tmp_path / "f.bin", md5=expected, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert served.requests[-1] == ("/b.bin", "bytes=90000-" if checksum_known else None)


def test_a_part_of_unknown_origin_is_not_continued_without_checksum(server, tmp_path: Path) -> None:
    base, served = server
    data = payload(80_000)
    served.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # no record of where it came from
    download([base + "/f.bin"], tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert served.requests == [("/f.bin", None)]


def test_wrong_checksum_is_refused_and_the_partial_file_removed(server, tmp_path: Path) -> None:
    base, served = server
    served.files["/f.bin"] = payload()
    with pytest.raises(ChecksumError) as info:
        download([base + "/f.bin"], tmp_path / "f.bin", md5="0" * 32, progress=False)
    message = str(info.value)
    assert "\n" not in message and "0" * 32 in message and base + "/f.bin" in message
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path: Path) -> None:
    base, served = server
    served.no_range.add("/f.bin")
    data = payload()
    served.files["/f.bin"] = data
    served.drop_after["/f.bin"] = 50_000
    result = download(
        [base + "/f.bin"], tmp_path / "f.bin", md5=md5(data), progress=False, retry_wait=0
    )
    assert result.verified and (tmp_path / "f.bin").read_bytes() == data
    assert served.requests == [("/f.bin", None), ("/f.bin", "bytes=50000-")]  # answered 200


def test_read_timeout_then_resume(server, tmp_path: Path) -> None:
    base, served = server
    data = payload()
    served.files["/f.bin"] = data
    served.stall_after["/f.bin"] = 70_000
    result = download(
        [base + "/f.bin"],
        tmp_path / "f.bin",
        md5=md5(data),
        progress=False,
        timeout=0.5,
        retry_wait=0,
    )
    assert result.verified and (tmp_path / "f.bin").read_bytes() == data
    assert served.requests[-1] == ("/f.bin", "bytes=70000-")


def test_server_error_is_retried(server, tmp_path: Path) -> None:
    base, served = server
    data = payload(5000)
    served.files["/f.bin"] = data
    served.fail_first["/f.bin"] = 503
    download([base + "/f.bin"], tmp_path / "f.bin", progress=False, retry_wait=0)
    assert (tmp_path / "f.bin").read_bytes() == data and len(served.requests) == 2


def test_unknown_checksum_is_computed_and_returned(server, tmp_path: Path) -> None:
    base, served = server
    data = payload(10_000)
    served.files["/f.bin"] = data
    result = download([base + "/f.bin"], tmp_path / "f.bin", progress=False)
    assert not result.verified and result.md5 == md5(data)
    again = download([base + "/f.bin"], tmp_path / "f.bin", progress=False)
    assert again.url is None and again.md5 == md5(data) and len(served.requests) == 1


def test_all_urls_failing_give_one_line_naming_each(server, tmp_path: Path) -> None:
    base, _ = server
    dead = closed_port_url("f.zip")
    missing = base + "/missing.zip"
    with pytest.raises(DownloadError) as info:
        download(
            [dead, missing],
            tmp_path / "f.zip",
            md5="a" * 32,
            progress=False,
            retry_wait=0,
            manual_hint="or pass it as archive",
        )
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert dead in message and missing in message and "HTTP 404" in message and "refused" in message
    assert "a" * 32 in message and str(tmp_path / "f.zip") in message and "archive" in message
    assert not (tmp_path / "f.zip").exists()


def test_concurrent_downloads_of_one_file_wait_for_each_other(server, tmp_path: Path) -> None:
    base, served = server
    data = payload()
    served.files["/f.bin"] = data
    results = []

    def fetch() -> None:
        results.append(
            download([base + "/f.bin"], tmp_path / "f.bin", md5=md5(data), progress=False)
        )

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(r.verified for r in results)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert served.requests == [("/f.bin", None)]  # one download; the others found it complete


def test_existing_file_with_wrong_checksum_is_kept_and_refused(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"hand-made")
    with pytest.raises(ChecksumError, match="delete it"):
        download(["http://127.0.0.1:9/never"], tmp_path / "f.bin", md5="b" * 32, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == b"hand-made"


# --------------------------------------------------------------------------- archives


def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are made on purpose
        for info, data in members:
            zf.writestr(info, data)
    return path


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _tar_special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


GOOD = ("ds/index.csv", b"image,split\n")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _zip(p / "a.zip", [GOOD, ("ds/../../evil.txt", b"x")]),
        lambda p: _zip(p / "a.zip", [GOOD, ("/etc/evil.txt", b"x")]),
        lambda p: _zip(p / "a.zip", [GOOD, ("ds\\..\\..\\evil.txt", b"x")]),
        lambda p: _zip(p / "a.zip", [GOOD, ("C:/evil.txt", b"x")]),
        lambda p: _zip(p / "a.zip", [GOOD, (_symlink_info("ds/link"), b"/etc/passwd")]),
        lambda p: _zip(p / "a.zip", [GOOD, GOOD]),
        lambda p: _tar(p / "a.tar.gz", [GOOD, ("../evil.txt", b"x")]),
        lambda p: _tar(p / "a.tar.gz", [GOOD, _tar_special("ds/link", tarfile.SYMTYPE, "/etc")]),
        lambda p: _tar(
            p / "a.tar.gz", [GOOD, _tar_special("ds/hard", tarfile.LNKTYPE, "ds/index.csv")]
        ),
        lambda p: _tar(p / "a.tar.gz", [GOOD, _tar_special("ds/fifo", tarfile.FIFOTYPE)]),
        lambda p: _tar(p / "a.tar.gz", [GOOD, _tar_special("ds/dev", tarfile.CHRTYPE)]),
    ],
    ids=[
        "dotdot",
        "absolute",
        "backslash-dotdot",
        "drive",
        "zip-symlink",
        "duplicate",
        "tar-dotdot",
        "tar-symlink",
        "tar-hardlink",
        "tar-fifo",
        "tar-device",
    ],
)
def test_unsafe_archive_is_refused_and_nothing_extracted(tmp_path: Path, make) -> None:
    archive = make(tmp_path)
    target = tmp_path / "data"
    target.mkdir()
    with pytest.raises(ArchiveError) as info:
        extract_archive(archive, target, progress=False)
    assert "\n" not in str(info.value) and archive.name in str(info.value)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_with_one_top_folder_extracts_to_that_root(tmp_path: Path, kind: str) -> None:
    members = [("broden1_224/index.csv", b"a"), ("broden1_224/images/x/1.png", b"bb")]
    archive = (
        _zip(tmp_path / "b.zip", members) if kind == "zip" else _tar(tmp_path / "b.tar.gz", members)
    )
    root = extract_archive(archive, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "broden1_224"
    assert (root / "index.csv").read_bytes() == b"a" and (
        root / "images/x/1.png"
    ).read_bytes() == b"bb"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["broden1_224"]  # no temporary left
    with pytest.raises(ArchiveError, match="already exists"):
        extract_archive(archive, tmp_path / "data", progress=False)


def test_archive_without_required_file_extracts_nothing(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "c.zip", [("other/readme.txt", b"hi")])
    with pytest.raises(ArchiveError, match="no index.csv in its top folder other/"):
        extract_archive(archive, tmp_path / "data", require="index.csv", progress=False)
    assert not (tmp_path / "data").exists()


def test_damaged_zip_is_one_clear_error(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "d.zip", [("ds/index.csv", b"x" * 1000)])
    raw = bytearray(archive.read_bytes())
    offset = raw.index(b"x" * 100)
    raw[offset : offset + 10] = b"y" * 10  # corrupt the stored bytes: CRC mismatch
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match="damaged or unreadable archive"):
        extract_archive(archive, tmp_path / "data", progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_truncated_tar_gz_is_one_clear_error(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "t.tar.gz", [("ds/index.csv", b"a"), ("ds/big.bin", payload())])
    archive.write_bytes(archive.read_bytes()[:-150_000])  # an interrupted copy
    with pytest.raises(ArchiveError, match="t.tar.gz"):
        extract_archive(archive, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


# --------------------------------------------------------------------------- fetch a dataset


@pytest.fixture(scope="module")
def broden_zip(tmp_path_factory) -> tuple[Path, Path]:
    """A 12-image synthetic Broden zipped like the real release (one top folder)."""
    base = tmp_path_factory.mktemp("zip")
    root = generate(base / "src", n_images=12, progress=False)
    archive = base / "broden_test.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, "broden_test/" + path.relative_to(root).as_posix())
    return root, archive


def _register(monkeypatch, name: str, md5_value: str | None) -> Release:
    entry = Release(name, "dataset", f"{name}.zip", ("http://127.0.0.1:9/unused",), md5_value,
                    "test")
    monkeypatch.setitem(RELEASES, name, entry)
    return entry


def test_fetch_dataset_downloads_extracts_validates_and_second_call_is_a_noop(
    server, broden_zip, tmp_path, monkeypatch
) -> None:
    source, archive = broden_zip
    base, served = server
    data = archive.read_bytes()
    served.files["/broden_test.zip"] = data
    _register(monkeypatch, "broden_test", md5(data))
    result = fetch_dataset(
        "broden_test",
        tmp_path / "data",
        urls=[closed_port_url("x.zip")],
        mirrors=[base + "/broden_test.zip"],
        progress=False,
        retry_wait=0,
    )
    assert (
        result.action == "extracted"
        and result.md5_verified
        and result.path == dataset_dir("broden_test", tmp_path / "data")
    )
    assert "matches the published checksum" in result.message and base in result.message
    assert sorted(p.name for p in result.path.iterdir()) == sorted(
        p.name for p in source.iterdir()
    )
    made = fetched_artifact(result.path, release("broden_test")).manifest()
    assert made["complete"] and made["info"]["md5_verified"] and base in made["info"]["source"]
    assert not (tmp_path / "data" / "broden_test.zip").exists()  # removed after unpacking
    check = check_dataset(result.path, progress=False)
    assert check.ok and check.census.images == 12

    again = fetch_dataset(
        "broden_test", tmp_path / "data", mirrors=[base + "/broden_test.zip"], progress=False
    )
    assert again.action == "present" and "already" in again.message and again.path == result.path
    assert len(served.requests) == 1


def test_fetch_dataset_from_a_local_archive_uses_no_network(
    broden_zip, tmp_path, monkeypatch
) -> None:
    _, archive = broden_zip
    _register(monkeypatch, "broden_test", None)
    result = fetch_dataset(
        "broden_test",
        tmp_path / "data",
        archive=archive,
        urls=[closed_port_url("x")],
        progress=False,
    )
    assert result.action == "extracted" and not result.md5_verified
    assert result.md5 == md5(archive.read_bytes()) and "no published checksum" in result.message
    assert archive.exists()  # the user's own file is never deleted
    assert check_dataset(result.path, progress=False).ok


def test_fetch_dataset_local_archive_with_wrong_checksum(broden_zip, tmp_path, monkeypatch) -> None:
    _, archive = broden_zip
    _register(monkeypatch, "broden_test", "c" * 32)
    with pytest.raises(ChecksumError, match=str(archive)):
        fetch_dataset("broden_test", tmp_path / "data", archive=archive, progress=False)
    assert not (tmp_path / "data" / "broden_test").exists()


def test_fetch_dataset_offline_names_urls_and_where_to_put_the_file(tmp_path, monkeypatch) -> None:
    entry = _register(monkeypatch, "broden_test", "d" * 32)
    dead = closed_port_url("broden_test.zip")
    with pytest.raises(DownloadError) as info:
        fetch_dataset("broden_test", tmp_path / "data", urls=[dead], progress=False, retry_wait=0)
    message = str(info.value)
    assert (
        dead in message
        and entry.md5 in message
        and str(tmp_path / "data" / "broden_test.zip") in message
    )
    assert not (tmp_path / "data" / "broden_test").exists()


def test_fetch_dataset_refuses_a_half_present_folder(tmp_path, monkeypatch) -> None:
    _register(monkeypatch, "broden_test", None)
    (tmp_path / "data" / "broden_test").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no index.csv"):
        fetch_dataset("broden_test", tmp_path / "data", progress=False)


def test_registry_names_and_official_urls() -> None:
    assert RELEASES["broden1_224"].md5 == "be13c292eaef3300da03f8d0e48eab1c"
    assert RELEASES["broden1_227"].md5 is None and RELEASES["broden1_384"].md5 is None
    for name in ("resnet18", "wideresnet18", "alexnet", "densenet161"):
        entry = RELEASES[f"{name}_places365"]
        assert entry.urls == (
            f"http://places2.csail.mit.edu/models_places365/{name}_places365.pth.tar",
        )
        assert entry.md5 is None and entry.kind == "weights"
    assert RELEASES["broden1_224"].url_list(mirrors=["http://m/x.zip"]) == [
        "http://netdissect.csail.mit.edu/data/broden1_224.zip",
        "http://m/x.zip",
    ]
    with pytest.raises(UserError, match="known: broden1_224, broden1_227, broden1_384"):
        fetch_dataset("broden2", "/nonexistent")


# --------------------------------------------------------------------------- Places365 weights


def places_checkpoint(model: nn.Module, path: Path, rename=lambda key: key) -> Path:
    """Save ``model`` the way the Places365 training script did (DataParallel, PyTorch 0.2)."""
    state = {
        "module." + rename(k): v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")  # PyTorch 0.2 had no such buffer
    }
    torch.save({"epoch": 90, "arch": "x", "state_dict": state, "best_prec1": 54.7}, path)
    return path


def _randomized(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, so a forward pass shows whether they loaded."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def test_places_resnet18_fetched_into_hub_cache_loads_and_runs(server, tmp_path) -> None:
    base, served = server
    torch.manual_seed(0)
    source = _randomized(torchvision.models.resnet18(num_classes=365))
    ckpt = places_checkpoint(source, tmp_path / "resnet18_places365.pth.tar")
    served.files["/resnet18_places365.pth.tar"] = ckpt.read_bytes()
    result = fetch_weights(
        "resnet18_places365",
        hub_dir=tmp_path / "hub",
        urls=[base + "/resnet18_places365.pth.tar"],
        progress=False,
    )
    assert result.path == tmp_path / "hub" / "checkpoints" / "resnet18_places365.pth.tar"
    assert (
        result.action == "downloaded"
        and not result.md5_verified
        and result.md5 == md5(ckpt.read_bytes())
    )
    again = fetch_weights(
        "resnet18_places365", hub_dir=tmp_path / "hub", urls=[closed_port_url("x")], progress=False
    )
    assert again.action == "present" and again.md5 == result.md5

    model = build_model(places365_spec("resnet18_places365", result.path))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_layers(model, ["layer4"]) as out:
        logits = model(x)
        expected = source(x)
    assert logits.shape == (2, 365) and out["layer4"].shape == (2, 512, 7, 7)
    torch.testing.assert_close(logits, expected)


def places365_spec(name: str, weights: Path):
    """The model spec of the ``model=<name>`` preset with weights from ``weights``."""
    from pipeline.identity import model_spec
    from pipeline.run import compose_config

    return model_spec(compose_config([f"model={name}", "stage=model"]).model, weights=str(weights))


def test_default_weights_location_is_torch_hub_checkpoints() -> None:
    expected = Path(torch.hub.get_dir()).absolute() / "checkpoints" / "alexnet_places365.pth.tar"
    assert weights_cache_path("alexnet_places365") == expected


def test_places_wideresnet18_has_no_stem_maxpool_and_a_14x14_layer4(tmp_path) -> None:
    torch.manual_seed(0)
    source = _randomized(torchvision.models.resnet18(num_classes=365))  # the checkpoint's key set
    ckpt = places_checkpoint(source, tmp_path / "wideresnet18_places365.pth.tar")
    model = build_model(places365_spec("wideresnet18_places365", ckpt))
    reference = source
    reference.maxpool = nn.Identity()  # the Places365 repo's definition: resnet18 minus max-pool
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record_layers(model, ["layer4"]) as out:
        logits = model(x)
        expected = reference(x)
    assert out["layer4"].shape == (1, 512, 14, 14) and logits.shape == (1, 365)
    torch.testing.assert_close(logits, expected)


def _old_densenet_name(key: str) -> str:
    for new, old in (
        ("norm1", "norm.1"),
        ("norm2", "norm.2"),
        ("conv1", "conv.1"),
        ("conv2", "conv.2"),
    ):
        if ".denselayer" in key and f".{new}." in key:
            return key.replace(f".{new}.", f".{old}.")
    return key


def test_places_densenet161_old_key_names_are_remapped(tmp_path) -> None:
    torch.manual_seed(0)
    source = _randomized(torchvision.models.densenet161(num_classes=365))
    ckpt = places_checkpoint(source, tmp_path / "densenet161_places365.pth.tar", _old_densenet_name)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in saved  # the old layout
    model = build_model(places365_spec("densenet161_places365", ckpt))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_checkpoint_with_module_inside_the_key_loads(tmp_path) -> None:
    """Places365 AlexNet wrapped only ``features`` in DataParallel: ``features.module.0.*``."""
    assert legacy_checkpoint_key("features.module.0.weight") == "features.0.weight"
    assert legacy_checkpoint_key("module.features.denseblock2.denselayer3.conv.2.weight") == (
        "features.denseblock2.denselayer3.conv2.weight"
    )

    def tiny() -> nn.Module:
        model = nn.Module()
        model.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        model.classifier = nn.Linear(4, 2)
        return model

    source, target = tiny(), tiny()
    state = {k.replace("features.", "features.module."): v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "alexnet-style.pt")
    load_checkpoint(target, tmp_path / "alexnet-style.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_checkpoint_of_another_architecture_is_still_refused(tmp_path) -> None:
    ckpt = places_checkpoint(torchvision.models.resnet18(num_classes=365), tmp_path / "r.pth.tar")
    with pytest.raises(UserError, match="does not fit the model"):
        build_model(places365_spec("densenet161_places365", ckpt))


# ---------------------------------------------------------------- through the pipeline
def _pipeline(workdir: Path, *overrides: str):
    from pipeline.run import compose_config, run

    return run(compose_config([f"workdir={workdir}", "cluster=none", "progress=false",
                               *overrides]))


def test_stage_fetch_then_the_release_is_the_dataset(server, broden_zip, tmp_path, monkeypatch,
                                                     capsys) -> None:
    """stage=fetch puts a release in <workdir>/datasets; then dataset.release points at it,
    stage=check prints its census, and dissection runs on it."""
    base, served = server
    _, archive = broden_zip
    served.files["/broden_test.zip"] = archive.read_bytes()
    _register(monkeypatch, "broden_test", md5(archive.read_bytes()))
    wd = tmp_path / "wd"
    with pytest.raises(UserError, match="not in .*stage=fetch dataset=broden_test"):
        _pipeline(wd, "stage=concepts", "dataset.release=broden_test")
    _pipeline(wd, "stage=fetch", "dataset.release=broden_test",
              f"fetch.mirrors=[{base}/broden_test.zip]", "fetch.attempts=1")
    root = wd / "datasets" / "broden_test"
    assert (root / "index.csv").is_file()
    made = fetched_artifact(root, release("broden_test")).manifest()
    assert made["complete"] and made["info"]["md5_verified"]
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    _pipeline(wd, "stage=fetch", "dataset.release=broden_test")  # current: nothing happens
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    capsys.readouterr()
    result = _pipeline(wd, "stage=check", "dataset.release=broden_test")
    assert result.ok and result.census.images == 12
    assert "12" in capsys.readouterr().out
    _pipeline(wd, "stage=iou", "dataset.release=broden_test", "model=custom",
              "model.factory=tests.tiny_models:tiny_cnn", "model.layers=[conv3]")
    from storage.tables import read_table

    assert set(read_table(wd / "results", "units")["dataset"]) == {"broden_test"}


def test_stage_check_on_a_damaged_copy_lists_problems_and_exits_2(tmp_path) -> None:
    import subprocess

    from tests.conftest import REPO, cli, cli_env

    root = generate(tmp_path / "data", n_images=6, progress=False)
    (root / "images" / "synthetic" / "000003_object.png").unlink()
    proc = subprocess.run(cli("stage=check", f"dataset.path={root}", f"workdir={tmp_path / 'w'}",
                              "progress=false"), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {root}: 1 problem(s) found, listed above"]
    assert "not found" in proc.stdout and "images" in proc.stdout


def test_places_preset_fetches_its_weights_and_extracts(server, tmp_path, monkeypatch) -> None:
    """model=resnet18_places365: the checkpoint is downloaded into the hub cache, converted to
    torchvision's resnet18 (365 classes) and dissected; its identity is its content."""
    base, served = server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    ckpt = places_checkpoint(torchvision.models.resnet18(num_classes=365), tmp_path / "r.pth.tar")
    served.files["/r.pth.tar"] = ckpt.read_bytes()
    data = generate(tmp_path / "data", n_images=4, progress=False)
    wd = tmp_path / "wd"
    args = ["model=resnet18_places365", f"fetch.mirrors=[{base}/r.pth.tar]", "fetch.attempts=1",
            "fetch.timeout=5"]
    monkeypatch.setitem(RELEASES, "resnet18_places365", Release(
        "resnet18_places365", "weights", "resnet18_places365.pth.tar",
        (closed_port_url("official"),), None, "test"))
    _pipeline(wd, "stage=fetch", *args)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "resnet18_places365.pth.tar"
    assert cached.read_bytes() == ckpt.read_bytes()
    acts = _pipeline(wd, "stage=extract", f"dataset.path={data}", *args)
    assert acts.store.shape("layer4") == (4, 512, 4, 4)  # 112 px synthetic images
    assert acts.model.identity.weights.startswith("resnet18_places365.pth.tar#")
    assert acts.model.identity.fingerprint["weights"] == "sha256:" + hashlib.sha256(
        ckpt.read_bytes()).hexdigest()
