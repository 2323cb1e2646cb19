"""Rendering one synthetic image: the scene layout per (index, seed) — which scene, bands and
objects where, with their colours, parts and textures — drawn at the image size, with its
label planes at the segmentation size.  Pure per (index, seed): any image can be rendered
again on its own."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages.scenes.drawing import compose
from stages.scenes.geometry import PALETTE, RGB, Region, SceneObject, SceneSpec
from stages.scenes.labels import COLOR_PROTOTYPES, MATERIAL, SCENE, TEXTURE

VAL_FRACTION = 0.2

def pick(rng: np.random.Generator, names: tuple[str, ...]) -> RGB:
    return PALETTE[names[int(rng.integers(len(names)))]]


def make_object(
    rng: np.random.Generator, kind: str, region: tuple[float, float], horizon: float
) -> SceneObject:
    top, bottom = region
    lo = top + 0.04
    hi = max(lo + 0.01, min(bottom, 0.98))
    by = float(rng.uniform(lo, hi))
    cx = float(rng.uniform(0.08, 0.92))
    depth = 0.65 + 0.5 * float(np.clip((by - horizon) / max(1e-3, 1.0 - horizon), 0.0, 1.0))
    flip = bool(rng.random() < 0.5)
    size_range = {
        "house": (0.36, 0.5),
        "tree": (0.3, 0.45),
        "car": (0.3, 0.42),
        "boat": (0.26, 0.4),
        "ball": (0.09, 0.15),
        "sign": (0.22, 0.3),
        "rock": (0.16, 0.3),
    }[kind]
    s = float(rng.uniform(*size_range)) * depth
    variant = 0
    extra: tuple[float, ...] = ()
    if kind == "house":
        colors = (
            pick(rng, ("cream", "white", "yellow", "pink", "lightblue", "orange")),
            pick(rng, ("red", "brown", "darkgrey")),
            PALETTE["brown"],
        )
        door = float(rng.choice([-0.25, 0.0, 0.25]))
        windows = [w for w in (-0.28, 0.0, 0.28) if rng.random() < 0.6] or [0.28]
        extra = (door, *windows)
    elif kind == "tree":
        variant = int(rng.random() < 0.2)  # 1 = conifer
        crown = pick(rng, ("green",)) if rng.random() < 0.85 else pick(rng, ("orange", "yellow"))
        colors = (PALETTE["brown"], crown)
    elif kind == "car":
        colors = (
            pick(rng, ("red", "blue", "yellow", "white", "black", "green", "orange", "purple")),
        )
    elif kind == "boat":
        variant = int(rng.random() < 0.3)  # 1 = motor boat
        colors = (
            pick(rng, ("white", "red", "brown", "blue")),
            pick(rng, ("white", "red", "yellow")),
        )
    elif kind == "ball":
        colors = (pick(rng, ("red", "yellow", "orange", "blue", "pink", "purple", "white")),)
    elif kind == "sign":
        variant = int(rng.integers(3))
        colors = (pick(rng, ("red", "blue", "yellow", "green", "white")),)
    else:  # rock
        colors = (pick(rng, ("grey", "brown", "darkgrey")),)
    return SceneObject(kind, cx, by, s, flip, colors, variant, extra)


def scene_plan(
    rng: np.random.Generator, scene: str
) -> tuple[list[str], list[float], list[tuple[str, str]]]:
    """Background bands (materials, nominal tops) and (object kind, band material) pairs."""
    u, p = rng.uniform, rng.random
    objs: list[tuple[str, str]] = []
    if scene == "beach":
        h = u(0.25, 0.38)
        mats, tops = ["sky", "water", "sand"], [0.0, h, h + u(0.15, 0.25)]
        objs += [("boat", "water")] * int(rng.choice([0, 1, 2], p=[0.15, 0.55, 0.3]))
        objs += [("ball", "sand")] * (p() < 0.5) + [("rock", "sand")] * (p() < 0.35)
        objs += [("sign", "sand")] * (p() < 0.1)
        primary = ("boat", "water")
    elif scene == "desert":
        mats, tops = ["sky", "sand"], [0.0, u(0.35, 0.5)]
        objs += [("rock", "sand")] * int(1 + rng.integers(3))
        objs += [("sign", "sand")] * (p() < 0.2) + [("ball", "sand")] * (p() < 0.1)
        primary = ("rock", "sand")
    elif scene == "forest":
        mats, tops = ["sky", "grass"], [0.0, u(0.06, 0.2)]
        objs += [("tree", "grass")] * int(2 + rng.integers(3))
        objs += [("rock", "grass")] * (p() < 0.2)
        primary = ("tree", "grass")
    elif scene == "harbor":
        h = u(0.18, 0.3)
        if p() < 0.65:
            mats, tops = ["sky", "water", "wood"], [0.0, h, u(0.72, 0.85)]
            objs += [("house", "wood")] * (p() < 0.35)
        else:
            mats, tops = ["sky", "water"], [0.0, h]
        objs += [("boat", "water")] * int(2 + rng.integers(2))
        primary = ("boat", "water")
    elif scene == "park":
        h = u(0.3, 0.42)
        if p() < 0.6:
            mats, tops = ["sky", "grass", "brick"], [0.0, h, u(0.78, 0.88)]
        else:
            mats, tops = ["sky", "grass"], [0.0, h]
        objs += [("ball", mats[-1])] * int(rng.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))
        objs += [("sign", "grass")] * (p() < 0.5) + [("tree", "grass")] * (p() < 0.4)
        primary = ("ball", "grass")
    elif scene == "snowfield":
        mats, tops = ["sky", "snow"], [0.0, u(0.25, 0.42)]
        objs += [("tree:conifer", "snow")] * int(rng.choice([0, 1, 2, 3], p=[0.1, 0.3, 0.3, 0.3]))
        objs += [("house", "snow")] * (p() < 0.3) + [("rock", "snow")] * (p() < 0.3)
        objs += [("ball", "snow")] * (p() < 0.1)
        primary = ("tree:conifer", "snow")
    elif scene == "street":
        ground = "asphalt" if p() < 0.7 else "brick"
        mats, tops = ["sky", ground], [0.0, u(0.3, 0.45)]
        objs += [("house", ground)] * int(1 + rng.integers(2))
        objs += [("car", ground)] * int(rng.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))
        objs += [("sign", ground)] * (p() < 0.3)
        primary = ("car", ground)
    else:
        raise ValueError(scene)
    if not objs:
        objs = [primary]
    if len(objs) > 4:
        keep = sorted(rng.choice(len(objs), size=4, replace=False).tolist())
        objs = [objs[i] for i in keep]
    return mats, [float(t) for t in tops], objs


def layout(index: int, seed: int) -> SceneSpec:
    """All random choices of one image, independent of resolution."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    split = "val" if rng.random() < VAL_FRACTION else "train"
    scene_name = list(SCENE)[int(rng.integers(len(SCENE)))]
    mats, tops, plan = scene_plan(rng, scene_name)
    regions = [
        Region(
            MATERIAL[m],
            t,
            float(rng.uniform(0.005, 0.02)) if t > 0 else 0.0,
            float(rng.uniform(0.5, 2.5)),
            float(rng.uniform(0, 2 * math.pi)),
        )
        for m, t in zip(mats, tops, strict=True)
    ]
    horizon = tops[1]
    objects: list[SceneObject] = []
    for kind, where in plan:
        i = mats.index(where)
        band = (tops[i], tops[i + 1] if i + 1 < len(tops) else 1.0)
        obj = make_object(rng, kind.split(":")[0], band, horizon)
        if kind == "tree:conifer":
            obj.variant = 1
        objects.append(obj)
    objects.sort(key=lambda o: o.by)  # farther (higher) objects first, nearer ones occlude
    plane = 0
    for obj in objects:
        if obj.kind in ("house", "tree", "car", "boat", "sign"):
            obj.plane = plane
            plane = 1 - plane
    jitter = {r.material: tuple(float(v) for v in rng.uniform(0.93, 1.07, size=3)) for r in regions}
    phases = tuple(float(v) for v in rng.uniform(0, 2 * math.pi, size=4))
    spec = SceneSpec(split, SCENE[scene_name], regions, objects, jitter, phases)

    # Textures: the first goes on the body of the most visible object (else the ground), a
    # second one (~20%) on the ground band. Visibility is measured on a fixed 64x64 grid so
    # the choice does not depend on the output resolution.
    tex = list(TEXTURE.values())
    first = tex[int(rng.integers(len(tex)))]
    second = 0
    if rng.random() < 0.22:
        rest = [t for t in tex if t != first]
        second = rest[int(rng.integers(len(rest)))]
    obj_period = float(rng.uniform(0.032, 0.045))
    ground_period = float(rng.uniform(0.045, 0.065))
    angles = [int(a) for a in rng.choice([0, 45, 90, 135], size=2)]
    skin_area = compose(spec, 64, None)["skin_area"]
    best = int(np.argmax(skin_area)) if len(skin_area) else -1
    if best >= 0 and skin_area[best] >= 0.015 * 64 * 64:
        obj = objects[best]
        obj.texture, obj.tex_period, obj.tex_angle = first, obj_period, angles[0]
        spec.textures = [first]
        if second:
            spec.ground_texture, spec.ground_angle = second, angles[1]
            spec.textures.append(second)
    else:
        spec.ground_texture, spec.ground_angle = first, angles[1]
        spec.textures = [first]
    spec.ground_period = ground_period
    return spec



