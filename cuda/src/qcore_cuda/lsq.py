"""Kernel 3a: LSQ's fake quantization for block reconstruction, forward and the backward to ``x`` and the step.

Computes what ``qcore::lsq_fake_quantize`` computes (:func:`qcore.ops.lsq_fake_quantize`):

* forward: exactly :func:`qcore.ops.fake_quantize_channels` (LSQ only adds a gradient), so it is kernel 1's
  forward kernel (:func:`qcore_cuda.fake_quant.fake_quantize_channels`);
* backward: one pass over ``x`` and the output gradient gives ``grad_x`` and, per element, the two terms of the
  step's gradient in :func:`qcore.ops.lsq_fake_quantize_grad`'s operations and order (``g * (q - zp)`` from the
  product, ``-g' * ((x / s) / s)`` from the division, ``g'`` being the gradient after the clamp); each term is
  summed per channel with torch's ``sum_to_size`` as the reference does, then the two are added. ``grad_x`` and
  the per-element terms are bit for bit the reference's; the per-channel sums are torch's on the device.

Set ``TRITON_INTERPRET=1`` before this module is imported to run it on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcore_cuda.fake_quant import BLOCK, _grid_value, _layout, _load, _per_channel
from qcore_cuda.fake_quant import fake_quantize_channels as lsq_fake_quantize
from qcore_cuda.fake_quant import supports as _supports

__all__ = ["supports", "lsq_fake_quantize", "lsq_fake_quantize_grad", "interpreted"]


@triton.jit
def _lsq_bwd(grad_ptr, x_ptr, gx_ptr, gs_out_ptr, gs_div_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr,
             n, inner, channels, BLOCK: tl.constexpr):
    offs, live, x, s, zp, qmin, qmax, bits = _load(x_ptr, scale_ptr, zero_ptr, qmin_ptr, qmax_ptr, bits_ptr, n,
                                                   inner, channels, BLOCK)
    g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    v = _grid_value(x, s, zp)
    q = tl.minimum(tl.maximum(v, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, propagate_nan=tl.PropagateNan.ALL)
    g = tl.where(bits == 0.0, 0.0, g)
    gs_out = g * (q - zp)
    outside = (v < qmin) | (v > qmax)
    half = (v == qmin) ^ (v == qmax)
    gv = g * s
    gv = tl.where(outside, 0.0, tl.where(half, gv * 0.5, gv))
    gs_div = -gv * tl.div_rn(tl.div_rn(x, s), s)
    tl.store(gx_ptr + offs, tl.div_rn(gv, s).to(gx_ptr.dtype.element_ty), mask=live)
    tl.store(gs_out_ptr + offs, gs_out, mask=live)
    tl.store(gs_div_ptr + offs, gs_div, mask=live)


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lsq_bwd, InterpretedFunction)


def supports(x: Tensor, *params: Tensor) -> bool:
    """Float32 ``x`` and float32 1-D parameters (per channel or one value): the kernels reproduce the reference."""
    return x.dtype == torch.float32 and _supports(x, *params)


def lsq_fake_quantize_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                           bits: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """The backward kernel: :func:`qcore.ops.lsq_fake_quantize_grad` for inputs :func:`supports` accepts."""
    inner, channels = _layout(x, axis)
    xc, gc = x.contiguous(), grad.to(x.dtype).contiguous()
    params = _per_channel((scale, zero_point, qmin, qmax, bits), channels)
    gx = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    gs_out, gs_div = torch.empty_like(gx), torch.empty_like(gx)
    n = xc.numel()
    if n:
        _lsq_bwd[(triton.cdiv(n, BLOCK),)](gc, xc, gx, gs_out, gs_div, *params, n, inner, channels, BLOCK=BLOCK)
    # the step's shape against x, as the reference broadcasts it; each term summed as autograd sums it
    shape = [1] * x.dim()
    if scale.numel() > 1:
        shape[axis % x.dim()] = scale.numel()
    gs = gs_out.sum_to_size(shape) + gs_div.sum_to_size(shape)
    return (gx if x.is_contiguous() else torch.empty_like(x).copy_(gx)), gs.reshape(scale.shape)
