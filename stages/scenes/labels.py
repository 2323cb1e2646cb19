"""The built-in synthetic dataset's label table: categories, label numbers and names.

Why one fixed table (independent of n_images): label numbers and c_ codes stay stable across
dataset sizes, so results from different runs are comparable.  Part and texture numbers are
above 255, so the G channel of the label PNGs is used; ``glass`` is both a part and a
material.
"""

from __future__ import annotations

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")  # category.csv order
PIXEL_CATEGORIES = ("color", "object", "part", "material")
IMAGE_CATEGORIES = ("scene", "texture")

COLOR_NAMES = (
    "black", "blue", "brown", "green", "grey", "orange",
    "pink", "purple", "red", "white", "yellow",
)  # fmt: skip
# Prototype sRGB colour of each name, matched in CIELAB.
COLOR_PROTOTYPES = (
    (20, 20, 20), (60, 110, 215), (125, 80, 40), (45, 145, 55), (128, 128, 128),
    (240, 140, 30), (240, 165, 195), (125, 50, 155), (205, 30, 30), (242, 242, 242),
    (235, 215, 50),
)  # fmt: skip
COLOR = {name: 1 + i for i, name in enumerate(COLOR_NAMES)}

OBJECT = {"house": 20, "tree": 21, "car": 22, "boat": 23, "ball": 24, "sign": 25, "rock": 26}
MATERIAL = {
    "sky": 40,
    "grass": 41,
    "water": 42,
    "sand": 43,
    "brick": 44,
    "asphalt": 45,
    "snow": 46,
    "wood": 47,
    "glass": 48,
}
SCENE = {
    "beach": 100,
    "desert": 101,
    "forest": 102,
    "harbor": 103,
    "park": 104,
    "snowfield": 105,
    "street": 106,
}
PART = {
    "roof": 300,
    "door": 301,
    "window": 302,
    "trunk": 303,
    "crown": 304,
    "wheel": 305,
    "hull": 306,
    "sail": 307,
    "pole": 308,
    "panel": 309,
    "glass": MATERIAL["glass"],  # the shared part/material label
}
TEXTURE = {"striped": 400, "dotted": 401, "chequered": 402, "zigzagged": 403, "grid": 404}

BY_CATEGORY: dict[str, dict[str, int]] = {
    "color": COLOR,
    "object": OBJECT,
    "part": PART,
    "material": MATERIAL,
    "scene": SCENE,
    "texture": TEXTURE,
}


def label_table() -> list[dict]:
    """Every label (ascending number) with its categories, in category.csv order.

    Why: one fixed table (independent of n_images) keeps label numbers and c_ codes stable
    across dataset sizes, so results from different runs are comparable.
    """
    names: dict[int, str] = {}
    cats: dict[int, list[str]] = {}
    for cat in CATEGORIES:
        for name, number in BY_CATEGORY[cat].items():
            if names.setdefault(number, name) != name:
                raise AssertionError(f"label {number} has two names")
            cats.setdefault(number, []).append(cat)
    return [{"number": n, "name": names[n], "categories": cats[n]} for n in sorted(names)]

