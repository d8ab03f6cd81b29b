"""Layer orthogonality (OMPQ's "ORM", which is linear CKA) and the importance derived from it.

* :func:`layer_features`: one calibration batch through the FP model in eval mode (BatchNorm running statistics,
  no augmentation), one tensor per quantized layer, flattened to ``[N, p]``.
* :func:`cka_matrix`: the ``L x L`` linear CKA matrix from ``L`` cached centred Gram matrices (upper triangle
  only); a layer with fewer features than samples (``p < N``) keeps its centred features instead and pairs of such
  layers use the feature-space identity ``<K~, M~> = ||X~^T Y~||_F^2``. :func:`linear_cka` is the slow reference
  (both Grams recomputed per pair with the centring matrix H, as the seed does).
* :func:`importance`: ``gamma_i = sum_{j != i} ORM_ij`` and ``theta_i = exp(-beta (gamma_i - min gamma))``,
  computed in the log domain, so the largest theta is exactly 1 whatever beta (the seed's ``exp(-beta gamma)``
  underflows below the solver's tolerance for beta >= 10, spec section 10.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import qcore

log = logging.getLogger(__name__)


def layer_features(model: nn.Module, names: Sequence[str], batch: Any, forward: Callable[[nn.Module, Any], Any],
                   layers: Mapping[str, qcore.LayerInfo] | None = None, samples: int | None = None,
                   outputs: Mapping[str, str] | None = None, inputs: bool = False,
                   flatten: bool = True) -> dict[str, Tensor]:
    """The output of each layer in ``names`` for one ``batch``, as ``[N, p]`` float64 rows (one per sample).

    The model runs in eval mode (restored afterwards) under ``no_grad``. ``outputs`` maps a layer to another module
    whose output stands for it (the seed's block-output convention); ``samples`` keeps the first N samples.
    ``inputs=True`` takes each layer's input instead (the tensor its activation quantizer sees; ``outputs`` is
    then ignored). ``flatten=False`` keeps each tensor as the layer saw it (shape, dtype and device);
    :func:`flat_features` turns such tensors into the ``[N, p]`` float64 rows.
    """
    outputs = {} if inputs else dict(outputs or {})
    feats: dict[str, Tensor] = {}
    handles = []

    def hook_for(key: str) -> Callable[..., None]:
        info = layers.get(key) if layers is not None and key not in outputs else None

        def hook(_m: nn.Module, inp: Any, out: Any) -> None:
            def keep(t: Tensor) -> Tensor:
                feats[key] = flat_features(t.detach()) if flatten else t.detach()
                return t
            if inputs:
                if info is not None:
                    info.input_tensor(inp[0], keep)
                else:
                    keep(inp[0])
            elif info is not None:
                info.output_tensor(out, keep)
            else:
                keep(out)
        return hook

    for name in names:
        handles.append(model.get_submodule(outputs.get(name, name)).register_forward_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in feats]
    if missing:
        raise qcore.QcoreError(f"ompq: layer(s) {', '.join(missing[:3])} did not run on the calibration batch; "
                               "the orthogonality needs every quantized layer to run in the forward pass")
    if samples is not None:
        feats = {k: v[:samples] for k, v in feats.items()}
    return feats


def flat_features(t: Tensor) -> Tensor:
    """``t`` (first dimension: samples) as ``[N, p]`` float64 rows on the CPU, the form the CKA works on."""
    return t.reshape(t.shape[0], -1).to(torch.float64).cpu()


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Reference linear CKA (the seed's ORM, biased HSIC): Grams ``K = X X^T``, ``M = Y Y^T``, centred with
    ``H = I - 11^T/N``; ``<HKH, HMH> / (||HKH|| ||HMH||)``. Zero when either feature set is constant."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x.double() @ x.double().T) @ h
    m = h @ (y.double() @ y.double().T) @ h
    den = float(k.norm() * m.norm())
    return float((k * m).sum()) / den if den > 0 else 0.0


@dataclass(frozen=True)
class Orthogonality:
    """The CKA matrix of ``names`` (``matrix[i, j]`` in [0, 1], 1 on the diagonal), gamma, theta and beta."""

    names: list[str]
    matrix: np.ndarray
    gamma: np.ndarray
    theta: np.ndarray
    beta: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-layer gamma and theta, the matrix as nested lists (rounded to 1e-6)."""
        return {"layers": list(self.names), "beta": self.beta, "samples": self.samples,
                "gamma": {n: round(float(g), 6) for n, g in zip(self.names, self.gamma, strict=True)},
                "theta": {n: float(t) for n, t in zip(self.names, self.theta, strict=True)},
                "matrix": [[round(float(v), 6) for v in row] for row in self.matrix]}


