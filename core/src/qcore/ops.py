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

Kernels: :func:`fake_quantize_channels` is the entry point modules use. It calls the torch op
``qcore::fake_quantize_channels`` (and its backward ``qcore::fake_quantize_channels_backward``), whose
implementation on every device is this module's reference; a distribution such as ``qcore-cuda`` registers a
faster implementation for one device (``torch.library.register_kernel``), checked against the reference in its
tests. ``QCORE_KERNELS=reference`` skips the op and calls the reference directly.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from qcore._errors import QcoreError

__all__ = ["round_ste", "int_range", "qparams_from_range", "fake_quantize", "fake_quantize_grad",
           "fake_quantize_channels", "fake_quantize_channels_grad", "quantize_error", "KERNELS_ENV",
           "kernels_mode"]

#: Environment variable choosing the kernels: ``auto`` (default: the torch op, so a registered device kernel
#: is used) or ``reference`` (always the reference arithmetic of this module, no op).
KERNELS_ENV = "QCORE_KERNELS"

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


def _clamp_grad(g: Tensor, v: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """The gradient torch's ``clamp(v, qmin, qmax)`` (tensor bounds) passes to ``v``: 0 outside, half on exactly
    one end, ``g`` inside (see :func:`fake_quantize_grad`)."""
    outside = (v < qmin) | (v > qmax)  # a NaN is not outside: torch's clamp passes its gradient
    half = (v == qmin) ^ (v == qmax)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(outside, zero, torch.where(half, g * 0.5, g))


def fake_quantize_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                       bits: Tensor | None = None) -> Tensor:
    """The gradient of ``fake_quantize(x, ...).to(x.dtype)`` with respect to ``x``, given the output's ``grad``.

    The straight-through estimator written out: zero where ``bits == 0`` or where ``v = round(x / scale) + zp``
    falls outside ``[qmin, qmax]``, ``grad`` strictly inside, and half of ``grad`` where ``v`` lands exactly on
    ``qmin`` or ``qmax`` (torch's clamp splits the gradient of a tie between the value and the bound). It
    repeats autograd's own operations on the reference, in the same order and dtypes (``grad * scale`` from the
    product, the clamp's weights, ``/ scale`` from the division), so the result is bit-for-bit the one
    ``backward()`` through :func:`fake_quantize` gives; kernels reproduce this function.

    .. versionadded:: 0.1 (plugin API 1)
    """
    with torch.no_grad():
        v = round_ste(x / scale) + zero_point
        g = grad.to(v.dtype)
        if bits is not None:
            g = torch.where(bits == 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
        return (_clamp_grad(g * scale, v, qmin, qmax) / scale).to(x.dtype)


# -- the torch op: one entry point that devices can implement --------------------------------------------------

def _channel_shaped(v: Tensor, ndim: int, axis: int) -> Tensor:
    """A per-channel vector (or one value) shaped to broadcast against an ``ndim``-dimensional tensor whose
    channels lie along ``axis``; a single value becomes a 0-dim tensor (a per-tensor parameter)."""
    if v.numel() == 1:
        return v.reshape([])
    shape = [1] * ndim
    shape[axis] = v.numel()
    return v.reshape(shape)


def _channels_reference(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                        prune_value: Tensor, axis: int) -> Tensor:
    p = [_channel_shaped(t, x.dim(), axis) for t in (scale, zero_point, qmin, qmax, bits, prune_value)]
    return fake_quantize(x, p[0], p[1], p[2], p[3], bits=p[4], prune_value=p[5]).to(x.dtype)


@torch.library.custom_op("qcore::fake_quantize_channels", mutates_args=())
def _fq_channels_op(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                    prune_value: Tensor, axis: int) -> Tensor:
    """Fake quantization with one set of parameters per channel of ``x`` along ``axis`` (1-D tensors of
    ``x.shape[axis]`` values, or of one value for the whole tensor); the output has ``x``'s shape and dtype.
    Implementation on every device: :func:`fake_quantize` (the reference)."""
    return _channels_reference(x, scale, zero_point, qmin, qmax, bits, prune_value, axis)


@_fq_channels_op.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
      prune_value: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x)


