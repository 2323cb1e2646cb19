"""Tiny models for tests, loaded through model.factory."""

from __future__ import annotations

import torchvision


def tiny_vit(image_size: int = 112) -> torchvision.models.VisionTransformer:
    """Two encoder blocks, 7×7 patch grid at 112 px: a transformer that runs in milliseconds."""
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
        mlp_dim=64, num_classes=5,
    )
