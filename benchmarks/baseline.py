"""A NetDissect-Lite-shaped tally written from SEMANTICS.md: the speed the pipeline is compared to.

Why a baseline: the pipeline's tally is vectorised over blocks of images and units; the
question "how much faster is it" needs the classic structure — one image at a time, one
unit at a time, one bilinear resize of one map, ``np.argwhere``, ``np.bincount`` over the
label planes at those pixels — on the same data and thresholds.  It counts
``union=lite, planes=multiset`` (NetDissect-Lite compatibility, SEMANTICS.md §4), so its
counts must equal the pipeline's tally with that scoring; that equality is a correctness
guard for both.

Labels come from the concept store (already decoded), activations from the activation store,
both read block by block; decoding PNGs is not part of either side's timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.tally.labels import LabelSpace
from storage.activations import ActivationStore
from storage.concepts import ConceptStore


@dataclass
class BaselineCounts:
    """Counts in the pipeline's dense layout (column 0 = none, then labels ascending)."""

    intersection: np.ndarray  # (K, L + 1) int64
    unit_area: np.ndarray  # (K, C) int64, union=lite
    label_area: np.ndarray  # (L + 1,) int64
    active_pairs: int  # (image, unit) pairs whose raw max exceeds the threshold
    mask_pixels: int  # pixels in all their masks


def baseline_tally(activations: ActivationStore, layer: str, concepts: ConceptStore,
                   thresholds: np.ndarray, n_images: int, space: LabelSpace) -> BaselineCounts:
    """Tally the first ``n_images`` images one image and one unit at a time."""
    sh, sw = concepts.sh, concepts.sw
    units = activations.shape(layer)[1]
    top = int(space.lut.shape[0])  # label numbers 0 .. max
    category = np.full(top, -1, np.int64)  # label number -> primary category index
    category[space.numbers] = space.primary
    n_categories = len(space.categories)
    intersection = np.zeros((units, top), np.int64)
    unit_area = np.zeros((units, n_categories), np.int64)
    label_area = np.zeros(top, np.int64)
    active_pairs = mask_pixels = 0
    array = activations.array(layer)
    for start in range(0, n_images, activations.block_size):
        stop = min(start + activations.block_size, n_images)
        acts = array[start:stop]
        labels = concepts.read_block(start, stop)
        for i in range(stop - start):
            planes = labels.pixel_labels[i][labels.plane_category[i] >= 0]  # (P, sh, sw)
            scalars = labels.image_labels[i][labels.image_label_category[i] >= 0]
            label_area += np.bincount(planes.ravel(), minlength=top)
            np.add.at(label_area, scalars, sh * sw)
            scalar_categories = category[scalars]
            maxima = acts[i].reshape(units, -1).max(axis=1)
            for unit in np.flatnonzero(maxima > thresholds):
                resized = F.interpolate(torch.from_numpy(acts[i, unit])[None, None],
                                        size=(sh, sw), mode="bilinear", align_corners=False)
                mask = resized[0, 0].numpy().astype(np.float64) > thresholds[unit]
                pixels = np.argwhere(mask)
                area = len(pixels)
                active_pairs += 1
                if area == 0:
                    continue
                mask_pixels += area
                hits = np.bincount(planes[:, pixels[:, 0], pixels[:, 1]].ravel(), minlength=top)
                hits[0] = 0
                intersection[unit] += hits
                np.add.at(intersection[unit], scalars, area)
                touched = np.union1d(category[np.flatnonzero(hits)], scalar_categories)
                unit_area[unit, touched[touched >= 0]] += area
    dense = np.concatenate([[0], space.numbers])
    intersection = intersection[:, dense]
    intersection[:, 0] = 0
    label_area = label_area[dense]
    label_area[0] = 0
    return BaselineCounts(intersection, unit_area, label_area, active_pairs, mask_pixels)