def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 1], shape (..., 3)."""
    c = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


PROTO_LAB = srgb_to_lab(np.asarray(COLOR_PROTOTYPES, dtype=np.float64) / 255.0)


def color_plane(rgb: np.ndarray, seg: int) -> np.ndarray:
    """Colour-name label of each seg cell from the mean RGB of the image pixels it covers."""
    size = rgb.shape[0]
    if size % seg == 0:
        k = size // seg
        mean = rgb.astype(np.float64).reshape(seg, k, seg, k, 3).mean(axis=(1, 3))
    else:
        small = Image.fromarray(rgb).resize((seg, seg), Image.Resampling.BOX)
        mean = np.asarray(small, dtype=np.float64)
    lab = srgb_to_lab(mean / 255.0)
    d = ((lab[:, :, None, :] - PROTO_LAB[None, None, :, :]) ** 2).sum(axis=-1)
    return (np.argmin(d, axis=-1) + 1).astype(np.int32)


# --------------------------------------------------------------------------- public render


@dataclass(frozen=True)
class RenderedImage:
    """One synthetic image with its labels, exactly as generate() writes it."""

    rgb: np.ndarray  # (image_size, image_size, 3) uint8
    planes: dict[str, list[np.ndarray]]  # pixel category -> (seg, seg) int32 planes
    image_labels: dict[str, list[int]]  # scene (one) and texture (one or two)
    split: str  # "train" or "val"


def check_sizes(n_images: int | None, image_size: int, seg_size: int, seed: int) -> None:
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 1 <= seg_size <= image_size:
        raise ValueError(f"seg_size must be in 1..image_size ({image_size}), got {seg_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def render(index: int, seed: int = 0, image_size: int = 112, seg_size: int = 56) -> RenderedImage:
    """Render image ``index`` from scratch.

    Why pure: it depends only on (index, seed, sizes), never on other images, so workers can
    render in any order and tests can re-render any image to check the written files.
    """
    check_sizes(None, image_size, seg_size, seed)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    spec = layout(index, seed)
    big = compose(spec, image_size, np.random.default_rng([seed, index, 0xC0105]))
    small = compose(spec, seg_size, None)
    rgb = big["rgb"]
    planes = {
        "color": [color_plane(rgb, seg_size)],
        "object": [small["object"]] if small["object"].any() else [],
        "part": [p for p in small["parts"] if p.any()],
        "material": [small["material"]] if small["material"].any() else [],
    }
    labels = {"scene": [spec.scene], "texture": list(spec.textures)}
    return RenderedImage(rgb, planes, labels, spec.split)

