"""Input perturbations (SEMANTICS.md §7): images change before the model sees them, and
geometric ones move the label planes with the same geometry, so masks and labels stay aligned.

- ``noise:s``: adds s·U[0,1) per pixel channel on the 0–255 scale, clipped to [0, 255];
- ``rotate:d``: turns the image by d degrees (counter-clockwise) about its centre — bilinear
  for the image, nearest for label planes; pixels turned in from outside are black and
  unlabelled;
- ``shuffle:n``: cuts image and label planes into an n × n grid and permutes the cells.

Randomness is drawn per image from (seed, image row), so an image is perturbed the same way
however the dataset is split into blocks or workers.  Image-level labels (scene, texture)
stay whole-image labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.errors import UserError

KINDS = ("none", "noise", "rotate", "shuffle")


@dataclass(frozen=True)
class Perturbation:
    kind: str = "none"
    amount: float = 0.0
    seed: int = 0

    @staticmethod
    def parse(text: str, seed: int = 0) -> Perturbation:
        """``none``, ``noise:s`` (s ≥ 0), ``rotate:d`` (degrees) or ``shuffle:n`` (n ≥ 1)."""
        kind, _, value = str(text).partition(":")
        usage = "choose none, noise:S (S >= 0), rotate:DEGREES or shuffle:N (N >= 1)"
        if kind == "none" and not value:
            return Perturbation()
        try:
            amount = float(value)
        except ValueError:
            raise UserError(f"extract.perturb={text!r}: {usage}") from None
        if kind not in KINDS[1:] or not np.isfinite(amount) or (
                kind == "noise" and amount < 0) or (
                kind == "shuffle" and (amount < 1 or amount != int(amount))):
            raise UserError(f"extract.perturb={text!r}: {usage}")
        return Perturbation(kind, amount, seed)

    @staticmethod
    def from_text(text: str) -> Perturbation:
        """The inverse of ``str()``: ``noise:5,seed=3`` -> Perturbation("noise", 5, 3)."""
        spec, _, seed = str(text).partition(",seed=")
        return Perturbation.parse(spec, int(seed) if seed else 0)

    @property
    def geometric(self) -> bool:
        """Does it move pixels (so the labels must move too)?"""
        return self.kind in ("rotate", "shuffle")

    @property
    def moved_labels(self) -> str:
        """What the label planes go through: this perturbation if geometric, else none."""
        return str(self) if self.geometric else "none"

    @property
    def random(self) -> bool:
        return self.kind in ("noise", "shuffle")

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        text = f"{self.kind}:{self.amount:g}"
        return f"{text},seed={self.seed}" if self.random else text

    def check_sizes(self, ih: int, iw: int, sh: int, sw: int) -> None:
        """``shuffle:n`` needs image and segmentation sizes that n divides."""
        n = int(self.amount)
        if self.kind == "shuffle" and any(size % n for size in (ih, iw, sh, sw)):
            raise UserError(f"extract.perturb=shuffle:{n}: the images are {ih}x{iw} and the "
                            f"label planes {sh}x{sw}; pick an n that divides all four")

    def _rng(self, row: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(row)])

    def images(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) on the 0–255 scale -> float32, perturbed."""
        out = np.asarray(images, dtype=np.float32)
        if self.kind == "noise":
            noise = np.stack([self._rng(r).random(out.shape[1:], dtype=np.float32) for r in rows])
            return np.clip(out + np.float32(self.amount) * noise, 0, 255)
        if self.kind == "rotate":
            return self._rotate(out.transpose(0, 3, 1, 2), "bilinear").transpose(0, 2, 3, 1)
        if self.kind == "shuffle":
            return np.stack([self._shuffle(img, r) for img, r in zip(out, rows, strict=True)])
        return out

    def planes(self, planes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, P, sh, sw) label numbers moved with the images' geometry (nearest)."""
        if self.kind == "rotate":
            return self._rotate(planes.astype(np.float32), "nearest").astype(planes.dtype)
        if self.kind == "shuffle":
            return np.stack([self._shuffle(p.transpose(1, 2, 0), r).transpose(2, 0, 1)
                             for p, r in zip(planes, rows, strict=True)])
        return planes

    def _rotate(self, x: np.ndarray, mode: str) -> np.ndarray:
        """(B, C, H, W) float32 turned by ``amount`` degrees (torch loads only for this)."""
        import torch
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import rotate

        how = InterpolationMode.BILINEAR if mode == "bilinear" else InterpolationMode.NEAREST
        tensor = torch.from_numpy(np.ascontiguousarray(x))
        return rotate(tensor, self.amount, interpolation=how, fill=0.0).numpy()

    def _shuffle(self, image: np.ndarray, row: int) -> np.ndarray:
        """(H, W, C) cut into an n × n grid; output cell i is input cell perm[i]."""
        n = int(self.amount)
        h, w = image.shape[0] // n, image.shape[1] // n
        cells = [image[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(n) for c in range(n)]
        perm = self._rng(row).permutation(n * n)
        return np.concatenate([np.concatenate([cells[perm[r * n + c]] for c in range(n)], axis=1)
                               for r in range(n)], axis=0)
