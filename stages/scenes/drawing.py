"""Drawing the synthetic dataset: each object's layers (shape, colour, parts), the
background materials and textures, composed into an RGB image and label planes."""

from __future__ import annotations

import numpy as np

from stages.scenes.geometry import (
    GLASS_RGB,
    MAX_PART_PLANES,
    PALETTE,
    RGB,
    WHITE,
    Grid,
    Layer,
    SceneObject,
    SceneSpec,
    ellipse,
    frac,
    grid,
    pattern,
    polygon,
    rect,
)
from stages.scenes.labels import MATERIAL, OBJECT, PART

# --------------------------------------------------------------------------- drawing


def object_layers(g: Grid, o: SceneObject) -> list[Layer]:
    """The object's shapes, back to front, in image coordinates."""
    yy, xx = g
    if o.flip:  # mirror around the object's centre line
        g = (yy, 2 * o.cx - xx)
    s, cx, by = o.s, o.cx, o.by
    L: list[Layer] = []
    if o.kind == "house":
        wall, roof, door_c = o.colors
        top = by - 0.7 * s
        L.append(Layer(rect(g, top, by, cx - 0.5 * s, cx + 0.5 * s), wall, skin=True))
        roof_pts = [
            (top - 0.45 * s, cx),
            (top + 0.01 * s, cx + 0.62 * s),
            (top + 0.01 * s, cx - 0.62 * s),
        ]
        L.append(Layer(polygon(g, roof_pts), roof, part=PART["roof"], noise=0.06))
        dx = o.extra[0] * s
        door = rect(g, by - 0.34 * s, by, cx + dx - 0.1 * s, cx + dx + 0.1 * s)
        L.append(Layer(door, door_c, part=PART["door"]))
        for wx in o.extra[1:]:
            x0 = cx + wx * s
            frame = rect(g, top + 0.1 * s, top + 0.34 * s, x0 - 0.12 * s, x0 + 0.12 * s)
            pane = rect(g, top + 0.15 * s, top + 0.29 * s, x0 - 0.07 * s, x0 + 0.07 * s)
            L.append(Layer(frame, WHITE, part=PART["window"], noise=0.01))
            L.append(
                Layer(
                    pane,
                    GLASS_RGB,
                    part=PART["glass"],
                    nested=True,
                    material=MATERIAL["glass"],
                    noise=0.02,
                )
            )
    elif o.kind == "tree":
        trunk_c, crown_c = o.colors
        trunk = rect(g, by - 0.55 * s, by, cx - 0.07 * s, cx + 0.07 * s)
        L.append(Layer(trunk, trunk_c, part=PART["trunk"], noise=0.06))
        if o.variant == 0:
            crown = ellipse(g, by - 0.8 * s, cx, 0.38 * s, 0.32 * s)
        else:
            crown = polygon(
                g,
                [
                    (by - 1.3 * s, cx),
                    (by - 0.35 * s, cx + 0.36 * s),
                    (by - 0.35 * s, cx - 0.36 * s),
                ],
            )
        L.append(Layer(crown, crown_c, part=PART["crown"], skin=True, noise=0.15))
    elif o.kind == "car":
        (body_c,) = o.colors
        body = rect(g, by - 0.3 * s, by - 0.08 * s, cx - 0.5 * s, cx + 0.5 * s)
        cabin = polygon(
            g,
            [
                (by - 0.3 * s, cx - 0.34 * s),
                (by - 0.52 * s, cx - 0.2 * s),
                (by - 0.52 * s, cx + 0.12 * s),
                (by - 0.3 * s, cx + 0.3 * s),
            ],
        )
        L.append(Layer(body | cabin, body_c, skin=True))
        for x0, x1 in ((-0.19, -0.04), (-0.01, 0.13)):
            win = rect(g, by - 0.47 * s, by - 0.33 * s, cx + x0 * s, cx + x1 * s)
            L.append(
                Layer(win, GLASS_RGB, part=PART["window"], material=MATERIAL["glass"], noise=0.02)
            )
        for wx in (-0.3, 0.3):
            wheel = ellipse(g, by - 0.1 * s, cx + wx * s, 0.1 * s, 0.1 * s)
            L.append(Layer(wheel, PALETTE["black"], part=PART["wheel"], noise=0.02))
    elif o.kind == "boat":
        hull_c, sail_c = o.colors
        hull = polygon(
            g,
            [
                (by - 0.16 * s, cx - 0.5 * s),
                (by - 0.16 * s, cx + 0.5 * s),
                (by + 0.04 * s, cx + 0.36 * s),
                (by + 0.04 * s, cx - 0.34 * s),
            ],
        )
        L.append(Layer(hull, hull_c, part=PART["hull"], skin=True))
        if o.variant == 0:
            mast = rect(g, by - 0.9 * s, by - 0.16 * s, cx - 0.02 * s, cx + 0.02 * s)
            L.append(Layer(mast, PALETTE["brown"]))
            sail = polygon(
                g,
                [
                    (by - 0.86 * s, cx + 0.03 * s),
                    (by - 0.22 * s, cx + 0.03 * s),
                    (by - 0.22 * s, cx + 0.42 * s),
                ],
            )
            L.append(Layer(sail, sail_c, part=PART["sail"], noise=0.02))
        else:
            cabin = rect(g, by - 0.38 * s, by - 0.16 * s, cx - 0.28 * s, cx + 0.1 * s)
            L.append(Layer(cabin, WHITE, noise=0.02))
            win = rect(g, by - 0.34 * s, by - 0.24 * s, cx - 0.23 * s, cx + 0.05 * s)
            L.append(
                Layer(win, GLASS_RGB, part=PART["window"], material=MATERIAL["glass"], noise=0.02)
            )
    elif o.kind == "ball":
        r = 0.5 * s
        L.append(Layer(ellipse(g, by - r, cx, r, r), o.colors[0], skin=True))
    elif o.kind == "sign":
        (panel_c,) = o.colors
        pole = rect(g, by - 0.75 * s, by, cx - 0.04 * s, cx + 0.04 * s)
        L.append(Layer(pole, PALETTE["grey"], part=PART["pole"], noise=0.02))
        if o.variant == 0:
            panel = rect(g, by - 1.0 * s, by - 0.65 * s, cx - 0.26 * s, cx + 0.26 * s)
        elif o.variant == 1:
            panel = ellipse(g, by - 0.86 * s, cx, 0.21 * s, 0.21 * s)
        else:
            panel = polygon(
                g,
                [
                    (by - 1.12 * s, cx),
                    (by - 0.68 * s, cx + 0.27 * s),
                    (by - 0.68 * s, cx - 0.27 * s),
                ],
            )
        L.append(Layer(panel, panel_c, part=PART["panel"], skin=True, noise=0.02))
    elif o.kind == "rock":
        rock = ellipse(g, by - 0.25 * s, cx, 0.35 * s, 0.5 * s) & (yy < by)
        L.append(Layer(rock, o.colors[0], skin=True, noise=0.12))
    else:
        raise ValueError(o.kind)
    return L


