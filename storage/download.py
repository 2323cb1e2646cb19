"""Download one file from a list of URLs: resumable, verified, published atomically.

Why this shape: Broden is about a gigabyte served over plain HTTP from one university host,
so a download must survive a dropped connection (HTTP Range resumes ``<dest>.part``), must
never leave a half file where a complete one is expected (the final name appears only by
rename, after verification), and must fail with one line that says what was tried and how
to get the file by hand.

``<dest>.part.json`` records where the bytes of ``<dest>.part`` came from, so that, when no
checksum is known, a partial file is only resumed from the URL (and file size) it started
with; with a known MD5 any source may continue it, because verification catches a mix.
Concurrent downloads of one ``dest`` wait for each other (``<dest>.lock``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from storage.errors import UserError

USER_AGENT = "netdissect-pipeline (python urllib)"
CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class DownloadError(UserError):
    """No URL delivered the file (offline, host down, HTTP error, repeated resets)."""


class ChecksumError(UserError):
    """A file's MD5 differs from the published one."""


@dataclass(frozen=True)
class DownloadResult:
    """Where the file is, its MD5, and whether that MD5 was checked against a known one."""

    path: Path
    md5: str
    verified: bool  # False: no checksum was known; ``md5`` was computed and should be recorded
    url: str | None  # None when the file was already complete at ``path``


class _Transient(Exception):
    """Worth retrying the same URL (timeout, reset, 5xx, short body)."""


class _Permanent(Exception):
    """Retrying this URL cannot help (404, 403, malformed URL)."""


class _Restart(Exception):
    """The partial file cannot be continued from this response: start again from byte 0."""


