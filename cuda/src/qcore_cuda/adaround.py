"""Kernel 3b: AdaRound's soft-quantized weight for block reconstruction, forward and backward to ``V``, fused.

Computes what ``qcore::adaround_fake_quantize`` computes (:func:`qcore.ops.adaround_fake_quantize` and
:func:`qcore.ops.adaround_fake_quantize_grad`), in one pass over ``V`` and ``floor(W / s)``:

* forward: ``y = sigmoid(V)``, ``h = clamp(y * (ZETA - GAMMA) + GAMMA, 0, 1)``,
  ``q = clamp(floor + h + zp, qmin, qmax)``, ``(q - zp) * s``, the prune value on 0-bit channels;
* backward: 0 on 0-bit channels, ``* s``, the grid clamp's gradient (0 outside, half on one end), h's clamp
  (passes where ``0 <= u <= 1``), ``* (ZETA - GAMMA)``, ``* (1 - y) * y``.

Every operation after the sigmoid is the reference's, in float32 and in its order. The sigmoid is
``1 / (1 + exp(-V))`` with the device's ``exp``, which may differ from torch's CPU ``exp`` in the last bit, so
forward outputs equal the reference's bit for bit where ``sigmoid(V)`` does (the tests measure how often) and
otherwise within one ulp of ``h`` times the scale; the backward, which multiplies by the sigmoid, is within
float32 rounding.

Set ``TRITON_INTERPRET=1`` before this module is imported to run it on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcore.ops import ADAROUND_GAMMA, ADAROUND_ZETA
from qcore_cuda.fake_quant import BLOCK, _layout, _load, _per_channel
from qcore_cuda.fake_quant import supports as _supports

__all__ = ["supports", "adaround_fake_quantize", "adaround_fake_quantize_grad", "interpreted"]

_STRETCH: tl.constexpr = tl.constexpr(ADAROUND_ZETA - ADAROUND_GAMMA)
_GAMMA: tl.constexpr = tl.constexpr(ADAROUND_GAMMA)


@triton.jit
def _soft(v, floor, zp, qmin, qmax):
    """``(y, u, t)``: the sigmoid, the stretched sigmoid before its clamp, and ``floor + h + zp``."""
    y = 1.0 / (1.0 + tl.exp(-v))
    u = y * _STRETCH + _GAMMA
    h = tl.minimum(tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    t = floor + h + zp
    return y, u, t


@triton.jit
def _adaround_fwd(v_ptr, floor_ptr, out_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, prune_ptr,
                  n, inner, channels, BLOCK: tl.constexpr):
    offs, live, v, s, zp, qmin, qmax, bits = _load(v_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n,
                                                   inner, channels, BLOCK)
    floor = tl.load(floor_ptr + offs, mask=live, other=0.0)
    prune = tl.load(prune_ptr + (offs // inner) % channels, mask=live, other=0.0)
    _y, _u, t = _soft(v, floor, zp, qmin, qmax)
    q = tl.minimum(tl.maximum(t, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, propagate_nan=tl.PropagateNan.ALL)
    out = tl.where(bits == 0.0, prune, (q - zp) * s)
    tl.store(out_ptr + offs, out, mask=live)


@triton.jit
def _adaround_bwd(grad_ptr, v_ptr, floor_ptr, gv_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr,
                  n, inner, channels, BLOCK: tl.constexpr):
    offs, live, v, s, zp, qmin, qmax, bits = _load(v_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n,
                                                   inner, channels, BLOCK)
    floor = tl.load(floor_ptr + offs, mask=live, other=0.0)
    g = tl.load(grad_ptr + offs, mask=live, other=0.0)
    y, u, t = _soft(v, floor, zp, qmin, qmax)
    g = tl.where(bits == 0.0, 0.0, g)
    g = g * s
    outside = (t < qmin) | (t > qmax)
    half = (t == qmin) ^ (t == qmax)
    g = tl.where(outside, 0.0, tl.where(half, g * 0.5, g))
    g = tl.where((u >= 0.0) & (u <= 1.0), g, 0.0)
    g = g * _STRETCH
    tl.store(gv_ptr + offs, g * (1.0 - y) * y, mask=live)


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_adaround_fwd, InterpretedFunction)


def supports(v: Tensor, floor: Tensor, *params: Tensor) -> bool:
    """Float32 ``V`` and ``floor`` of one shape, float32 1-D parameters (per channel or one value)."""
    return (v.dtype == torch.float32 and floor.dtype == torch.float32 and floor.shape == v.shape
            and _supports(v, *params))


def adaround_fake_quantize(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                           bits: Tensor, prune_value: Tensor, axis: int) -> Tensor:
    """The forward kernel: :func:`qcore.ops.adaround_fake_quantize` for inputs :func:`supports` accepts."""
    inner, channels = _layout(v, axis)
    vc, fc = v.contiguous(), floor.contiguous()
    params = _per_channel((scale, zero_point, qmin, qmax, bits, prune_value), channels)
    out = torch.empty(vc.shape, dtype=v.dtype, device=v.device)
    n = vc.numel()
    if n:
        _adaround_fwd[(triton.cdiv(n, BLOCK),)](vc, fc, out, *params, n, inner, channels, BLOCK=BLOCK)
    return out if v.is_contiguous() else torch.empty_like(v).copy_(out)


def adaround_fake_quantize_grad(grad: Tensor, v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor,
                                qmin: Tensor, qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """The backward kernel: :func:`qcore.ops.adaround_fake_quantize_grad` for inputs :func:`supports` accepts."""
    inner, channels = _layout(v, axis)
    vc, fc, gc = v.contiguous(), floor.contiguous(), grad.to(v.dtype).contiguous()
    params = _per_channel((scale, zero_point, qmin, qmax, bits), channels)
    out = torch.empty(vc.shape, dtype=v.dtype, device=v.device)
    n = vc.numel()
    if n:
        _adaround_bwd[(triton.cdiv(n, BLOCK),)](gc, vc, fc, out, *params, n, inner, channels, BLOCK=BLOCK)
    return out if v.is_contiguous() else torch.empty_like(v).copy_(out)