def paint_material(mat: int, g: Grid, nz: np.ndarray, spec: SceneSpec) -> np.ndarray:
    """Full-frame (N, N, 3) float image of one background material."""
    yy, xx = g
    n = nz.shape[1]
    ph = spec.phases
    one = np.ones((n, n, 1), dtype=np.float32)

    def base(c: RGB) -> np.ndarray:
        return one * np.asarray(c, dtype=np.float32)

    if mat == MATERIAL["sky"]:
        h = max(spec.regions[1].top, 0.05)
        t = np.clip(yy / h, 0, 1)[..., None]
        img = base((0.26, 0.48, 0.9)) * (1 - t) + base((0.45, 0.66, 0.95)) * t
        img = img + 0.012 * nz[0][..., None]
    elif mat == MATERIAL["grass"]:
        blades = 0.08 * np.sin(2 * np.pi * (xx * 40 + 0.25 * nz[1]))
        img = base((0.22, 0.52, 0.18)) * (1 + 0.16 * nz[0] + blades)[..., None]
    elif mat == MATERIAL["water"]:
        waves = 0.1 * np.sin(2 * np.pi * (yy * 32 + 0.6 * np.sin(2 * np.pi * xx * 2 + ph[0])))
        img = base((0.1, 0.34, 0.72)) * (1 + waves + 0.04 * nz[0])[..., None]
    elif mat == MATERIAL["sand"]:
        speck = np.where(nz[1] > 1.8, -0.18, 0.0)
        img = base((0.9, 0.75, 0.38)) * (1 + 0.06 * nz[0] + speck)[..., None]
    elif mat == MATERIAL["brick"]:
        hgt, wid = 0.045, 0.1
        row = np.floor(yy / hgt + ph[1])
        u = xx / wid + (row % 2) * 0.5
        col = np.floor(u)
        mortar = (frac(yy / hgt + ph[1]) < 0.16) | (frac(u) < 0.07)
        shade = ((row * 73 + col * 37) % 7) / 7.0 - 0.5
        brick = base((0.62, 0.24, 0.16)) * (1 + 0.16 * shade + 0.05 * nz[0])[..., None]
        img = np.where(mortar[..., None], base((0.72, 0.7, 0.66)), brick)
    elif mat == MATERIAL["asphalt"]:
        img = base((0.38, 0.38, 0.4)) * (1 + 0.1 * nz[0])[..., None]
    elif mat == MATERIAL["snow"]:
        img = base((0.94, 0.96, 0.99)) * (1 - 0.035 * np.abs(nz[0]))[..., None]
    elif mat == MATERIAL["wood"]:
        plank = np.floor(yy / 0.07)
        gap = frac(yy / 0.07) < 0.09
        grain = 0.09 * np.sin(
            2 * np.pi * (yy * 60 + 1.5 * np.sin(2 * np.pi * (xx * 3 + plank * 0.3)))
        )
        wood = base((0.58, 0.38, 0.2)) * (1 + grain + 0.04 * nz[0])[..., None]
        img = np.where(gap[..., None], base((0.26, 0.16, 0.08)), wood)
    else:
        raise ValueError(mat)
    return img * np.asarray(spec.jitter[mat], dtype=np.float32)