def file_md5(path: Path, chunk: int = CHUNK_BYTES) -> str:
    """MD5 of a file, read in chunks (the checksum Broden's publishers quote)."""
    digest = hashlib.md5()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    urls: Sequence[str],
    dest: str | Path,
    *,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    attempts: int = 3,
    retry_wait: float = 2.0,
    manual_hint: str = "",
) -> DownloadResult:
    """Fetch ``dest`` from the first URL that works, resuming ``<dest>.part`` if present.

    ``attempts`` counts failures per URL that made no progress; an attempt that got further
    than any before it is free, so a flaky connection still finishes. A complete ``dest``
    is not downloaded again (it is verified when ``md5`` is given). ``manual_hint`` is
    appended to the one-line error, e.g. another way to hand the file over.
    """
    dest = Path(dest)
    if not urls:
        raise DownloadError(f"{dest.name}: no URL to download from; put the file at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = md5.lower() if md5 else None
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():
            return _existing(dest, expected)
        return _Download(dest, expected, progress, timeout, attempts, retry_wait).run(
            list(urls), manual_hint
        )


def _existing(dest: Path, expected: str | None) -> DownloadResult:
    actual = file_md5(dest)
    if expected and actual != expected:
        raise ChecksumError(
            f"{dest}: MD5 {actual} differs from the published {expected}; the file is damaged "
            "or another version: delete it to download it again"
        )
    return DownloadResult(dest, actual, expected is not None, None)


class _Download:
    """State of one download: the partial file, its running MD5 and its recorded source."""

    def __init__(
        self,
        dest: Path,
        expected: str | None,
        progress: bool,
        timeout: float,
        attempts: int,
        retry_wait: float,
    ) -> None:
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.source_file = dest.with_name(dest.name + ".part.json")
        self.expected = expected
        self.progress = progress
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.retry_wait = retry_wait
        self.digest = hashlib.md5()
        self.size = 0
        if self.part.is_file():  # left by an interrupted run: hash what is there once
            with self.part.open("rb") as fh:
                for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                    self.digest.update(block)
                    self.size += len(block)

    # ------------------------------------------------------------------ driver
    def run(self, urls: list[str], manual_hint: str) -> DownloadResult:
        failures: list[str] = []
        for url in urls:
            reason = self._try_url(url)
            if reason is None:
                return self._publish(url)
            failures.append(f"{url} ({reason})")
        checksum = f"expected MD5 {self.expected}" if self.expected else "no published MD5 to check"
        kept = f"; {self.size} bytes kept in {self.part} to resume" if self.size else ""
        hint = f", {manual_hint}" if manual_hint else ""
        raise DownloadError(
            f"cannot download {self.dest.name}: tried {'; '.join(failures)}; {checksum}; "
            f"download it yourself and put it at {self.dest}{hint}{kept}"
        )

    def _try_url(self, url: str) -> str | None:
        """None when the file is complete, else why this URL failed."""
        if self.size and not self._may_resume_from(url):
            self._reset()
        failures, furthest, reason, restarted = 0, self.size, "", False
        while failures < self.attempts:
            try:
                self._attempt(url)
                return None
            except _Permanent as exc:
                return str(exc)
            except _Restart:
                self._reset()
                reason = "the server could not continue the partial file"
                if not restarted:  # one fresh start is expected after a stale part
                    restarted = True
                    continue
            except _Transient as exc:
                reason = str(exc)
            if self.size > furthest:
                furthest = self.size
            else:
                failures += 1
                if failures < self.attempts and self.retry_wait > 0:
                    time.sleep(self.retry_wait * failures)
        return f"{reason}, {self.attempts} attempt(s)"

    # ------------------------------------------------------------------ one request
    def _attempt(self, url: str) -> None:
        headers = {"User-Agent": USER_AGENT}
        if self.size:
            headers["Range"] = f"bytes={self.size}-"
        try:
            request = urllib.request.Request(url, headers=headers)
        except ValueError as exc:
            raise _Permanent(f"not a URL: {exc}") from None
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            self._http_error(exc)
            return
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc, self.timeout)) from None
        with response:
            total = self._start(url, response)
            self._stream(response, total)

    def _http_error(self, exc: urllib.error.HTTPError) -> None:
        """Returns when a 416 says the partial file is already complete; raises otherwise."""
        exc.close()
        if exc.code == 416 and self.size:  # nothing after our offset: complete, or stale
            match = _CONTENT_RANGE.match(exc.headers.get("Content-Range", "") or "")
            if match and match.group(3) != "*" and int(match.group(3)) == self.size:
                return
            raise _Restart
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(reason)
        raise _Permanent(reason)

    def _start(self, url: str, response) -> int | None:
        """Check the response against the partial file; returns the full size if announced."""
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "") or "")
            if not match or match.group(1) is None or int(match.group(1)) != self.size:
                raise _Restart
            total = None if match.group(3) == "*" else int(match.group(3))
        else:  # 200: the whole file, whatever we asked for (the server ignores Range)
            if self.size:
                self._reset()
            total = length
        self._record_source(url, total)
        return total

    def _stream(self, response, total: int | None) -> None:
        bar = tqdm(
            total=total,
            initial=self.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.dest.name,
            disable=None if self.progress else True,
        )
        read = getattr(response, "read1", response.read)  # read1: keep what arrived before a stall
        with bar, self.part.open("ab") as fh:
            while True:
                try:
                    block = read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(_describe(exc, self.timeout)) from None
                if not block:
                    break
                try:
                    fh.write(block)
                except OSError as exc:
                    raise DownloadError(f"{self.part}: cannot write ({exc.strerror})") from None
                self.digest.update(block)
                self.size += len(block)
                bar.update(len(block))
                if total is not None and self.size > total:
                    raise _Restart  # more bytes than announced: nothing here can be trusted
            fh.flush()
            os.fsync(fh.fileno())
        if total is not None and self.size != total:
            raise _Transient(f"connection closed after {self.size} of {total} bytes")

    # ------------------------------------------------------------------ partial file
    def _may_resume_from(self, url: str) -> bool:
        if self.expected:
            return True
        try:
            return json.loads(self.source_file.read_text()).get("url") == url
        except (OSError, ValueError):
            return False

    def _record_source(self, url: str, total: int | None) -> None:
        if self.expected:
            return
        if self.size:
            try:
                previous = json.loads(self.source_file.read_text())
            except (OSError, ValueError):
                previous = {}
            if previous.get("total") not in (None, total):
                raise _Restart  # the file at this URL changed size since the part began
        self.source_file.write_text(json.dumps({"url": url, "total": total}))

    def _reset(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.md5()
        self.size = 0

    def _publish(self, url: str) -> DownloadResult:
        actual = self.digest.hexdigest()
        if self.expected and actual != self.expected:
            self._discard()
            raise ChecksumError(
                f"{self.dest.name} from {url}: MD5 {actual} differs from the published "
                f"{self.expected}; the partial download was removed, so a retry starts afresh"
            )
        os.replace(self.part, self.dest)
        self.source_file.unlink(missing_ok=True)
        return DownloadResult(self.dest, actual, self.expected is not None, url)

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.source_file.unlink(missing_ok=True)


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for an error line: 'timed out after 60 s', 'connection refused'."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed mid-transfer"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
