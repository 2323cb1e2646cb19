"""The files under a Broden dataset's ``images/``: label planes as PNGs (label = R + 256·G)
read and written, RGB images read, and every path kept inside ``images/``."""

from __future__ import annotations

import os
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from storage.errors import BrodenFormatError, MissingFileError, SizeMismatchError, UnsafePathError


def _is_plain(text: str) -> bool:
    """A relative POSIX path ``PurePosixPath`` leaves as it is and that stays inside."""
    return bool(text) and not (
        "\\" in text or ":" in text or "//" in text or text[0] == "/" or text[-1] == "/"
    ) and all(part not in (".", "..") for part in text.split("/"))


def safe_relative_path(path: Path, line: int, column: str, text: str) -> str:
    """Reject paths that would escape ``images/`` (absolute or containing ``..``)."""
    if _is_plain(text):  # already normal: what the slow path returns (a 63k index has 300k)
        return text
    posix = PurePosixPath(text.replace("\\", "/"))
    if not posix.parts:
        raise BrodenFormatError(f"{path} line {line}, column {column!r}: {text!r} is not a file path")
    if text.startswith(("/", "\\")) or posix.is_absolute() or ":" in posix.parts[0] or ".." in posix.parts:
        raise UnsafePathError(
            f"{path} line {line}, column {column!r}: path {text!r} escapes the dataset's images/ folder"
        )
    return str(posix)


class ImagesFolder:
    """A dataset's ``images/``: files inside it, each folder's real path resolved once (a
    block of label planes shares a few folders; resolving every file walks every link).
    Paths are handled as strings: pathlib's parsing was a fifth of a concept store build."""

    def __init__(self, images_dir: Path):
        self.root = str(images_dir)
        self.real_root = os.path.realpath(images_dir)
        self._inside = self.real_root.rstrip(os.sep) + os.sep
        self._real_dirs: dict[str, str] = {}

    def file(self, rel: str, line: int | None = None) -> Path:
        """``images/rel``, refused when a symbolic link takes it outside ``images/`` (the
        relative path itself was already checked for ``..`` and absolute parts)."""
        return Path(self.checked(rel, line))

    def checked(self, rel: str, line: int | None = None) -> str:
        """:meth:`file` as a string (a store build opens thousands: no pathlib)."""
        path = os.path.join(self.root, rel)
        parent, name = os.path.split(path)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_parent,
                                                                               name)
        if real != self.real_root and not real.startswith(self._inside):
            where = f" (index.csv line {line})" if line is not None else ""
            raise UnsafePathError(f"{path}: a link to {real}, outside the dataset's images/ "
                                  f"folder{where}; copy the file into the dataset instead")
        return path


def dataset_file(images_dir: Path, rel: str, line: int | None = None) -> Path:
    """One file of ``images/`` (see :class:`ImagesFolder` for many)."""
    return ImagesFolder(images_dir).file(rel, line)


def _pillow_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _chunks_before_pixels_intact(data: bytes) -> bool:
    """Do the chunks before the first IDAT pass their CRCs?  Pillow refuses a file where one
    does not; libpng only warns about an ancillary one (a damaged tEXt, say)."""
    view, pos = memoryview(data), 8
    while pos + 8 <= len(data):
        length = int.from_bytes(view[pos:pos + 4], "big")
        if view[pos + 4:pos + 8] == b"IDAT":
            return True
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(view[pos + 4:end]) != int.from_bytes(
                view[end:end + 4], "big"):
            return False
        pos = end + 4
    return False


def _rgb_planes(path: str | Path) -> np.ndarray:
    """The file's 8-bit RGB pixels: libpng through imagecodecs (about 2x Pillow on Broden's
    planes, GIL released), Pillow for everything else it reads (palette with transparency,
    grey, 16-bit, other formats) and for the error a damaged file gets."""
    import imagecodecs

    with open(path, "rb") as file:
        data = file.read()
    if not _chunks_before_pixels_intact(data):
        return _pillow_rgb(path)
    try:
        rgb = imagecodecs.png_decode(data)
    except (RuntimeError, ValueError):  # not a PNG libpng reads: Pillow's reading or error
        return _pillow_rgb(path)
    if rgb.dtype != np.uint8 or rgb.shape[2:] != (3,):  # grey, alpha, 16-bit
        return _pillow_rgb(path)
    return rgb


def plane_rgb(path: str | Path, shape: tuple[int, int], line: int | None = None) -> np.ndarray:
    """A label PNG's 8-bit RGB pixels, its size checked."""
    where = f" (index.csv line {line})" if line is not None else ""
    try:
        rgb = _rgb_planes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise MissingFileError(f"{path}: label image not found{where}") from None
    except (OSError, ValueError) as exc:
        raise BrodenFormatError(f"{path}: not a readable image{where} ({exc})") from None
    if rgb.shape[:2] != tuple(shape):
        raise SizeMismatchError(
            f"{path}: size {rgb.shape[1]}x{rgb.shape[0]} (w x h) differs from index.csv "
            f"sw x sh = {shape[1]}x{shape[0]}{where}"
        )
    return rgb


def decode_plane(path: str | Path, shape: tuple[int, int], line: int | None = None) -> np.ndarray:
    """Decode a label PNG to int32 label numbers (R + 256·G) and check its size."""
    rgb = plane_rgb(path, shape, line)
    return np.left_shift(rgb[..., 1], 8, dtype=np.int32) | rgb[..., 0]


def load_image(path: Path, line: int | None = None) -> np.ndarray:
    """Decode an RGB image to uint8 (H, W, 3)."""
    where = f" (index.csv line {line})" if line is not None else ""
    if not path.is_file():
        raise MissingFileError(f"{path}: image not found{where}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise BrodenFormatError(f"{path}: not a readable image{where} ({exc})") from None


def encode_plane(labels: np.ndarray) -> np.ndarray:
    """(H, W) label numbers -> (H, W, 3) uint8 with R + 256·G = number, B = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"a label plane must be 2-D, got shape {labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("label numbers must lie in 0..65535")
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[..., 0] = labels & 0xFF
    out[..., 1] = (labels >> 8) & 0xFF
    return out


def save_plane(path: Path, labels: np.ndarray, compress_level: int = 6) -> Path:
    """Write a label plane PNG (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_plane(labels)).save(path, format="PNG", compress_level=compress_level)
    return path
