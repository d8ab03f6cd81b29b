"""Kernel 5: dequantize-matmul on packed low-bit weights in Triton (``qcore::dequant_matmul`` on CUDA).

Computes ``y = x @ W^T`` (float32) where ``W`` (``[N, K]``) is held only as the packed codes of
:mod:`qcore.packing`: row ``n`` is a little-endian bitstream of ``K`` codes of ``bits[n]`` bits (0..16) starting
at byte ``offsets[n]``, and its values are ``((code + qmin) - zp) * s`` (the prune value on 0-bit rows), the
same operations as :func:`qcore.packing.dequantize`. Each program computes a ``BLOCK_M x BLOCK_N`` tile of
``y``; for each ``BLOCK_K`` slice it reads the bytes holding the tile's codes (three bytes cover any code of
up to 16 bits at any bit offset), extracts and decodes them in registers and multiplies with ``tl.dot`` in
IEEE float32 (no TF32), so the float32 weight never exists in memory: the weight traffic is the packed bytes.

The result equals the reference (dequantize, then ``x @ W^T``) up to float32 summation order: the tests hold it
to 1e-5 relative. Set ``TRITON_INTERPRET=1`` before importing to run on CPU tensors (what the tests do
without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcore import packing

__all__ = ["BLOCKS", "dequant_matmul", "supports", "interpreted"]

#: tile sizes ``(BLOCK_M, BLOCK_N, BLOCK_K)`` (``tl.dot`` needs 16 or more each)
BLOCKS = (32, 32, 32)


@triton.jit
def _dequant_matmul(x_ptr, packed_ptr, off_ptr, bits_ptr, scale_ptr, zero_ptr, qmin_ptr, prune_ptr, y_ptr,
                    M, N, K, total, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_live, n_live = rm < M, rn < N
    bits = tl.load(bits_ptr + rn, mask=n_live, other=0.0)
    width = bits.to(tl.int64)
    s = tl.load(scale_ptr + rn, mask=n_live, other=1.0)
    zp = tl.load(zero_ptr + rn, mask=n_live, other=0.0)
    qmin = tl.load(qmin_ptr + rn, mask=n_live, other=0.0)
    prune = tl.load(prune_ptr + rn, mask=n_live, other=0.0)
    row_start = tl.load(off_ptr + rn, mask=n_live, other=0)
    code_mask = (tl.full((BLOCK_N,), 1, tl.int64) << width) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_live = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_live[:, None] & k_live[None, :], other=0.0)
        bit = rk[None, :].to(tl.int64) * width[:, None]  # [BLOCK_N, BLOCK_K] bit position in the row
        byte = row_start[:, None] + (bit >> 3)
        live = n_live[:, None] & k_live[None, :] & (width[:, None] > 0)
        b0 = tl.load(packed_ptr + byte, mask=live & (byte < total), other=0).to(tl.int64)
        b1 = tl.load(packed_ptr + byte + 1, mask=live & (byte + 1 < total), other=0).to(tl.int64)
        b2 = tl.load(packed_ptr + byte + 2, mask=live & (byte + 2 < total), other=0).to(tl.int64)
        code = ((b0 | (b1 << 8) | (b2 << 16)) >> (bit & 7)) & code_mask[:, None]
        w = (code.to(tl.float32) + qmin[:, None] - zp[:, None]) * s[:, None]
        w = tl.where(width[:, None] == 0, prune[:, None], w)
        w = tl.where(k_live[None, :], w, 0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_live[:, None] & n_live[None, :])


def interpreted() -> bool:
    """True when the kernel was defined under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_dequant_matmul, InterpretedFunction)


def supports(x: Tensor, packed: Tensor) -> bool:
    """Whether the kernel takes these inputs: a float32 or float16 ``x`` and flat ``uint8`` codes."""
    return x.dtype in (torch.float32, torch.float16) and packed.dtype == torch.uint8 and packed.dim() == 1


def dequant_matmul(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                   prune_value: Tensor, length: int) -> Tensor:
    """The kernel: :func:`qcore.packing.dequant_matmul_reference` (``x`` is ``[..., length]``, the result
    ``[..., N]`` in float32) for inputs :func:`supports` accepts."""
    n = bits.shape[0]
    x2 = x.reshape(-1, length).to(torch.float32).contiguous()
    offsets = packing.row_offsets(bits.cpu(), length)[:-1].to(x.device)
    y = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    if y.numel():
        bm, bn, bk = BLOCKS
        params = [t.to(device=x.device, dtype=torch.float32).contiguous()
                  for t in (bits, scale, zero_point, qmin, prune_value)]
        grid = (triton.cdiv(x2.shape[0], bm), triton.cdiv(n, bn))
        _dequant_matmul[grid](x2, packed.contiguous(), offsets, *params, y, x2.shape[0], n, length,
                              packed.numel(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*x.shape[:-1], n)