def cka_matrix(feats: Sequence[Tensor]) -> np.ndarray:
    """Linear CKA between every pair of feature matrices (each ``[N, p_i]``, same N), from one centred Gram
    per layer (or its centred features when ``p_i < N``), upper triangle computed, mirrored."""
    reps: list[tuple[str, Tensor]] = []
    norms = []
    for x in feats:
        xc = _centre(x.double())
        if xc.shape[1] < xc.shape[0]:  # feature space: ||X~^T X~||_F = ||K~||_F, cheaper when p < N
            reps.append(("f", xc))
            norms.append(float((xc.T @ xc).norm()))
        else:  # centring the features centres the Gram: (HX)(HX)^T = H X X^T H
            g = xc @ xc.T
            reps.append(("g", g))
            norms.append(float(g.norm()))
    n = len(reps)
    out = np.eye(n)
    for i in range(n):
        if norms[i] == 0:
            out[i, i] = 0.0
        for j in range(i + 1, n):
            (ki, a), (kj, b) = reps[i], reps[j]
            if ki == "f" and kj == "f":
                hsic = float((a.T @ b).pow(2).sum())
            else:
                ga = a @ a.T if ki == "f" else a
                gb = b @ b.T if kj == "f" else b
                hsic = float((ga * gb).sum())
            den = norms[i] * norms[j]
            out[i, j] = out[j, i] = min(1.0, max(0.0, hsic / den)) if den > 0 else 0.0
    return out


def importance(matrix: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma, theta)``: gamma_i is row i's sum without the diagonal; ``theta_i = exp(-beta (gamma_i - min))``,
    so max theta = 1 (no underflow of the whole vector for any beta >= 0)."""
    if beta < 0:
        raise qcore.QcoreError(f"ompq_beta={beta} must be >= 0 (a larger beta separates layers more)")
    gamma = matrix.sum(axis=1) - np.diag(matrix)
    logt = -beta * (gamma - gamma.min()) if len(gamma) else gamma
    theta = np.exp(logt)
    if len(theta) and theta.min() < 1e-12:
        log.warning("ompq: beta=%g spreads theta over %.0e..1; layers below ~1e-12 weigh nothing in the solve",
                    beta, theta.min())
    return gamma, theta


def orthogonality(model: nn.Module, names: Sequence[str], batch: Any, forward: Callable[[nn.Module, Any], Any],
                  beta: float, layers: Mapping[str, qcore.LayerInfo] | None = None, samples: int | None = None,
                  outputs: Mapping[str, str] | None = None, inputs: bool = False,
                  features: Mapping[str, Tensor] | None = None) -> Orthogonality:
    """Features of ``names`` on one batch (their outputs, or their inputs with ``inputs=True``), their CKA matrix
    and the importance at ``beta``. ``features`` (``[N, p]`` rows per name, as :func:`layer_features` gives them)
    skips the forward pass: the caller captured them already."""
    feats = dict(features) if features is not None else layer_features(
        model, names, batch, forward, layers=layers, samples=samples, outputs=outputs, inputs=inputs)
    mat = cka_matrix([feats[n] for n in names])
    gamma, theta = importance(mat, beta)
    n = next(iter(feats.values())).shape[0] if feats else 0
    return Orthogonality(list(names), mat, gamma, theta, beta, n)


def downstream_mean(theta: np.ndarray) -> np.ndarray:
    """The seed's objective weight: omega_i = mean of theta_j over j >= i (a layer's bits are taken to matter to
    everything after it, in forward order)."""
    rev = np.cumsum(theta[::-1])[::-1]
    return rev / np.arange(len(theta), 0, -1)
