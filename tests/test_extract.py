"""Extract stage: stored activations, resumability after SIGKILL, checkpoints, layer errors."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr
import zarr

from stages.extract import ExtractConfig, run_extract
from stages.network.models import build_model, preprocess, resolve_layers
from stages.network.spec import ModelSpec, weights_identity
from storage.activations import ActivationStore, open_layer
from storage.broden import index_fingerprint, read_broden
from storage.broden_images import load_image
from storage.errors import UserError
from tests.conftest import REPO, cli, cli_env


def _config(root: Path, store: Path, spec: ModelSpec, **kw) -> ExtractConfig:
    fingerprint = {"model": spec.name, "weights": weights_identity(spec),
                   "dataset_index": index_fingerprint(root), "dtype": kw.get("dtype", "float32")}
    return ExtractConfig(images_dir=root / "images", store_path=store, model=spec,
                         fingerprint=fingerprint, progress=False, **kw)


def _direct(spec: ModelSpec, root: Path) -> dict[str, np.ndarray]:
    """Reference: hooks on a plain forward pass, image by image, no pipeline code paths."""
    ds = read_broden(root)
    model = build_model(spec)
    modules = dict(model.named_modules())
    out: dict[str, list] = {name: [] for name in spec.layers}
    for rec in ds.images:
        img = load_image(ds.images_dir / rec.image)
        captured: dict = {}

        def keep(name, store=captured):
            return lambda module, inputs, output: store.__setitem__(name, output)

        handles = [modules[name].register_forward_hook(keep(name)) for name in spec.layers]
        with torch.no_grad():
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            model((x - mean) / std)
        for h in handles:
            h.remove()
        for name in spec.layers:
            out[name].append(captured[name][0].numpy())
    return {k: np.stack(v) for k, v in out.items()}


def test_cnn_layers_equal_direct_forward(synthetic_root, tmp_path):
    spec = ModelSpec(name="r18", arch="resnet18", weights="none", layers=("layer2", "layer1.0.conv1"))
    store_path = tmp_path / "act.zarr"
    run_extract(_config(synthetic_root, store_path, spec, block_size=5, batch_size=3),
                read_broden(synthetic_root).images, scheduler=None)
    ref = _direct(spec, synthetic_root)
    store = ActivationStore(store_path)
    for layer in spec.layers:
        got = store.array(layer)[:]
        assert got.shape == ref[layer].shape
        np.testing.assert_allclose(got, ref[layer], rtol=1e-4, atol=1e-5)
    # the xarray view: dims, image coordinate in index.csv order
    da = open_layer(store_path, "layer2")
    assert da.dims == ("image", "unit", "y", "x")
    assert list(da["image"].values) == [r.image for r in read_broden(synthetic_root).images]
    ds = xr.open_zarr(store_path)  # consolidated metadata lists every layer
    assert set(ds.data_vars) == {"layer2", "layer1.0.conv1"}
    assert store.fingerprint["dtype"] == "float32"
    codecs = zarr.open_array(str(store_path / "layer2")).metadata.codecs
    assert any(type(c).__name__ == "ZstdCodec" for c in codecs)


def test_transformer_block_becomes_grid(synthetic_root, tmp_path):
    spec = ModelSpec(name="vit", factory="tests.tiny_models:tiny_vit", weights="none",
                     layers=("encoder.layers.encoder_layer_1",))
    store_path = tmp_path / "vit.zarr"
    run_extract(_config(synthetic_root, store_path, spec, block_size=8),
                read_broden(synthetic_root).images, scheduler="threads")
    got = ActivationStore(store_path).array(spec.layers[0])[:]
    model = build_model(spec)
    tokens = {}
    modules = dict(model.named_modules())
    modules[spec.layers[0]].register_forward_hook(lambda m, i, o: tokens.__setitem__("t", o))
    ds = read_broden(synthetic_root)
    imgs = np.stack([load_image(ds.images_dir / r.image) for r in ds.images])
    with torch.no_grad():
        model(preprocess(imgs, "imagenet"))
    t = tokens["t"]  # (B, 1 + 49, 32): class token first
    expected = t[:, 1:, :].reshape(len(imgs), 7, 7, 32).permute(0, 3, 1, 2).numpy()
    assert got.shape == (24, 32, 7, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_float16_option_and_reuse(synthetic_root, tmp_path):
    spec = ModelSpec(name="r18", arch="resnet18", weights="none", layers=("layer3",))
    store_path = tmp_path / "a.zarr"
    cfg = _config(synthetic_root, store_path, spec, dtype="float16", block_size=16)
    images = read_broden(synthetic_root).images
    assert run_extract(cfg, images, scheduler=None) == ["layer3"]
    assert ActivationStore(store_path).array("layer3").dtype == np.float16
    mtimes = {p: p.stat().st_mtime_ns for p in store_path.rglob("*")}
    assert run_extract(cfg, images, scheduler=None) == []  # current: nothing to do
    assert {p: p.stat().st_mtime_ns for p in store_path.rglob("*")} == mtimes


def test_sigkill_then_resume_equals_clean_run(synthetic_root, tmp_path):
    common = [
        "stage=extract", f"dataset.path={synthetic_root}", "dataset.block_size=2",
        "model=resnet18", "model.weights=none", "model.layers=[layer3]", "cluster=none",
        "progress=false",
    ]
    killed = tmp_path / "killed"
    stores = killed / "activations" / synthetic_root.name
    proc = subprocess.Popen(cli(*common, f"workdir={killed}"), cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            (store,) = stores.glob("resnet18-*.zarr")
            done = int(zarr.open_group(str(store), mode="r")["progress/layer3"][:].sum())
        except Exception:  # noqa: BLE001 - store not created yet
            done = 0
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extract finished before it could be killed"
    partial = zarr.open_group(str(store), mode="r")
    assert 0 < int(partial["progress/layer3"][:].sum()) < 12
    assert not ActivationStore(store).is_complete("layer3")
    subprocess.run(cli(*common, f"workdir={killed}"), cwd=REPO, env=cli_env(), check=True,
                   capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cli(*common, f"workdir={clean}"), cwd=REPO, env=cli_env(), check=True,
                   capture_output=True)
    a = ActivationStore(store).array("layer3")[:]
    b = ActivationStore(clean / store.relative_to(killed)).array("layer3")[:]
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def _tiny_resnet():
    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=4)


@pytest.mark.parametrize("form", ["plain", "wrapped", "module_prefix"])
def test_checkpoint_forms_load(tmp_path, form):
    source = _tiny_resnet()
    state = source.state_dict()
    if form == "wrapped":
        obj = {"state_dict": state, "epoch": 3}
    elif form == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        obj = state
    path = tmp_path / f"{form}.pth"
    torch.save(obj, path)
    spec = ModelSpec(name="x", arch="resnet18", weights=str(path), layers=("layer4",),
                     kwargs={"num_classes": 4}, seed=99)
    model = build_model(spec)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_whole_model_pickle_is_refused(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(_tiny_resnet(), path)
    spec = ModelSpec(name="x", arch="resnet18", weights=str(path), layers=("layer4",),
                     kwargs={"num_classes": 4})
    with pytest.raises(UserError, match="pickled whole model.*state_dict"):
        build_model(spec)


def test_unknown_layer_lists_valid_names():
    model = _tiny_resnet()
    with pytest.raises(UserError) as err:
        resolve_layers(model, ["layer9"])
    msg = str(err.value)
    assert "layer9" in msg and "layer4" in msg and "layer1.0.conv1" in msg
    assert "\n" not in msg


def test_unknown_layer_cli_exit(synthetic_root, tmp_path):
    res = subprocess.run(
        cli("stage=extract", f"dataset.path={synthetic_root}", "model=resnet18", "model.weights=none",
            "model.layers=[nope]", "cluster=none", f"workdir={tmp_path}"),
        cwd=REPO, env=cli_env(), capture_output=True, text=True,
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0] and "layer4" in errors[0]


def test_netdissect_preprocessing():
    """NetDissect-Lite: BGR mean subtracted, channels flipped back to RGB, / (255 * 0.224)."""
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[..., 0] = 200  # red
    x = preprocess(img, "netdissect")
    # channel 0 stays red, minus the red mean (the last of the BGR mean)
    assert torch.allclose(x[0, 0], torch.full((2, 2), (200 - 124.6901) / (255 * 0.224)))
    assert torch.allclose(x[0, 2], torch.full((2, 2), -109.5388 / (255 * 0.224)))


def test_input_size_resizes_before_the_model():
    img = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = preprocess(img, "imagenet", size=227)
    assert x.shape == (2, 3, 227, 227)
    assert preprocess(img, "imagenet", size=224).shape == (2, 3, 224, 224)
