"""Learned weight rounding for reconstruction: AdaRound on core's uniform grid, a straight-through fallback
for any other :class:`qcore.FakeQuantizer`, and the protocol a quantizer implements to supply its own.

A :class:`WeightRounding` owns the trainable parameters of one weight tensor. During reconstruction the
layer's weight quantizer is replaced by :meth:`WeightRounding.soft` (a differentiable quantized weight);
afterwards :meth:`WeightRounding.final_weight` is written into the layer, chosen so that the layer's own
(unchanged, calibrated) quantizer maps it to the learned grid point: the result stays deployable on the
quantizer's grid.

A quantizer can supply its own rounding (a lattice with a straight-through estimator, a codebook) by defining
``recon_rounding(weight) -> WeightRounding``; :func:`rounding_for` prefers it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import qcore
from qcore.ops import (
    ADAROUND_GAMMA,
    ADAROUND_ZETA,
    adaround_dequantize,
    adaround_fake_quantize,
    qparams_from_range,
    rectified_sigmoid,
)

#: AdaRound's rectified-sigmoid stretch: h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1) (core's constants)
ZETA, GAMMA = ADAROUND_ZETA, ADAROUND_GAMMA

#: ``(quantizer, FP weight) -> WeightRounding``: how :func:`qcore_recon.reconstruct` learns one weight
RoundingFactory = Callable[[qcore.FakeQuantizer, Tensor], "WeightRounding"]


class WeightRounding(nn.Module):
    """The protocol of a learned weight rounding (one weight tensor).

    * :meth:`soft` -- the differentiable quantized weight used while reconstructing;
    * :meth:`regularizer` -- a term added to the loss, annealed by ``beta`` (0 by default);
    * :meth:`final_weight` -- the weight to store in the layer once learning ends; the layer's quantizer
      quantizes it at run time, so it must land on the learned grid points.
    Its ``parameters()`` are what the optimiser updates (at the rounding learning rate).
    """

    def soft(self) -> Tensor:
        raise NotImplementedError

    def regularizer(self, beta: float) -> Tensor:
        return torch.zeros(())

    def final_weight(self) -> Tensor:
        raise NotImplementedError


def broadcast(v: Tensor, ndim: int, axis: int) -> Tensor:
    """Per-channel values ``v`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    if v.numel() == 1:
        return v.reshape([])
    shape = [1] * ndim
    shape[axis] = v.numel()
    return v.reshape(shape)


def inverse_rectified_sigmoid(r: Tensor) -> Tensor:
    """V with h(V) = r for r in [0, 1): V = -log((zeta - gamma) / (r - gamma) - 1)."""
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


class AdaRound(WeightRounding):
    """AdaRound (Nagel et al., 2020) on a :class:`qcore.UniformFakeQuant` weight grid.

    Ŵ = s·(clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z) with the quantizer's scales ``s`` and zero points ``z``
    frozen; V starts where h(V) is the fractional part of W/s, so :meth:`soft` starts at the FP weight (inside
    the clip range). Hard rounding at the end is h = 1[V >= 0]. 0-bit channels keep the quantizer's prune value.
    The arithmetic is core's (:func:`qcore.ops.adaround_fake_quantize`, a torch op a device kernel fuses).
    """

    def __init__(self, quantizer: qcore.UniformFakeQuant, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale, zero, qmin, qmax, bits = quantizer.qparams()
        axis, nd = quantizer.axis, w.dim()
        self.axis = axis % max(nd, 1)
        for key, t in (("scale", scale), ("zero", zero), ("qmin", qmin), ("qmax", qmax), ("bits", bits),
                       ("prune", quantizer.prune_value)):
            self.register_buffer(key, broadcast(t.detach().float().to(w.device), nd, axis))
        x = w / self.scale
        self.register_buffer("floor", torch.floor(x))
        self.v = nn.Parameter(inverse_rectified_sigmoid(x - self.floor))

    def _dequant(self, h: Tensor) -> Tensor:
        return adaround_dequantize(h, self.floor, self.scale, self.zero, self.qmin, self.qmax, self.bits, self.prune)

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def soft(self) -> Tensor:
        per_channel = (t.reshape(-1) for t in (self.scale, self.zero, self.qmin, self.qmax, self.bits, self.prune))
        return adaround_fake_quantize(self.v, self.floor, *per_channel, self.axis)

    def regularizer(self, beta: float) -> Tensor:
        """Σ (1 − |2h(V) − 1|^beta): zero only when every h is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def hard_rounding(self) -> Tensor:
        """h = 1[V >= 0], the rounding that is kept."""
        return (self.v.detach() >= 0).float()

    def final_weight(self) -> Tensor:
        with torch.no_grad():
            return self._dequant(self.hard_rounding())


class STERounding(WeightRounding):
    """Any :class:`qcore.FakeQuantizer`: learn an offset of at most one grid step per weight through the
    quantizer's own ``quantize`` and its straight-through gradient.

    W' = W + step·clip(δ, −1, 1), δ from 0; the step of each row is estimated from the quantized weight (its range
    over ``2^bits − 1`` levels), so the learning rate means the same on every grid, as AdaRound's does. W' is
    stored and the quantizer quantizes it at run time.
    """

    def __init__(self, quantizer: qcore.FakeQuantizer, weight: Tensor) -> None:
        super().__init__()
        self.quantizer = [quantizer]  # a list: not a submodule, its state is not ours to train
        w = weight.detach().clone()
        self.register_buffer("w", w)
        with torch.no_grad():
            rows = quantizer.rows_of(quantizer.quantize(w))
            levels = torch.clamp(torch.exp2(quantizer.row_bits().to(w.device)) - 1, min=1)
            step = (rows.amax(dim=1) - rows.amin(dim=1)) / levels
            step = torch.where(step > 0, step, rows.abs().amax(dim=1).clamp(min=1e-8))
        self.register_buffer("step", broadcast(quantizer.channel_values(step), w.dim(), quantizer.axis))
        self.delta = nn.Parameter(torch.zeros_like(w))

    def weight(self) -> Tensor:
        return self.w + self.step * torch.clamp(self.delta, -1.0, 1.0)

    def soft(self) -> Tensor:
        return self.quantizer[0].quantize(self.weight())

    def final_weight(self) -> Tensor:
        with torch.no_grad():
            return self.weight()


def rounding_for(quantizer: qcore.FakeQuantizer, weight: Tensor) -> WeightRounding:
    """The rounding a quantizer learns with: its own ``recon_rounding(weight)`` if it has one, AdaRound on
    core's uniform grid (:func:`plain_uniform`), else a straight-through rounding through its ``quantize``."""
    own = getattr(quantizer, "recon_rounding", None)
    if callable(own):
        rounding = own(weight)
        if not isinstance(rounding, WeightRounding):
            raise qcore.QcoreError(f"{type(quantizer).__name__}.recon_rounding() returned {type(rounding).__name__}, "
                                   "not a qcore_recon.WeightRounding")
        return rounding
    if plain_uniform(quantizer):
        return AdaRound(quantizer, weight)
    return STERounding(quantizer, weight)


def plain_uniform(quantizer: qcore.FakeQuantizer) -> bool:
    """Whether ``quantizer`` quantizes exactly as core's uniform grid does: a :class:`qcore.UniformFakeQuant` whose
    ``quantize`` is not overridden (a subclass such as RDOQ's dead-zone grid maps values differently, so AdaRound's
    and LSQ's own uniform arithmetic would learn for a grid that is not deployed)."""
    return (isinstance(quantizer, qcore.UniformFakeQuant)
            and type(quantizer).quantize is qcore.UniformFakeQuant.quantize)


def scale_of(quantizer: qcore.UniformFakeQuant) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(scale, zero, qmin, qmax)`` of a uniform quantizer's calibrated range."""
    return qparams_from_range(quantizer.lo, quantizer.hi, quantizer.row_bits().to(quantizer.lo.device),
                              quantizer.spec.symmetric)


def grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward pass, its gradient times ``g`` in the backward pass (LSQ's gradient scaling)."""
    y = x * g
    return (x - y).detach() + y


def lsq_grad_factor(numel: int, qmax: float) -> float:
    """LSQ's step-size gradient scale 1/sqrt(numel · qmax)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1.0))
