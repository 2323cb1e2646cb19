"""Shapes, patterns and the scene description of the synthetic dataset (what
:mod:`stages.scenes.drawing` draws and :mod:`stages.scenes.render` lays out)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from stages.scenes.labels import TEXTURE

MAX_PART_PLANES = 2
# --------------------------------------------------------------------------- geometry

Grid = tuple[np.ndarray, np.ndarray]  # (yy (N,1), xx (1,N)) pixel centres in [0, 1)


def grid(n: int) -> Grid:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[:, None], c[None, :]


def rect(g: Grid, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    yy, xx = g
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def ellipse(g: Grid, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = g
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def polygon(g: Grid, pts: list[tuple[float, float]]) -> np.ndarray:
    """Convex polygon given as (y, x) vertices in either winding order."""
    yy, xx = g
    pos = np.ones((yy.shape[0], xx.shape[1]), dtype=bool)
    neg = pos.copy()
    for (y0, x0), (y1, x1) in zip(pts, pts[1:] + pts[:1], strict=True):
        c = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        pos &= c >= 0
        neg &= c <= 0
    return pos | neg


def frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def pattern(texture: int, yy: np.ndarray, xx: np.ndarray, period: float, angle: int) -> np.ndarray:
    """Boolean pattern of a texture label; the True cells get the alternate colour."""
    u, v = xx / period, yy / period
    if texture == TEXTURE["striped"]:
        a = math.radians(angle)
        return frac(u * math.cos(a) + v * math.sin(a)) < 0.5
    if texture == TEXTURE["dotted"]:
        return (frac(u) - 0.5) ** 2 + (frac(v) - 0.5) ** 2 < 0.34**2
    if texture == TEXTURE["chequered"]:
        return ((np.floor(u) + np.floor(v)) % 2) == 0
    if texture == TEXTURE["zigzagged"]:
        return frac(v + np.abs(frac(u) - 0.5) * 1.6) < 0.5
    if texture == TEXTURE["grid"]:
        return (frac(u) < 0.28) | (frac(v) < 0.28)
    raise ValueError(f"unknown texture {texture}")


# --------------------------------------------------------------------------- scene layout

RGB = tuple[float, float, float]
WHITE: RGB = (0.93, 0.93, 0.9)
GLASS_RGB: RGB = (0.55, 0.76, 0.92)
PALETTE: dict[str, RGB] = {
    "red": (0.8, 0.12, 0.1),
    "blue": (0.12, 0.3, 0.8),
    "yellow": (0.93, 0.83, 0.2),
    "white": (0.93, 0.93, 0.9),
    "black": (0.08, 0.08, 0.09),
    "green": (0.15, 0.55, 0.2),
    "orange": (0.95, 0.52, 0.1),
    "purple": (0.5, 0.2, 0.6),
    "pink": (0.95, 0.62, 0.75),
    "brown": (0.45, 0.28, 0.13),
    "grey": (0.5, 0.5, 0.5),
    "cream": (0.95, 0.88, 0.7),
    "lightblue": (0.6, 0.75, 0.9),
    "darkgrey": (0.28, 0.28, 0.3),
}


@dataclass
class Region:
    material: int
    top: float  # nominal top edge (0 for the first band)
    amp: float  # waviness of the top edge
    freq: float
    phase: float


@dataclass
class SceneObject:
    kind: str
    cx: float
    by: float  # base (ground contact) y
    s: float  # scale
    flip: bool
    colors: tuple[RGB, ...]
    variant: int = 0
    extra: tuple[float, ...] = ()
    plane: int = 0  # part plane of this object's parts (nested parts use the other)
    texture: int = 0  # texture label drawn on the body, 0 = plain
    tex_period: float = 0.04
    tex_angle: int = 0


@dataclass
class Layer:
    mask: np.ndarray
    color: RGB
    part: int = 0
    nested: bool = False  # part lies on top of another part: goes on the other plane
    material: int = 0
    skin: bool = False  # the body surface that carries the object's texture
    noise: float = 0.03


@dataclass
class SceneSpec:
    split: str
    scene: int
    regions: list[Region]
    objects: list[SceneObject]
    jitter: dict[int, tuple[float, float, float]]
    phases: tuple[float, ...]
    textures: list[int] = field(default_factory=list)
    ground_texture: int = 0
    ground_period: float = 0.05
    ground_angle: int = 0