def fake_quantize_channels_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                                qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """:func:`fake_quantize_grad` with the per-channel parameters of :func:`fake_quantize_channels`: the
    reference gradient with respect to ``x`` that a device kernel for the op's backward must reproduce.

    .. versionadded:: 0.1 (plugin API 1)
    """
    p = [_channel_shaped(t, x.dim(), axis % max(x.dim(), 1)) for t in (scale, zero_point, qmin, qmax, bits)]
    return fake_quantize_grad(grad, x, p[0], p[1], p[2], p[3], bits=p[4])


@torch.library.custom_op("qcore::fake_quantize_channels_backward", mutates_args=())
def _fq_channels_backward_op(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                             qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """The straight-through gradient of ``qcore::fake_quantize_channels`` with respect to ``x``.
    Implementation on every device: :func:`fake_quantize_channels_grad` (the reference)."""
    return fake_quantize_channels_grad(grad, x, scale, zero_point, qmin, qmax, bits, axis)


@_fq_channels_backward_op.register_fake
def _(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
      axis: int) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    x, scale, zero_point, qmin, qmax, bits, _prune_value, axis = inputs
    ctx.save_for_backward(x, scale, zero_point, qmin, qmax, bits)
    ctx.axis = axis


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    if any(ctx.needs_input_grad[1:]):
        raise QcoreError("qcore::fake_quantize_channels differentiates only x; parameters that need a gradient "
                         "go through the reference (qcore.ops.fake_quantize_channels does this)")
    x, scale, zero_point, qmin, qmax, bits = ctx.saved_tensors
    gx = torch.ops.qcore.fake_quantize_channels_backward(grad, x, scale, zero_point, qmin, qmax, bits, ctx.axis)
    return gx, None, None, None, None, None, None, None


_fq_channels_op.register_autograd(_backward, setup_context=_setup_context)


def kernels_mode(kernels: str | None = None) -> str:
    """The kernel choice in force: ``kernels`` when given, else the ``QCORE_KERNELS`` environment variable, else
    ``"auto"``; a :class:`qcore.QcoreError` for anything but ``"auto"`` or ``"reference"``. Every function that
    can run through a torch op (here, in :mod:`qcore.packing` and in plugins with ops of their own) asks this.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    mode = kernels or os.environ.get(KERNELS_ENV, "auto") or "auto"
    if mode not in ("auto", "reference"):
        raise QcoreError(f"{KERNELS_ENV}={mode!r} is not a kernel choice; use 'auto' (the default) or 'reference'")
    return mode


def fake_quantize_channels(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                           prune_value: Tensor, axis: int, *, kernels: str | None = None) -> Tensor:
    """Fake-quantize ``x`` with per-channel parameters: :func:`fake_quantize` through the torch op.

    Every parameter is a 1-D tensor with one value per channel of ``x`` along ``axis`` (per-group parameters
    repeated over each group's channels), or a single value for the whole tensor; ``bits == 0`` channels become
    ``prune_value``. The output has ``x``'s shape and dtype, and equals ``fake_quantize(...).to(x.dtype)`` on
    the parameters shaped to broadcast, bit for bit, as does its gradient with respect to ``x``.

    Goes through ``qcore::fake_quantize_channels`` (so a device kernel registered for it runs), except when
    ``kernels`` (default: the ``QCORE_KERNELS`` environment variable, else ``"auto"``) is ``"reference"`` or a
    parameter needs a gradient (the op differentiates only ``x``): then the reference runs directly. A device
    kernel falls back to the reference with ``kernels="reference"`` for inputs it does not handle.

    .. versionadded:: 0.1 (plugin API 1)
    """
    axis = axis % max(x.dim(), 1)
    params = (scale, zero_point, qmin, qmax, bits, prune_value)
    if kernels_mode(kernels) == "reference" or any(t.requires_grad for t in params):
        return _channels_reference(x, *params, axis)
    return torch.ops.qcore.fake_quantize_channels(x, *params, axis)


def quantize_error(x: Tensor, lo: Tensor, hi: Tensor, bits: Tensor, symmetric: bool, dim: int = -1,
                   out: Tensor | None = None, p: float = 2.0, weights: Tensor | None = None) -> Tensor:
    """Mean squared error of fake-quantizing ``x`` on ``[lo, hi]``, reduced over ``dim`` (no gradient);
    with ``p`` other than 2, the mean of ``|error|^p`` (BRECQ's range search uses p = 2.4); with ``weights``
    (broadcastable to the error, non-negative), the mean of ``weights * |error|^p`` (each value's error counted
    that much, e.g. the second moment of the input a weight multiplies). ``weights=None`` is the unweighted
    arithmetic unchanged.

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
        err = q.mul_(scale).sub_(x)
        err = err.square_() if p == 2.0 else err.abs_().pow_(p)
        if weights is not None:
            err.mul_(weights)
        return err.mean(dim=dim)


# -- candidate quantization for rate-distortion curves ---------------------------------------------------------

__all__ += ["quantize_rows", "candidate_quantize", "CANDIDATE_STEPS", "CANDIDATE_LOWEST"]

#: the MSE clip search of :func:`candidate_quantize`: :func:`qcore.ranges.mse_range`'s defaults
CANDIDATE_STEPS, CANDIDATE_LOWEST = 100, 0.05


def quantize_rows(rows: Tensor, lo: Tensor, hi: Tensor, bits: Tensor, symmetric: bool) -> Tensor:
    """Every row of ``rows`` (``[R, N]``) fake-quantized at every bit-width of ``bits`` (``[B]``) on its own clip
    range: ``lo``/``hi`` are ``[B, R]``; the result is ``[B, R, N]`` in ``rows``' dtype, 0-bit candidates 0.

    The arithmetic of :func:`fake_quantize` with the grid of :func:`qparams_from_range`, one set of parameters
    per (bit-width, row): what a per-group :class:`~qcore.UniformFakeQuant` deploys for those ranges.

    .. versionadded:: 0.1 (plugin API 1)
    """
    nbits = bits.to(device=lo.device, dtype=torch.float32)[:, None].expand(lo.shape)
    scale, zero, qmin, qmax = (t[..., None] for t in qparams_from_range(lo, hi, nbits, symmetric))
    out = fake_quantize(rows.unsqueeze(0), scale, zero, qmin, qmax, bits=nbits[..., None], prune_value=0.0)
    return out.to(rows.dtype)


def _candidates_reference(rows: Tensor, bits: Tensor, symmetric: bool, steps: int, lowest: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    from qcore.ranges import mse_range  # qcore.ranges builds on this module

    n_bits, n_rows = bits.numel(), rows.shape[0]
    if n_bits == 0:
        empty = rows.new_empty((0, n_rows), dtype=torch.float32)
        return empty, empty.clone(), rows.new_empty((0, *rows.shape))
    # every bit-width's rows stacked into one search, as one call of the range estimator would see them
    row_bits = bits.to(device=rows.device, dtype=torch.float32).repeat_interleave(n_rows)
    lo, hi = mse_range(torch.cat([rows] * n_bits), row_bits, symmetric, steps=steps, lowest=lowest)
    lo, hi = lo.reshape(n_bits, n_rows), hi.reshape(n_bits, n_rows)
    return lo, hi, quantize_rows(rows, lo, hi, bits, symmetric)


@torch.library.custom_op("qcore::candidate_quantize", mutates_args=())
def _candidates_op(rows: Tensor, bits: Tensor, symmetric: bool, steps: int, lowest: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Every (bit-width, row) candidate of a layer: MSE clip search and fake quantization (see
    :func:`candidate_quantize`). Implementation on every device: the reference."""
    return _candidates_reference(rows, bits, symmetric, steps, lowest)


@_candidates_op.register_fake
def _(rows: Tensor, bits: Tensor, symmetric: bool, steps: int, lowest: float) -> tuple[Tensor, Tensor, Tensor]:
    n_bits, n_rows = bits.shape[0], rows.shape[0]
    lo = rows.new_empty((n_bits, n_rows), dtype=torch.float32)
    return lo, torch.empty_like(lo), rows.new_empty((n_bits, *rows.shape))


def candidate_quantize(rows: Tensor, bits: Tensor, symmetric: bool, steps: int = CANDIDATE_STEPS,
                       lowest: float = CANDIDATE_LOWEST, *, kernels: str | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """All quantization candidates of a layer in one call: for every bit-width ``b`` of ``bits`` (``[B]``) and
    every row of ``rows`` (``[R, N]``: a channel group's values, as :meth:`UniformFakeQuant.rows_of
    <qcore.UniformFakeQuant.rows_of>` gives them), the MSE clip search and the quantized row.

    Returns ``(lo, hi, q)``: ``lo``/``hi`` ``[B, R]`` (float32) are the clip ranges that
    :func:`qcore.ranges.mse_range` chooses (``steps`` shrink factors of each row's min/max in ``[lowest, 1]``;
    ``steps=1, lowest=1`` is the plain min/max range) on the rows of all bit-widths stacked, and ``q``
    ``[B, R, N]`` is :func:`quantize_rows` on those ranges. This is what an RD curve needs per layer
    (qcore-rdoq's candidates); rows are independent, so each result equals what the range estimator and the
    deployed quantizer give that row alone.

    Goes through the torch op ``qcore::candidate_quantize`` (a device kernel registered for it runs: one launch
    for every candidate, search included), unless ``kernels`` (default ``QCORE_KERNELS``) is ``"reference"``.
    A kernel's clip choice can differ from the reference's only where two shrink factors' errors are equal
    within float32 rounding (the error is a sum whose order is the device's); ``q`` on a given range is exact.

    .. versionadded:: 0.1 (plugin API 1)
    """
    if rows.dim() != 2 or bits.dim() != 1:
        raise QcoreError(f"candidate_quantize takes rows [R, N] and bits [B]; got shapes {tuple(rows.shape)} and "
                         f"{tuple(bits.shape)}: reshape them (UniformFakeQuant.rows_of gives the rows)")
    if steps < 1 or not 0.0 < lowest <= 1.0:
        raise QcoreError(f"candidate_quantize: steps={steps}, lowest={lowest} is not a clip search; use steps >= 1 "
                         "and 0 < lowest <= 1")
    if kernels_mode(kernels) == "reference":
        return _candidates_reference(rows, bits, symmetric, steps, lowest)
    return torch.ops.qcore.candidate_quantize(rows, bits, symmetric, steps, lowest)


# -- learned quantization for block reconstruction: LSQ step sizes and AdaRound --------------------------------

__all__ += ["lsq_fake_quantize", "lsq_fake_quantize_grad", "ADAROUND_ZETA", "ADAROUND_GAMMA", "rectified_sigmoid",
            "adaround_dequantize", "adaround_fake_quantize", "adaround_fake_quantize_grad"]


def lsq_fake_quantize_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                           bits: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`fake_quantize_channels` with respect to ``x`` and to the per-channel ``scale`` (LSQ's
    learned step), given the output's ``grad``: ``(grad_x, grad_scale)``, ``grad_scale`` shaped as ``scale``.

    Autograd's own operations on the reference, in its order: ``g = 0`` on 0-bit channels; from
    ``out = (q - zp) * s``: ``g * (q - zp)`` to ``s`` and ``g * s`` on to the clamp (0 outside, half on one end);
    from ``t = x / s``: ``g / s`` to ``x`` and ``-g * ((x / s) / s)`` to ``s``; each of the two ``s`` terms summed
    over the values of its channel (``sum_to_size``), then added. The step's sign convention and LSQ's gradient
    scale are the caller's (qcore-recon applies them outside).

    .. versionadded:: 0.1 (plugin API 1)
    """
    with torch.no_grad():
        ax = axis % max(x.dim(), 1)
        s, zp, lo, hi, b = (_channel_shaped(t, x.dim(), ax) for t in (scale, zero_point, qmin, qmax, bits))
        t = x / s
        v = round_ste(t) + zp
        q = torch.clamp(v, lo, hi)
        g = grad.to(v.dtype)
        g = torch.where(b == 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
        gs_out = (g * (q - zp)).sum_to_size(s.shape)
        gv = _clamp_grad(g * s, v, lo, hi)
        gx = (gv / s).to(x.dtype)
        gs_div = (-gv * ((x / s) / s)).sum_to_size(s.shape)
        return gx, (gs_out + gs_div).reshape(scale.shape)


@torch.library.custom_op("qcore::lsq_fake_quantize", mutates_args=())
def _lsq_op(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
            prune_value: Tensor, axis: int) -> Tensor:
    """:func:`fake_quantize_channels`'s forward with a learnable per-channel ``scale`` (LSQ); its backward
    (``qcore::lsq_fake_quantize_backward``) differentiates ``x`` and ``scale``. Reference on every device."""
    return _channels_reference(x, scale, zero_point, qmin, qmax, bits, prune_value, axis)


@_lsq_op.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
      prune_value: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qcore::lsq_fake_quantize_backward", mutates_args=())
def _lsq_backward_op(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                     bits: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_scale)`` of ``qcore::lsq_fake_quantize``: :func:`lsq_fake_quantize_grad` on every device."""
    return lsq_fake_quantize_grad(grad, x, scale, zero_point, qmin, qmax, bits, axis)


@_lsq_backward_op.register_fake
def _(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
      axis: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(scale)


def _lsq_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    x, scale, zero_point, qmin, qmax, bits, _prune_value, axis = inputs
    # copies of the small per-channel grid parameters: a quantizer may switch its bits in place between forward
    # and backward (PTMQ's multi-bit quantizers do), and the gradient belongs to the grid of the forward pass
    ctx.save_for_backward(x, scale, *(t.clone() for t in (zero_point, qmin, qmax, bits)))
    ctx.axis = axis


def _lsq_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    x, scale, zero_point, qmin, qmax, bits = ctx.saved_tensors
    gx, gs = torch.ops.qcore.lsq_fake_quantize_backward(grad, x, scale, zero_point, qmin, qmax, bits, ctx.axis)
    return gx, gs, None, None, None, None, None, None


_lsq_op.register_autograd(_lsq_backward, setup_context=_lsq_setup)


def lsq_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                      prune_value: Tensor, axis: int, *, kernels: str | None = None) -> Tensor:
    """LSQ's fake quantization: :func:`fake_quantize_channels` (same arguments, same output bit for bit) with a
    gradient for the per-channel ``scale`` as well as for ``x`` (:func:`lsq_fake_quantize_grad`), through the
    torch op ``qcore::lsq_fake_quantize`` so a device kernel can fuse both. ``kernels="reference"`` (or
    ``QCORE_KERNELS=reference``) runs the reference with plain autograd instead, and so do CPU tensors (the op's
    CPU implementation is that reference, and going through the op was measured 1.2-1.65x slower there) and a
    ``zero_point``, ``qmin``, ``qmax`` or ``prune_value`` that needs a gradient (the op differentiates ``x`` and
    ``scale`` only).

    .. versionadded:: 0.1 (plugin API 1)
    """
    axis = axis % max(x.dim(), 1)
    params = (scale, zero_point, qmin, qmax, bits, prune_value)
    if kernels_mode(kernels) == "reference" or x.device.type == "cpu" \
            or any(t.requires_grad for t in (zero_point, qmin, qmax, prune_value)):
        return _channels_reference(x, *params, axis)
    return torch.ops.qcore.lsq_fake_quantize(x, *params, axis)


#: AdaRound's rectified sigmoid stretch (Nagel et al., 2020): ``h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA,
#: 0, 1)``
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def adaround_dequantize(h: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                        bits: Tensor, prune_value: Tensor) -> Tensor:
    """AdaRound's weight for rounding offsets ``h`` in [0, 1]: ``s * (clamp(floor + h + zp, qmin, qmax) - zp)``,
    ``prune_value`` where ``bits == 0``; parameters broadcast against ``floor`` (= ``floor(w / s)``).

    .. versionadded:: 0.1 (plugin API 1)
    """
    q = torch.clamp(floor + h + zero_point, qmin, qmax)
    out = (q - zero_point) * scale
    return torch.where(bits == 0, prune_value, out)


def adaround_fake_quantize_grad(grad: Tensor, v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor,
                                qmin: Tensor, qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """The gradient of :func:`adaround_fake_quantize` with respect to ``v``: autograd's operations in its order
    (0 on 0-bit channels, ``* s``, the grid clamp's gradient, h's clamp passes ``0 <= u <= 1``,
    ``* (ZETA - GAMMA)``, sigmoid's ``g * (1 - y) * y``).

    .. versionadded:: 0.1 (plugin API 1)
    """
    with torch.no_grad():
        ax = axis % max(v.dim(), 1)
        s, zp, lo, hi, b = (_channel_shaped(t, v.dim(), ax) for t in (scale, zero_point, qmin, qmax, bits))
        y = torch.sigmoid(v)
        u = y * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        t = floor + torch.clamp(u, 0.0, 1.0) + zp
        g = torch.where(b == 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
        g = _clamp_grad(g * s, t, lo, hi)
        g = torch.where((u >= 0.0) & (u <= 1.0), g, torch.zeros((), dtype=g.dtype, device=g.device))
        g = g * (ADAROUND_ZETA - ADAROUND_GAMMA)
        return g * (1 - y) * y


def _adaround_reference(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                        bits: Tensor, prune_value: Tensor, axis: int) -> Tensor:
    p = [_channel_shaped(t, v.dim(), axis) for t in (scale, zero_point, qmin, qmax, bits, prune_value)]
    return adaround_dequantize(rectified_sigmoid(v), floor, *p)


@torch.library.custom_op("qcore::adaround_fake_quantize", mutates_args=())
def _adaround_op(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                 bits: Tensor, prune_value: Tensor, axis: int) -> Tensor:
    """AdaRound's soft-quantized weight (see :func:`adaround_fake_quantize`). Reference on every device."""
    return _adaround_reference(v, floor, scale, zero_point, qmin, qmax, bits, prune_value, axis)


@_adaround_op.register_fake
def _(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
      prune_value: Tensor, axis: int) -> Tensor:
    return torch.empty_like(v)


@torch.library.custom_op("qcore::adaround_fake_quantize_backward", mutates_args=())
def _adaround_backward_op(grad: Tensor, v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                          qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    """The gradient of ``qcore::adaround_fake_quantize`` with respect to ``v`` (the reference on every device)."""
    return adaround_fake_quantize_grad(grad, v, floor, scale, zero_point, qmin, qmax, bits, axis)


@_adaround_backward_op.register_fake
def _(grad: Tensor, v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
      bits: Tensor, axis: int) -> Tensor:
    return torch.empty_like(v)


def _adaround_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    v, floor, scale, zero_point, qmin, qmax, bits, _prune_value, axis = inputs
    # copies of the per-channel parameters, as for LSQ: the gradient belongs to the forward pass's grid
    ctx.save_for_backward(v, floor, *(t.clone() for t in (scale, zero_point, qmin, qmax, bits)))
    ctx.axis = axis


def _adaround_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    if any(ctx.needs_input_grad[1:]):
        raise QcoreError("qcore::adaround_fake_quantize differentiates only v; use kernels='reference' for "
                         "gradients of its other inputs")
    v, floor, scale, zero_point, qmin, qmax, bits = ctx.saved_tensors
    gv = torch.ops.qcore.adaround_fake_quantize_backward(grad, v, floor, scale, zero_point, qmin, qmax, bits,
                                                         ctx.axis)
    return gv, None, None, None, None, None, None, None, None


_adaround_op.register_autograd(_adaround_backward, setup_context=_adaround_setup)


def adaround_fake_quantize(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                           bits: Tensor, prune_value: Tensor, axis: int, *, kernels: str | None = None) -> Tensor:
    """AdaRound's soft-quantized weight ``adaround_dequantize(rectified_sigmoid(v), floor, ...)`` and its gradient
    with respect to ``v`` (:func:`adaround_fake_quantize_grad`), through the torch op
    ``qcore::adaround_fake_quantize`` so a device kernel can fuse them.

    ``v`` and ``floor`` have the weight's shape; the other parameters are 1-D per channel along ``axis`` (or one
    value), as in :func:`fake_quantize_channels`. ``kernels="reference"`` (or ``QCORE_KERNELS=reference``),
    CPU tensors (the op's CPU implementation is that reference; going through the op was measured 1.2-1.7x
    slower there), or a parameter other than ``v`` that needs a gradient, run the reference with plain autograd.

    .. versionadded:: 0.1 (plugin API 1)
    """
    axis = axis % max(v.dim(), 1)
    params = (floor, scale, zero_point, qmin, qmax, bits, prune_value)
    if kernels_mode(kernels) == "reference" or v.device.type == "cpu" or any(t.requires_grad for t in params):
        return _adaround_reference(v, *params, axis)
    return torch.ops.qcore.adaround_fake_quantize(v, *params, axis)