def contrast(c: RGB) -> np.ndarray:
    """Second colour of a textured body: darker for light colours, lighter for dark ones."""
    a = np.asarray(c, dtype=np.float32)
    lum = float(a @ np.asarray([0.3, 0.59, 0.11], dtype=np.float32))
    return a * 0.4 if lum > 0.4 else a * 0.4 + 0.6


def compose(spec: SceneSpec, n: int, noise_rng: np.random.Generator | None) -> dict:
    """Draw the scene on an n x n grid: label maps always, RGB when a noise rng is given."""
    g = grid(n)
    yy, xx = g
    mat = np.full((n, n), spec.regions[-1].material, dtype=np.int32)
    for i in range(len(spec.regions) - 1, 0, -1):  # bottom band up: above edge i is band i-1
        r = spec.regions[i]
        edge = r.top + r.amp * np.sin(2 * np.pi * r.freq * xx + r.phase)
        mat[np.broadcast_to(yy < edge, (n, n))] = spec.regions[i - 1].material
    ground_mask = mat == spec.regions[-1].material
    rgb = None
    nz = None
    if noise_rng is not None:
        nz = noise_rng.standard_normal((3, n, n), dtype=np.float32)
        rgb = np.zeros((n, n, 3), dtype=np.float32)
        for r in spec.regions:
            m = mat == r.material
            rgb = np.where(m[..., None], paint_material(r.material, g, nz, spec), rgb)
        if spec.ground_texture:
            pat = pattern(spec.ground_texture, yy, xx, spec.ground_period, spec.ground_angle)
            rgb = np.where((ground_mask & pat)[..., None], rgb * 0.58, rgb)
    obj = np.zeros((n, n), dtype=np.int32)
    parts = [np.zeros((n, n), dtype=np.int32) for _ in range(MAX_PART_PLANES)]
    matp = mat.copy()
    skin = np.full((n, n), -1, dtype=np.int32)
    for k, o in enumerate(spec.objects):
        layers = object_layers(g, o)
        whole = np.zeros((n, n), dtype=bool)
        for layer in layers:
            whole |= layer.mask
        obj[whole] = OBJECT[o.kind]
        matp[whole] = 0
        skin[whole] = -1
        for p in parts:
            p[whole] = 0
        for layer in layers:
            m = layer.mask
            plane = 1 - o.plane if layer.nested else o.plane
            parts[plane][m] = layer.part
            matp[m] = layer.material
            if layer.skin:
                skin[m] = k
            if rgb is not None and nz is not None:
                col = np.asarray(layer.color, dtype=np.float32)
                paint = col * (1 + layer.noise * nz[2])[..., None]
                if layer.skin and o.texture:
                    pat = pattern(o.texture, yy - o.by, xx - o.cx, o.tex_period, o.tex_angle)
                    alt = contrast(layer.color) * (1 + layer.noise * nz[2])[..., None]
                    paint = np.where(pat[..., None], alt, paint)
                rgb = np.where(m[..., None], paint, rgb)
    skin_area = np.bincount(skin[skin >= 0], minlength=len(spec.objects))
    out = {"object": obj, "parts": parts, "material": matp, "skin_area": skin_area}
    if rgb is not None:
        out["rgb"] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return out


