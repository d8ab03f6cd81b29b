"""Kernel 2: every (bit-width, row) quantization candidate of a layer in one launch, MSE clip search included.

Computes what :func:`qcore.ops.candidate_quantize` computes. One program per (bit-width, row):

1. the row's min and max (``lo``, ``hi``);
2. the MSE clip search of :func:`qcore.ranges.mse_range`: for each shrink factor ``f`` (the same
   ``torch.linspace`` values, read from memory) the grid of :func:`qcore.ops.qparams_from_range` on
   ``[lo * f, hi * f]`` and the mean squared error of :func:`qcore.ops.quantize_error`'s arithmetic
   (``round(x / s)``, ``+ zp`` on the affine grid, clamp, ``- zp``, ``* s``, ``- x``), keeping the first factor
   with the smallest error;
3. the row fake-quantized on the chosen range with :func:`qcore.ops.fake_quantize`'s arithmetic (kernel 1's
   :func:`~qcore_cuda.fake_quant._grid_value`, the same straight-through rounding and zero point), 0 for a
   0-bit candidate.

Steps 1 and 3 and every element's error are the reference's float32 operations in the same order, so the
ranges and the quantized rows are bit for bit the reference's whenever the same factor is chosen. The error of a
factor is a sum over the row; its order (a tree per block here, the CPU's vectorised order there) is the one
thing that differs, so the choice can differ only between factors whose errors are equal within float32 rounding.
The row is read ``steps + 2`` times by the same program (it stays in cache for rows of group size x fan-in).

Set ``TRITON_INTERPRET=1`` before this module is imported to run it on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcore_cuda.fake_quant import _grid_value, _round_half_even

__all__ = ["supports", "candidate_quantize", "interpreted"]

_EPS = 1e-12  # qcore.ops' smallest scale


@triton.jit
def _grid(lo, hi, bits, SYMMETRIC: tl.constexpr):
    """:func:`qcore.ops.qparams_from_range` for one (range, bit-width): ``(scale, zero, qmin, qmax)``."""
    k = bits.to(tl.int32)
    live = bits > 0.0
    if SYMMETRIC:
        half = (1 << tl.maximum(k - 1, 0)).to(tl.float32)
        qmin = tl.where(live, -half, 0.0)
        qmax = tl.where(live, half - 1.0, 0.0)
        clip = tl.maximum(tl.abs(lo), tl.abs(hi))
        scale = tl.div_rn(clip, tl.maximum(qmax, 1.0))
        zero = 0.0
    else:
        qmin = 0.0
        qmax = (1 << k).to(tl.float32) - 1.0
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        scale = tl.div_rn(hi - lo, tl.maximum(qmax, 1.0))
        scale = tl.maximum(scale, 1e-12)
        zero = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(-lo, scale)), 0.0), qmax)
    scale = tl.where(live, tl.maximum(scale, 1e-12), 1.0)
    return scale, zero, qmin, qmax


@triton.jit
def _candidates(rows_ptr, bits_ptr, factors_ptr, lo_ptr, hi_ptr, out_ptr, n_rows, n, steps,
                SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    row = rows_ptr + r.to(tl.int64) * n
    cols = tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + b)
    # 1. the row's min/max
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        live = start + cols < n
        x = tl.load(row + start + cols, mask=live, other=0.0)
        mn = tl.minimum(mn, tl.where(live, x, float("inf")))
        mx = tl.maximum(mx, tl.where(live, x, float("-inf")))
    lo = tl.min(mn, axis=0)
    hi = tl.max(mx, axis=0)
    # 2. the MSE clip search: the first factor with the smallest mean squared error
    best_err = tl.full([], float("inf"), tl.float32)
    best_f = tl.load(factors_ptr)
    for i in range(0, steps):
        f = tl.load(factors_ptr + i)
        s, zp, qmin, qmax = _grid(lo * f, hi * f, bits, SYMMETRIC)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            live = start + cols < n
            x = tl.load(row + start + cols, mask=live, other=0.0)
            q = _round_half_even(tl.div_rn(x, s))
            if not SYMMETRIC:
                q = q + zp
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            if not SYMMETRIC:
                q = q - zp
            e = q * s - x
            acc += tl.where(live, e * e, 0.0)
        err = tl.sum(acc, axis=0) / n
        better = err < best_err
        best_err = tl.where(better, err, best_err)
        best_f = tl.where(better, f, best_f)
    lo = lo * best_f
    hi = hi * best_f
    tl.store(lo_ptr + b * n_rows + r, lo)
    tl.store(hi_ptr + b * n_rows + r, hi)
    # 3. the row fake-quantized on the chosen range
    s, zp, qmin, qmax = _grid(lo, hi, bits, SYMMETRIC)
    out = out_ptr + (b.to(tl.int64) * n_rows + r) * n
    for start in range(0, n, BLOCK):
        live = start + cols < n
        x = tl.load(row + start + cols, mask=live, other=0.0)
        v = _grid_value(x, s, zp)
        q = tl.minimum(tl.maximum(v, qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                       propagate_nan=tl.PropagateNan.ALL)
        y = tl.where(bits == 0.0, 0.0, (q - zp) * s)
        tl.store(out + start + cols, y, mask=live)


def interpreted() -> bool:
    """True when the kernel was defined under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_candidates, InterpretedFunction)


def supports(rows: Tensor, bits: Tensor) -> bool:
    """Whether the kernel computes what the reference computes: finite float32 rows ``[R, N]`` with ``N >= 1``,
    bit-widths that are whole numbers in 0..16. (A NaN or inf goes to the reference, whose non-finite range the
    caller reports: the kernel's min/max reduction does not promise to propagate NaN.)"""
    if rows.dtype != torch.float32 or rows.dim() != 2 or rows.shape[1] == 0 or bits.dim() != 1:
        return False
    b = bits.float()
    return bool(((b >= 0) & (b <= 16) & (b == b.round())).all() and torch.isfinite(rows).all())


def candidate_quantize(rows: Tensor, bits: Tensor, symmetric: bool, steps: int, lowest: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel: :func:`qcore.ops.candidate_quantize` for inputs :func:`supports` accepts."""
    rows = rows.contiguous()
    n_rows, n = rows.shape
    bits = bits.to(device=rows.device, dtype=torch.float32).contiguous()
    factors = torch.linspace(lowest, 1.0, steps, device=rows.device)  # the reference's factors, bit for bit
    lo = torch.empty((bits.numel(), n_rows), dtype=torch.float32, device=rows.device)
    hi = torch.empty_like(lo)
    out = torch.empty((bits.numel(), n_rows, n), dtype=rows.dtype, device=rows.device)
    if bits.numel() and n_rows:
        block = min(1024, max(16, triton.next_power_of_2(n)))
        _candidates[(n_rows, bits.numel())](rows, bits, factors, lo, hi, out, n_rows, n, steps,
                                            SYMMETRIC=symmetric, BLOCK=block)
    return lo, hi, out
