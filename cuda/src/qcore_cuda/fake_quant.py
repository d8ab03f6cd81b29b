"""Kernel 1: per-channel / per-group mixed-bit fake quantization in Triton, forward and straight-through backward.

The kernels compute exactly what :func:`qcore.ops.fake_quantize_channels` (forward) and
:func:`qcore.ops.fake_quantize_channels_grad` (backward) compute, operation by operation in float32:

* forward: ``t = x / s`` (IEEE division), ``v = (t + (round(t) - t)) + zp`` (round half to even, as
  ``torch.round``; the reference's straight-through rounding), ``q = clamp(v, qmin, qmax)``,
  ``out = (q - zp) * s``, and the prune value where the channel has 0 bits;
* backward: ``g = 0`` on 0-bit channels, ``g = g * s``, then 0 where ``v`` is outside ``[qmin, qmax]``, half
  where it lands on exactly one end (torch's clamp splits a tie with the bound), and ``g / s``.

Parameters are per channel along ``axis`` (per-group values repeated over each group's channels, as
``UniformFakeQuant.qparams`` gives them): each element reads the parameters of its channel
``(i // inner) % channels`` of the flattened, contiguous tensor, so one launch covers per-tensor, per-channel
and per-group layouts with any bit-width 0..16 per channel. Memory traffic: one read of ``x`` and one write of
the output (plus one read of the gradient in backward); the per-channel parameters stay in cache.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors with Triton's
interpreter (what the tests do without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK", "supports", "fake_quantize_channels", "fake_quantize_channels_grad", "interpreted"]

#: elements per program
BLOCK = 1024

_IO_DTYPES = (torch.float32, torch.float16)


@triton.jit
def _round_half_even(t):
    """``torch.round`` in float32: to nearest, ties to even (``t - floor(t)`` is exact, so the tie test is)."""
    f = tl.floor(t)
    d = t - f
    r = tl.where(d > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d == 0.5) & odd, f + 1.0, r)


@triton.jit
def _grid_value(x, s, zp):
    """``round(x / s) + zp`` as the reference computes it (straight-through rounding, then the zero point)."""
    t = tl.div_rn(x, s)
    return t + (_round_half_even(t) - t) + zp


@triton.jit
def _load(x_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n, inner, channels, BLOCK: tl.constexpr):
    """This program's offsets, their mask, ``x`` in float32 and each element's channel parameters."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    c = (offs // inner) % channels
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + c, mask=live, other=1.0)
    zp = tl.load(zero_ptr + c, mask=live, other=0.0)
    qmin = tl.load(qmin_ptr + c, mask=live, other=0.0)
    qmax = tl.load(qmax_ptr + c, mask=live, other=0.0)
    bits = tl.load(bits_ptr + c, mask=live, other=0.0)
    return offs, live, x, s, zp, qmin, qmax, bits


@triton.jit
def _fake_quant_fwd(x_ptr, out_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, prune_ptr,
                    n, inner, channels, BLOCK: tl.constexpr):
    offs, live, x, s, zp, qmin, qmax, bits = _load(x_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n,
                                                   inner, channels, BLOCK)
    prune = tl.load(prune_ptr + (offs // inner) % channels, mask=live, other=0.0)
    v = _grid_value(x, s, zp)
    q = tl.minimum(tl.maximum(v, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, propagate_nan=tl.PropagateNan.ALL)
    out = (q - zp) * s
    out = tl.where(bits == 0.0, prune, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _fake_quant_bwd(grad_ptr, x_ptr, out_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr,
                    n, inner, channels, BLOCK: tl.constexpr):
    offs, live, x, s, zp, qmin, qmax, bits = _load(x_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n,
                                                   inner, channels, BLOCK)
    g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    v = _grid_value(x, s, zp)
    outside = (v < qmin) | (v > qmax)  # false for NaN: torch's clamp passes a NaN's gradient
    half = (v == qmin) ^ (v == qmax)
    g = tl.where(bits == 0.0, 0.0, g)
    g = g * s
    g = tl.where(outside, 0.0, tl.where(half, g * 0.5, g))
    tl.store(out_ptr + offs, tl.div_rn(g, s).to(out_ptr.dtype.element_ty), mask=live)


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fake_quant_fwd, InterpretedFunction)


def supports(x: Tensor, *params: Tensor) -> bool:
    """Whether the kernels compute exactly what the reference computes for these inputs.

    They work in float32 on float32 parameters. A float32 ``x`` always qualifies; a float16 ``x`` only with
    per-channel parameters (more than one value), because with a single value the reference computes in
    float16 (a 0-dim float32 scale does not promote a float16 tensor).
    """
    if x.dtype not in _IO_DTYPES or any(p.dtype != torch.float32 or p.dim() != 1 for p in params):
        return False
    return x.dtype == torch.float32 or all(p.numel() > 1 for p in params)


def _layout(x: Tensor, axis: int) -> tuple[int, int]:
    """``(inner, channels)`` of a contiguous ``x`` with channels along ``axis``."""
    if x.dim() == 0:
        return 1, 1
    axis %= x.dim()
    return max(int(torch.Size(x.shape[axis + 1:]).numel()), 1), x.shape[axis]


def _per_channel(params: tuple[Tensor, ...], channels: int) -> list[Tensor]:
    return [p.expand(channels).contiguous() if p.numel() == 1 else p.contiguous() for p in params]


def fake_quantize_channels(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                           prune_value: Tensor, axis: int) -> Tensor:
    """The forward kernel: :func:`qcore.ops.fake_quantize_channels` for inputs :func:`supports` accepts."""
    inner, channels = _layout(x, axis)
    xc = x.contiguous()
    params = _per_channel((scale, zero_point, qmin, qmax, bits, prune_value), channels)
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        _fake_quant_fwd[(triton.cdiv(n, BLOCK),)](xc, out, *params, n, inner, channels, BLOCK=BLOCK)
    return out if x.is_contiguous() else torch.empty_like(x).copy_(out)


def fake_quantize_channels_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                                qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """The backward kernel: :func:`qcore.ops.fake_quantize_channels_grad` for inputs :func:`supports` accepts."""
    inner, channels = _layout(x, axis)
    xc, gc = x.contiguous(), grad.to(x.dtype).contiguous()
    params = _per_channel((scale, zero_point, qmin, qmax, bits), channels)
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        _fake_quant_bwd[(triton.cdiv(n, BLOCK),)](gc, xc, out, *params, n, inner, channels, BLOCK=BLOCK)
    return out if x.is_contiguous() else torch.empty_like(x).copy_(out)
