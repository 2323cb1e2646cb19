"""Plain reference for the IoU tally (SEMANTICS.md §2–5), independent of stages/kernels.py.

Everything here is a literal reading of the contract, written as loops: one image and one
unit at a time, no skip rule, no dense label numbering, no vectorised tricks.

- mask: ``F.interpolate(A_k(x), (sh, sw), mode="bilinear", align_corners=False) > T_k``
  on that single map, the float32 result compared with the float64 threshold;
- labels: the pixel planes and image-level labels of the selected categories only;
- ``planes="set"``: a pixel counts once for a label however many planes (or image-level
  entries) carry it; ``planes="multiset"``: every plane and every image-level entry counts;
- ``union``: restricted / global / lite exactly as §4 words them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RefImage:
    """One image's labels: category -> pixel planes (sh, sw) and image-level label numbers."""

    planes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, list[int]] = field(default_factory=dict)


def reference_mask(act: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """M_k(x) = { p : bilinear(A_k(x))[p] > T_k } on one (h, w) map, no skip rule."""
    t = torch.from_numpy(np.ascontiguousarray(act, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return up.astype(np.float64) > float(threshold)


def reference_counts(
    acts: np.ndarray,
    thresholds: np.ndarray,
    images: list[RefImage],
    selected: list[str],
    primary: dict[int, str],
    union: str,
    planes: str,
    size: tuple[int, int],
) -> dict[str, np.ndarray]:
    """Counts of SEMANTICS.md §4, labels in ascending number order, categories in ``selected``
    order.  ``primary`` maps every scored label number to its primary category."""
    labels = sorted(primary)
    n_units = acts.shape[1]
    sh, sw = size
    inter = np.zeros((n_units, len(labels)), dtype=np.int64)
    unit_area = np.zeros((n_units, len(selected)), dtype=np.int64)
    label_area = np.zeros(len(labels), dtype=np.int64)
    for x, image in enumerate(images):
        pixel_planes = [p for c in selected for p in image.planes.get(c, [])]
        scalars = [n for c in selected for n in image.scalars.get(c, [])]
        # label region of each label in this image: a set (bool mask) and a multiset (counts)
        region_set, region_multi = {}, {}
        for label in labels:
            multi = np.zeros((sh, sw), dtype=np.int64)
            for plane in pixel_planes:
                multi += plane == label
            multi += scalars.count(label)
            region_multi[label] = multi
            region_set[label] = multi > 0
        for li, label in enumerate(labels):
            region = region_set[label] if planes == "set" else region_multi[label]
            label_area[li] += int(region.sum())
        carried = {primary[int(v)] for p in pixel_planes for v in np.unique(p) if v != 0}
        image_level = {primary[n] for n in scalars}
        carried |= image_level
        for k in range(n_units):
            mask = reference_mask(acts[x, k], thresholds[k], size)
            area = int(mask.sum())
            for li, label in enumerate(labels):
                region = region_set[label] if planes == "set" else region_multi[label]
                inter[k, li] += int(region[mask].sum())
            under_mask = {primary[int(v)] for p in pixel_planes for v in p[mask] if v != 0}
            for ci, cat in enumerate(selected):
                if union == "global":
                    counted = True
                elif union == "restricted":
                    counted = cat in carried
                elif union == "lite":
                    counted = cat in under_mask or cat in image_level
                else:
                    raise ValueError(union)
                if counted:
                    unit_area[k, ci] += area
    return {"intersection": inter, "unit_area": unit_area, "label_area": label_area}


def reference_iou(counts: dict[str, np.ndarray], labels: list[int], selected: list[str],
                  primary: dict[int, str]) -> list[dict]:
    """One row per (unit, label): counts, union_area and iou (0 where union_area = 0)."""
    rows = []
    inter = counts["intersection"]
    for k in range(inter.shape[0]):
        for li, label in enumerate(labels):
            cat = primary[label]
            a = int(counts["unit_area"][k, selected.index(cat)])
            g = int(counts["label_area"][li])
            i = int(inter[k, li])
            union_area = a + g - i
            rows.append({
                "unit": k, "label": label, "category": cat, "intersection": i,
                "label_area": g, "unit_area": a, "union_area": union_area,
                "iou": i / union_area if union_area > 0 else 0.0,
            })
    return rows


def reference_units(rows: list[dict], n_units: int, iou_threshold: float) -> list[dict]:
    """Best concept per unit: highest iou, ties to the lowest label; detector if iou > thr."""
    best: list[dict | None] = [None] * n_units
    for row in sorted(rows, key=lambda r: (r["unit"], r["label"])):
        cur = best[row["unit"]]
        if cur is None or row["iou"] > cur["iou"]:
            best[row["unit"]] = row
    return [
        {**b, "is_detector": b["iou"] > iou_threshold} for b in best  # type: ignore[dict-item]
    ]


def reference_layers(units: list[dict], categories: list[str]) -> dict[str, tuple[int, int]]:
    """category ('all' too) -> (detectors, distinct best concepts among detectors)."""
    det = [u for u in units if u["is_detector"]]
    out = {"all": (len(det), len({u["label"] for u in det}))}
    for cat in categories:
        sub = [u for u in det if u["category"] == cat]
        out[cat] = (len(sub), len({u["label"] for u in sub}))
    return out
