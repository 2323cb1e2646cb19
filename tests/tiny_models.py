"""Tiny models for tests, loaded through model.factory."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn


def tiny_vit(image_size: int = 112) -> torchvision.models.VisionTransformer:
    """Two encoder blocks, 7×7 patch grid at 112 px: a transformer that runs in milliseconds."""
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
        mlp_dim=64, num_classes=5,
    )


def tiny_cnn(num_classes: int = 4) -> nn.Sequential:
    """Three small conv blocks (112 px input: 56, 28 and 14 px maps): a CNN that runs in
    milliseconds, for checkpoint sweeps and layer caches."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, stride=2, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1), relu2=nn.ReLU(),
        conv3=nn.Conv2d(16, 16, 3, stride=2, padding=1), relu3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, num_classes),
    ))


def save_checkpoint(path, seed: int) -> None:
    """A tiny_cnn state_dict with weights drawn from ``seed`` (a stand-in for a training
    checkpoint)."""
    torch.manual_seed(seed)
    torch.save(tiny_cnn().state_dict(), path)


class RedDetector(nn.Module):
    """One 1x1 convolution, ``red``, that fires where a pixel is red (R minus the other
    channels, on the normalized input): a unit with a known concept."""

    def __init__(self):
        super().__init__()
        self.red = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.red.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))
            self.red.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.red(x)


def red_detector() -> RedDetector:
    return RedDetector()


class _Single(nn.Module):
    """One 3x3 convolution named ``conv`` and a forward of the caller's choosing."""

    def __init__(self, forward):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.conv(x))


def broken_model() -> nn.Module:
    """A model whose forward pass fails: stands in for a bug, not a user's mistake."""

    def fail(_x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a bug in the model")

    return _Single(fail)


def nan_model() -> nn.Module:
    """Unit 1 of layer ``conv`` is NaN everywhere (a diverged checkpoint)."""
    model = _Single(lambda x: x)
    with torch.no_grad():
        model.conv.bias[1] = float("nan")
    return model


class SlowCNN(nn.Sequential):
    """tiny_cnn that sleeps in every forward pass: a run long enough to interrupt, without
    the compute of a large model."""

    def __init__(self, delay: float):
        super().__init__(OrderedDict(tiny_cnn().named_children()))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return super().forward(x)


def slow_cnn(delay: float = 0.1) -> SlowCNN:
    return SlowCNN(delay)
