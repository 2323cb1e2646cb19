"""Basis transforms of a layer (SEMANTICS.md §7): every spatial unit vector a ∈ R^K becomes
``act(W a + b)``, block by block, before thresholds and IoU are computed exactly as usual.

- ``rotate(alpha, seed)``: W = Q^α, Q ∈ SO(K) drawn uniformly from the seed, Q^α its real
  orthogonal fractional power from the real Schur form (the paper's §3.2 experiment);
- ``pca(whiten)``: W = Vᵀ (÷ standard deviations when whitened), b = -W μ, from the layer's
  exact float64 covariance (:class:`stages.bases.covariance.Covariance`);
- ``linear(file)``: W, b from a ``.npy``/``.npz``/``.pt``/``.safetensors`` file, with
  activation none, ReLU or top-N — e.g. a sparse autoencoder's encoder.

Every basis is a (W, b) pair saved once as an artifact; :class:`LinearMap` reads it once per
process and applies it in float64, rounding the result to float32 (the dtype every threshold
and mask is computed in), so the transformed values do not depend on how images are blocked
beyond float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from storage.arrays import load_arrays
from storage.errors import UserError, first_line


def random_rotation(k: int, seed: int) -> np.ndarray:
    """Q ∈ SO(K), uniform (Haar): QR of a Gaussian matrix with the signs of R's diagonal
    moved into Q, then one column negated if det(Q) = -1."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    q = q * np.sign(np.diag(r))
    if np.linalg.slogdet(q)[0] < 0:
        q[:, 0] = -q[:, 0]
    return q


def fractional_power(q: np.ndarray, alpha: float) -> np.ndarray:
    """The real orthogonal Q^α: in Q's real Schur basis every rotation plane's angle θ
    becomes αθ (pairs of -1 eigenvalues are planes turned by π); Q^0 = I and Q^1 = Q exactly."""
    k = q.shape[0]
    if alpha == 0:
        return np.eye(k)
    if alpha == 1:
        return q.copy()
    from scipy.linalg import schur

    t, z = schur(q, output="real")
    power = np.zeros_like(t)
    i, pending_flip = 0, None
    while i < k:
        if i + 1 < k and abs(t[i + 1, i]) > 1e-12:  # a 2x2 rotation block
            a, b, c = t[i, i], t[i, i + 1], t[i + 1, i]
            theta = np.arctan2((c - b) / 2, a)
            _plane(power, i, i + 1, alpha * theta)
            i += 2
            continue
        if t[i, i] > 0:
            power[i, i] = 1.0
        elif pending_flip is None:
            pending_flip = i
        else:  # two -1 eigenvalues: a plane turned by pi
            _plane(power, pending_flip, i, alpha * np.pi)
            pending_flip = None
        i += 1
    if pending_flip is not None:
        raise ValueError("Q has an odd number of -1 eigenvalues: it is not in SO(K)")
    return z @ power @ z.T


def _plane(m: np.ndarray, i: int, j: int, angle: float) -> None:
    c, s = np.cos(angle), np.sin(angle)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c


def pca_basis(mean: np.ndarray, covariance: np.ndarray, whiten: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, b, variances): rows of W are the covariance's eigenvectors by decreasing
    variance, each signed so its largest-magnitude entry is positive; b = -W μ."""
    variances, vectors = np.linalg.eigh(covariance)
    order = np.argsort(variances, kind="stable")[::-1]
    variances, vectors = variances[order], vectors[:, order]
    largest = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    vectors = vectors * np.where(largest < 0, -1.0, 1.0)
    weight = vectors.T
    if whiten:
        weight = weight / np.sqrt(np.maximum(variances, np.finfo(np.float64).tiny))[:, None]
    return weight, -weight @ mean, variances


def _mapping(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"weight": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            return load_arrays(path)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                obj = {"weight": obj}
            if not isinstance(obj, dict):
                raise UserError(f"{path}: expected a tensor or a mapping of names to tensors")
            return {k: v.detach().double().numpy() for k, v in obj.items()
                    if isinstance(v, torch.Tensor)}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - each format raises its own kinds
        raise UserError(f"transform.path={path}: not a readable {suffix} file "
                        f"({first_line(exc)})") from None
    raise UserError(f"transform.path={path}: use a .npy, .npz, .pt or .safetensors file")


def load_linear(path: Path, units: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a linear map from a file: ``weight``/``W`` (K' × K) and optional
    ``bias``/``b``; or a sparse autoencoder's ``W_enc`` (K × K'), ``b_enc`` and optional
    ``b_dec`` (encode(a) = act((a - b_dec) W_enc + b_enc))."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in _mapping(Path(path)).items()}
    if "W_enc" in arrays:
        weight = arrays["W_enc"].T
        bias = arrays.get("b_enc", np.zeros(weight.shape[0]))
        if "b_dec" in arrays:
            bias = bias - weight @ arrays["b_dec"]
    else:
        weight = arrays.get("weight", arrays.get("W"))
        if weight is None:
            raise UserError(f"transform.path={path}: no array named weight, W or W_enc "
                            f"(found {', '.join(sorted(arrays)) or 'none'})")
        bias = arrays.get("bias", arrays.get("b", np.zeros(weight.shape[0])))
    if weight.ndim != 2 or weight.shape[1] != units or bias.shape != (weight.shape[0],):
        raise UserError(f"transform.path={path}: W is {weight.shape} and b {bias.shape}; the "
                        f"layer has {units} units, so W must be (K', {units}) and b (K',)")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise UserError(f"transform.path={path}: W or b holds NaN or infinite values")
    return weight, bias


def check_activation(text: str) -> str:
    """``none``, ``relu`` or ``topk:N`` (N > 0); anything else is a user error."""
    if text in ("none", "relu"):
        return text
    if text.startswith("topk:") and text[5:].isdigit() and int(text[5:]) > 0:
        return text
    raise UserError(f"transform.activation={text!r}: choose none, relu or topk:N (N > 0)")


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the activation along the unit axis (1); top-N keeps every entry at least as
    large as the N-th largest of its vector (ties at the boundary are kept)."""
    if activation == "relu":
        return torch.clamp(y, min=0)
    if activation.startswith("topk:"):
        n = min(int(activation[5:]), y.shape[1])
        kth = torch.topk(y, n, dim=1).values[:, -1:]
        return torch.where(y >= kth, y, torch.zeros_like(y))
    return y


@lru_cache(maxsize=4)
def _basis(path: str, _mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_arrays(Path(path))
    return arrays["weight"], arrays["bias"]


@dataclass(frozen=True)
class LinearMap:
    """a ↦ act(W a + b) for every spatial vector of a block; (W, b) read from a basis file
    once per process, so the map travels to workers as a path, not as a matrix."""

    basis_path: str
    activation: str = "none"

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        return _basis(self.basis_path, Path(self.basis_path).stat().st_mtime_ns)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights()
        w = torch.from_numpy(weight).to(block.device)
        b = torch.from_numpy(bias).to(block.device)
        y = torch.einsum("ok,bkhw->bohw", w, block.double()) + b[None, :, None, None]
        return activate(y, self.activation).float()
