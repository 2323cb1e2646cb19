"""The files under a Broden dataset's ``images/``: label planes as PNGs (label = R + 256·G)
read and written, RGB images read, and every path kept inside ``images/``."""

from __future__ import annotations

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
    block of label planes shares a few folders; resolving every file walks every link)."""

    def __init__(self, images_dir: Path):
        self.root = Path(images_dir)
        self.real_root = self.root.resolve()
        self._real_dirs: dict[Path, Path] = {}

    def file(self, rel: str, line: int | None = None) -> Path:
        """``images/rel``, refused when a symbolic link takes it outside ``images/`` (the
        relative path itself was already checked for ``..`` and absolute parts)."""
        path = self.root / rel
        parent = path.parent
        if parent not in self._real_dirs:
            self._real_dirs[parent] = parent.resolve()
        real = path.resolve() if path.is_symlink() else self._real_dirs[parent] / path.name
        if not real.is_relative_to(self.real_root):
            where = f" (index.csv line {line})" if line is not None else ""
            raise UnsafePathError(f"{path}: a link to {real}, outside the dataset's images/ "
                                  f"folder{where}; copy the file into the dataset instead")
        return path


def dataset_file(images_dir: Path, rel: str, line: int | None = None) -> Path:
    """One file of ``images/`` (see :class:`ImagesFolder` for many)."""
    return ImagesFolder(images_dir).file(rel, line)


def decode_plane(path: Path, shape: tuple[int, int], line: int | None = None) -> np.ndarray:
    """Decode a label PNG to int32 label numbers (R + 256·G) and check its size."""
    where = f" (index.csv line {line})" if line is not None else ""
    try:
        with Image.open(path) as img:  # Pillow decodes with the GIL released: threads scale
            img.load()
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (FileNotFoundError, IsADirectoryError):
        raise MissingFileError(f"{path}: label image not found{where}") from None
    except (OSError, ValueError) as exc:
        raise BrodenFormatError(f"{path}: not a readable image{where} ({exc})") from None
    if rgb.shape[:2] != tuple(shape):
        raise SizeMismatchError(
            f"{path}: size {rgb.shape[1]}x{rgb.shape[0]} (w x h) differs from index.csv "
            f"sw x sh = {shape[1]}x{shape[0]}{where}"
        )
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
