"""The demo model: a small CNN trained briefly on the synthetic dataset's scene labels.

It gives the default run a network that has learned something, so its units have real
concepts to find, without downloading weights.  Training is deterministic for a seed and
takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.network.models import preprocess
from storage.broden import BrodenDataset, read_broden
from storage.broden_images import dataset_file, load_image
from storage.errors import UserError

log = logging.getLogger("netdissect")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=False),
        )
    )


class DemoNet(nn.Module):
    """Four conv blocks (112 px input -> 14×14×128 at ``block4``), global pool, linear."""

    def __init__(self, num_classes: int = 8, width: int = 32):
        super().__init__()
        self.block1 = _block(3, width, stride=2)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _block(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _block(2 * width, 4 * width)
        self.block4 = _block(4 * width, 4 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.head(x)


def demo_net(num_classes: int = 8, width: int = 32) -> DemoNet:
    """Factory used by ``model=demo`` (``model.factory=stages.demo_model:demo_net``)."""
    return DemoNet(num_classes, width)


@dataclass(frozen=True)
class DemoTrainConfig:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    width: int = 32


def scene_targets(dataset: BrodenDataset) -> tuple[list[int], np.ndarray]:
    """Scene label numbers (class order) and each image's class index (-1 if none)."""
    if "scene" not in dataset.all_categories:
        raise UserError(f"{dataset.root}: the demo model trains on scene labels; category.csv has none")
    scenes = sorted(n for n, lab in dataset.labels.items() if "scene" in lab.coverage)
    index = {n: i for i, n in enumerate(scenes)}
    targets = np.array(
        [index[r.scalars["scene"][0]] if r.scalars.get("scene") else -1 for r in dataset.images]
    )
    return scenes, targets


@dataclass
class TrainedDemo:
    """A trained demo model and what a reader needs to know about it."""

    model: DemoNet
    summary: dict  # num_classes, scenes, val_accuracy, train_images, seconds, config

    def save(self, path: Path) -> None:
        torch.save(self.model.state_dict(), path)


def train_demo_model(dataset_root: Path, cfg: DemoTrainConfig, progress: bool = True) -> TrainedDemo:
    """Train on the ``train`` split and measure accuracy on ``val``."""
    from tqdm.auto import tqdm

    dataset = read_broden(dataset_root)
    scenes, targets = scene_targets(dataset)
    images = np.stack([load_image(dataset_file(dataset.images_dir, r.image, r.line), r.line)
                       for r in dataset.images])
    split = np.array([r.split for r in dataset.images])
    train = np.flatnonzero((split == "train") & (targets >= 0))
    val = np.flatnonzero((split != "train") & (targets >= 0))
    if len(train) == 0:
        raise UserError(f"{dataset.root / 'index.csv'}: no training images with a scene label "
                        "to train the demo model on")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = DemoNet(len(scenes), cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (-(-len(train) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    x_all = preprocess(images, "imagenet")
    y_all = torch.from_numpy(targets).long()
    start = time.time()
    bar = tqdm(total=steps, desc="train demo model", unit="step", disable=None if progress else True)
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(train)
        for i in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[i : i + cfg.batch_size])
            x = x_all[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x_all[val[i : i + 256]]).argmax(1) for i in range(0, len(val), 256)])
    accuracy = float((pred.numpy() == targets[val]).mean()) if len(val) else float("nan")
    summary = {
        "num_classes": len(scenes),
        "scenes": [dataset.labels[n].name for n in scenes],
        "val_accuracy": accuracy,
        "train_images": int(len(train)),
        "seconds": round(time.time() - start, 1),
        "config": asdict(cfg),
    }
    log.info("demo model: %d scenes, val accuracy %.1f%% after %.0f s",
             len(scenes), 100 * accuracy, summary["seconds"])
    return TrainedDemo(model, summary)
