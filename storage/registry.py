"""Known downloads: the Broden releases and the CSAIL Places365 PyTorch weights.

Why a table: one place says which file a name means, where it is served and which checksum
it must have. A checksum is listed only where a publisher reported one; ``md5=None`` means
"unknown here": the downloader then computes it and the fetch stage prints it, so it can be
checked against another copy and recorded in this table (with its source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from storage.errors import UserError

BRODEN_BASE = "http://netdissect.csail.mit.edu/data"
PLACES365_BASE = "http://places2.csail.mit.edu/models_places365"


@dataclass(frozen=True)
class Release:
    """One downloadable file: a dataset archive or a weights checkpoint."""

    name: str
    kind: str  # "dataset" | "weights"
    filename: str
    urls: tuple[str, ...]  # official first
    md5: str | None  # None: not known here (computed and reported on download)
    md5_source: str  # where the checksum comes from, or why there is none
    note: str = ""

    def url_list(self, urls: Sequence[str] | None = None, mirrors: Sequence[str] = ()) -> list[str]:
        """The URLs to try: ``urls`` replaces the official list; ``mirrors`` come after it."""
        base = list(urls) if urls else list(self.urls)
        return base + [m for m in mirrors if m not in base]


def _broden(name: str, size: int, md5: str | None, md5_source: str) -> Release:
    return Release(
        name,
        "dataset",
        f"{name}.zip",
        (f"{BRODEN_BASE}/{name}.zip",),
        md5,
        md5_source,
        f"Broden with {size}x{size} images (one top-level folder {name}/ in the zip)",
    )


def _places365(arch: str, note: str) -> Release:
    name = f"{arch}_places365"
    return Release(
        name,
        "weights",
        f"{name}.pth.tar",
        (f"{PLACES365_BASE}/{name}.pth.tar",),
        None,
        "not published by CSAIL; computed on first download",
        note,
    )


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        _broden(
            "broden1_224",
            224,
            "be13c292eaef3300da03f8d0e48eab1c",
            "reported for broden1_224.zip (not re-verified by this project)",
        ),
        _broden("broden1_227", 227, None, "unknown; computed on first download"),
        _broden("broden1_384", 384, None, "unknown; computed on first download"),
        _places365("resnet18", "torchvision resnet18, 365 classes"),
        _places365(
            "wideresnet18",
            "the Places365 repo's resnet18 without the stem max-pool (layer4 is 14x14 at 224 px)",
        ),
        _places365("alexnet", "torchvision alexnet, 365 classes; 227 px input (broden1_227)"),
        _places365("densenet161", "torchvision densenet161, 365 classes; pre-0.4 key names"),
    )
}


def release(name: str, kind: str | None = None) -> Release:
    """The registry entry ``name``; an unknown name lists the known ones."""
    entry = RELEASES.get(name)
    if entry is None or (kind is not None and entry.kind != kind):
        known = sorted(n for n, r in RELEASES.items() if kind is None or r.kind == kind)
        what = f"{kind} " if kind else ""
        raise UserError(f"unknown {what}name {name!r}; known: {', '.join(known)}")
    return entry
