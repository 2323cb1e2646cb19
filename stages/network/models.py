"""Building models, loading checkpoints, capturing layers and preprocessing images.

Shared by the extract stage and the demo-model trainer.  Nothing here reads a config file
or a global: a :class:`ModelSpec` says everything.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.network.spec import ModelSpec, is_path
from storage.errors import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NETDISSECT_BGR_MEAN = (109.5388, 118.6897, 124.6901)
PREPROCESSING = ("imagenet", "netdissect")


def _call_factory(spec: ModelSpec) -> nn.Module:
    target = spec.factory or ""
    if ":" not in target:
        raise UserError(f"model.factory={target!r}: expected 'package.module:function'")
    module_name, func_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"model.factory={target!r}: cannot import {module_name} ({exc})") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise UserError(f"model.factory={target!r}: {module_name} has no {func_name}")
    try:
        model = func(**spec.kwargs)
    except TypeError as exc:
        raise UserError(f"model.kwargs: {target} refuses them ({exc})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.factory={target!r} returned {type(model).__name__}, not a torch Module")
    return model


# torch's default generator is process-wide: seeding and initialising must not interleave
# between threads, or two threads building "seed 0" models get different weights.
_INIT_LOCK = threading.Lock()


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate and load weights; the model is returned in eval mode."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _build_model(spec)


def _weights(spec: ModelSpec) -> str | None:
    return None if spec.weights is None or str(spec.weights).lower() == "none" else str(spec.weights)


def _instantiate(spec: ModelSpec, torchvision_weights: str | None = None) -> nn.Module:
    """The architecture, randomly initialised (or with torchvision's named weights)."""
    if spec.factory:
        return _call_factory(spec)
    import torchvision  # only here: its model zoo costs seconds of imports
    if not spec.arch:
        raise UserError("model: set model.arch (a torchvision name) or model.factory")
    names = torchvision.models.list_models()
    if spec.arch not in names:
        close = difflib.get_close_matches(spec.arch, names, n=3)
        raise UserError(
            f"model.arch={spec.arch!r} is not a torchvision model"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    try:
        return torchvision.models.get_model(spec.arch, weights=torchvision_weights, **spec.kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        key = "model.weights" if torchvision_weights else "model.kwargs"
        raise UserError(f"{key}: {spec.arch} refuses it ({first_line(exc)})") from None


def _build_model(spec: ModelSpec) -> nn.Module:
    weights = _weights(spec)
    if weights is not None and spec.arch and not spec.factory and not is_path(weights):
        return _instantiate(spec, torchvision_weights=weights).eval()
    model = _instantiate(spec)
    if weights is not None:
        load_checkpoint(model, Path(weights))
    return model.eval()


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a plain state_dict, ``{'state_dict': ...}`` or ``module.``-prefixed keys."""
    if not path.is_file():
        raise UserError(f"model.weights: checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for pickles
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise UserError(
                f"{path}: holds a pickled whole model, which is not loaded for safety; convert "
                "it once with torch.save(torch.load(path, weights_only=False).state_dict(), "
                "'model_state.pt') and pass that file"
            ) from None
        raise UserError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    state = fit_checkpoint_keys(obj, model.state_dict().keys())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path}: state_dict does not fit the model ({detail})")


@lru_cache(maxsize=2)
def cached_model(spec_json: str, device: str) -> tuple[nn.Module, threading.Lock]:
    """One model per worker process and spec, so image blocks don't rebuild it, with the
    lock that serializes its forward passes: capture hooks live on the shared modules, so two
    threads running it at once would see each other's outputs."""
    return build_model(ModelSpec.from_json(spec_json)).to(device), threading.Lock()


def resolve_layers(model: nn.Module, names: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"model.layers: {name!r} is not a layer of {model.__class__.__name__}{hint}; "
                f"valid names: {', '.join(valid)}"
            )
        found[name] = modules[name]
    return found


def check_layers(spec: ModelSpec) -> None:
    """Refuse layer names the architecture does not have, before any work.

    The architecture is built on torch's meta device (no memory, no weights, milliseconds),
    so this runs whether or not a cache exists and never loads a checkpoint.
    """
    with _INIT_LOCK, torch.device("meta"):
        model = _instantiate(spec)
    resolve_layers(model, spec.layers)


def as_grid(output: torch.Tensor, layer: str) -> torch.Tensor:
    """(B, C, H, W) as is; (B, tokens, dim) from a transformer becomes (B, dim, g, g)."""
    if isinstance(output, tuple | list):
        output = output[0]
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        b, tokens, dim = output.shape
        for drop in (1, 0):  # class token first, then a plain token grid
            side = math.isqrt(tokens - drop)
            if side * side == tokens - drop and side > 0:
                return output[:, drop:, :].transpose(1, 2).reshape(b, dim, side, side)
    raise UserError(
        f"model.layers: layer {layer!r} outputs shape {tuple(output.shape)}; "
        "need (batch, units, h, w) or (batch, tokens, dim)"
    )


@contextmanager
def record_layers(model: nn.Module, names: tuple[str, ...] | list[str]) -> Iterator[dict]:
    """Capture every named layer's output during one forward pass."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in resolve_layers(model, names).items():
        def hook(_module, _inputs, output, name=name):
            outputs[name] = as_grid(output, name)

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def preprocess(images: np.ndarray, mode: str, device: str | torch.device = "cpu",
               size: int | None = None) -> torch.Tensor:
    """(B, H, W, 3) RGB on the 0-255 scale -> normalized float32 (B, 3, H, W); resized
    bilinearly to ``size`` x ``size`` when given (e.g. AlexNet's 227 px), else native size.

    ``netdissect`` is NetDissect's Caffe-era normalization as NetDissect-Lite applies it:
    the BGR mean subtracted per channel, channels back in RGB order, divided by 255·0.224.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    if size is not None and x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std
    if mode == "netdissect":
        rgb_mean = torch.tensor(NETDISSECT_BGR_MEAN[::-1], device=device).view(1, 3, 1, 1)
        return (x - rgb_mean) / (255.0 * 0.224)
    raise UserError(f"model.preprocess={mode!r}: choose one of {', '.join(PREPROCESSING)}")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# --------------------------------------------------------------------------- Places365 weights
# The CSAIL Places365 PyTorch checkpoints (http://places2.csail.mit.edu/models_places365/) are
# ``{'state_dict': ...}`` saved by PyTorch 0.2 from DataParallel models. Their architectures
# are torchvision's with 365 classes, except ``wideresnet18``; their inputs were normalized
# with the ImageNet mean/std (the Places365 repo's train and demo scripts), i.e. ``imagenet``.

PLACES365_CLASSES = 365

# DenseNet layers before torchvision 0.4 named their modules "norm.1", "conv.2", ...
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$"
)


def legacy_checkpoint_key(key: str) -> str:
    """A checkpoint key in today's torchvision naming: every ``module.`` component dropped
    (Places365 AlexNet wraps only ``features`` in DataParallel: ``features.module.0.weight``)
    and DenseNet's ``norm.1`` style names joined (``norm1``)."""
    key = ".".join(part for part in key.split(".") if part != "module")
    match = _OLD_DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def fit_checkpoint_keys(state: dict, model_keys: Iterable[str]) -> dict:
    """Checkpoint entries renamed to the model's keys: a leading ``module.`` is dropped; a key
    the model still lacks is tried in :func:`legacy_checkpoint_key` form. Keys fitting
    neither are kept (without the leading ``module.``) so the loader reports them."""
    wanted = set(model_keys)
    fitted = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name not in wanted and legacy_checkpoint_key(key) in wanted:
            name = legacy_checkpoint_key(key)
        fitted[name] = value
    return fitted


def places365_wideresnet18(num_classes: int = PLACES365_CLASSES) -> nn.Module:
    """The Places365 repo's ``wideresnet.resnet18``: torchvision's resnet18 without the stem
    max-pool, so every later map is twice as large (layer4 is 14x14 at 224 px instead of 7x7).

    Why it loads: that repo's BasicBlock, strides (2 in layer2-4) and module names equal
    torchvision's, and a max-pool has no parameters; its ``AvgPool2d(14)`` equals torchvision's
    adaptive average pool at 224 px (at other sizes only the logits differ, not the layers).
    """
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.maxpool = nn.Identity()
    return model
