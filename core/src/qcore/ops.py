"""Fake-quantization arithmetic: the CPU reference every fast kernel is checked against.

Grids (``b`` bits, clip range ``[lo, hi]``):

* symmetric: integers ``[-2^(b-1), 2^(b-1) - 1]``, no zero point, ``scale = max(|lo|, |hi|) / (2^(b-1) - 1)``
  (for ``b = 1`` the levels are ``{-scale, 0}`` with ``scale = max(|lo|, |hi|)``);
* affine (GEMMLOWP): integers ``[0, 2^b - 1]``, ``scale = (hi - lo) / (2^b - 1)`` with the range widened to
  include 0 and an integer zero point, so that 0.0 is exactly representable;
* ``b = 0``: the channel or group is pruned and every value becomes a constant (``prune_value``; zero unless
  a method asks for the channel mean, as ACIQ does).

Gradients are straight-through: ``round`` passes the gradient unchanged and values clipped by the range get
zero gradient (the usual clipped STE). Every parameter may be a tensor broadcastable against ``x``, so one
call handles per-tensor, per-channel and per-group scales and per-group bit-widths.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "int_range", "qparams_from_range", "fake_quantize", "quantize_error"]

_EPS = 1e-12


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even, as ``torch.round``) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def int_range(bits: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Integer bounds ``(qmin, qmax)`` of the grid for each entry of ``bits`` (float tensors)."""
    bits = bits.to(torch.float32)
    if symmetric:
        half = torch.pow(2.0, torch.clamp(bits - 1, min=0))
        return torch.where(bits > 0, -half, torch.zeros_like(half)), torch.where(bits > 0, half - 1, 0 * half)
    return torch.zeros_like(bits), torch.pow(2.0, bits) - 1


def qparams_from_range(lo: Tensor, hi: Tensor, bits: Tensor, symmetric: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scale, zero point, qmin and qmax of the grid that covers ``[lo, hi]`` with ``bits`` bits.

    All inputs broadcast together; the outputs have their common shape. Pruned entries (``bits == 0``) get
    scale 1 and an empty range; :func:`fake_quantize` replaces them with the prune value.
    """
    lo, hi = torch.broadcast_tensors(lo.float(), hi.float())
    bits = torch.broadcast_to(bits.float(), lo.shape)
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        clip = torch.maximum(lo.abs(), hi.abs())
        scale = clip / torch.clamp(qmax, min=1.0)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (hi - lo) / torch.clamp(qmax, min=1.0)
        scale = torch.clamp(scale, min=_EPS)
        zero = torch.clamp(torch.round(-lo / scale), torch.zeros_like(qmax), qmax)
    scale = torch.where(bits > 0, torch.clamp(scale, min=_EPS), torch.ones_like(scale))
    return scale, zero, qmin, qmax


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                  bits: Tensor | None = None, prune_value: Tensor | float = 0.0) -> Tensor:
    """Quantize and dequantize ``x``: ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    :param bits: optional bit-widths broadcastable to ``x``; where 0, the output is ``prune_value``.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    out = (q - zero_point) * scale
    if bits is not None:
        pv = torch.as_tensor(prune_value, dtype=out.dtype, device=out.device)
        out = torch.where(bits == 0, pv, out)
    return out


def quantize_error(x: Tensor, lo: Tensor, hi: Tensor, bits: Tensor, symmetric: bool, dim: int = -1,
                   out: Tensor | None = None) -> Tensor:
    """Mean squared error of fake-quantizing ``x`` on ``[lo, hi]``, reduced over ``dim`` (no gradient).

    The same arithmetic as :func:`fake_quantize`, done in place on one buffer (``out``, of the broadcast shape
    of ``x`` and the scales, when the caller reuses one): range searches call this hundreds of times per layer.
    """
    with torch.no_grad():
        scale, zero, qmin, qmax = qparams_from_range(lo, hi, bits, symmetric)
        q = torch.div(x, scale, out=out).round_()
        if not symmetric:
            q.add_(zero)
        # q has the broadcast shape of x and scale, which covers qmin's; max/min beat a tensor clamp 3x
        torch.maximum(q, qmin, out=q)
        torch.minimum(q, qmax, out=q)
        if not symmetric:
            q.sub_(zero)
        return q.mul_(scale).sub_(x).square_().mean(dim=dim)
