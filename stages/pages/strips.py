"""The images of a unit's strip: each top image scaled, dimmed outside the unit's mask and
the mask outlined (the report's strips and the rating page's)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stages.network.perturb import Perturbation
from storage.broden_images import dataset_file
from storage.errors import UserError

OUTLINE = np.array([255, 214, 0], dtype=np.uint8)  # mask outline (amber)
DIM = 0.28  # brightness kept outside the mask


def render_tile(image: np.ndarray, mask: np.ndarray, thumb: int) -> np.ndarray:
    """The image scaled to fit ``thumb`` px, dimmed outside the mask, the mask outlined."""
    h, w = image.shape[:2]
    scale = thumb / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    m = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    ) >= 128
    out = np.where(m[..., None], small, (small * DIM).astype(np.uint8))
    padded = np.pad(m, 1, mode="edge")
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = m & ~interior
    out[edge] = OUTLINE
    return out


def strip_image(tiles: list[np.ndarray], gap: int = 3) -> Image.Image:
    """The tiles side by side, ``gap`` white pixels apart."""
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        canvas[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    return Image.fromarray(canvas)


class ImageCache:
    """Decoded RGB images by row (perturbed as the model saw them), least recently used
    dropped past ``size`` entries."""

    def __init__(self, images_dir: Path, paths: Sequence[str], size: int = 256,
                 perturbation: Perturbation | None = None):
        self.images_dir, self.paths, self.size = images_dir, paths, size
        self.perturbation = perturbation
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, row: int) -> np.ndarray:
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        path = dataset_file(self.images_dir, self.paths[row])
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read image for the report ({exc})") from None
        if self.perturbation is not None and self.perturbation.kind != "none":
            array = self.perturbation.images(array[None], np.array([row]))[0].astype(np.uint8)
        self.cache[row] = array
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return array
