"""Kernel 4: the enumeration step of LatticeQ's exact closest-vector search (``n <= 3``) in Triton.

:func:`qcore_latticeq.cvp.closest_points_reference` finds a first code (Babai, rounded projection) and a box of
candidate codes per vector; its enumeration step (:func:`qcore_latticeq.cvp.enumerate_offsets`) then loops in
Python over every offset of the widest box, one batch of torch operations per offset. This kernel does that
step in one launch: each program holds ``BLOCK`` vectors in registers and walks the same offsets in the same
order (``itertools.product``: last coordinate fastest), with the same candidate
``min(start + offset, max(stop, start))``, the same distance ``sum_m (sum_k z_k b_km - v_m)^2`` and the same
strict ``<`` (the first of equal candidates wins), so it returns the reference's codes. Coordinates beyond
``n`` are padded with zero codes and zero basis entries, which add exact zeros.

The CUDA implementation of ``qcore_latticeq::closest_points`` (registered by :mod:`qcore_cuda.plugin` when
qcore-latticeq is installed) is the reference with this kernel as its ``enumerate_fn``: one algorithm, one place.
Set ``TRITON_INTERPRET=1`` before importing to run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK", "MAX_N", "enumerate_offsets", "closest_points", "supports", "interpreted"]

#: vectors per program
BLOCK = 128
#: the largest lattice dimension the kernel handles
MAX_N = 3


@triton.jit
def _coord(t, stride, w, start, stop):
    """Candidate coordinate for offset index ``t``: ``min(start + (t // stride) % w, max(stop, start))``."""
    o = ((t // stride) % w).to(tl.float32)
    return tl.minimum(start + o, tl.maximum(stop, start))


@triton.jit
def _load3(ptr, base, live):
    """The three consecutive float32 values at ``ptr + base`` of each live vector (zeros elsewhere)."""
    return (tl.load(ptr + base, mask=live, other=0.0), tl.load(ptr + base + 1, mask=live, other=0.0),
            tl.load(ptr + base + 2, mask=live, other=0.0))


@triton.jit
def _enumerate(v_ptr, b_ptr, start_ptr, stop_ptr, z_ptr, d_ptr, out_ptr, N, w0, w1, w2, total,
               BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < N
    v0, v1, v2 = _load3(v_ptr, i * 3, live)
    b00, b01, b02 = _load3(b_ptr, i * 9, live)  # basis rows
    b10, b11, b12 = _load3(b_ptr, i * 9 + 3, live)
    b20, b21, b22 = _load3(b_ptr, i * 9 + 6, live)
    s0, s1, s2 = _load3(start_ptr, i * 3, live)
    e0, e1, e2 = _load3(stop_ptr, i * 3, live)
    z0, z1, z2 = _load3(z_ptr, i * 3, live)
    d = tl.load(d_ptr + i, mask=live, other=0.0)
    for t in range(0, total):
        c0 = _coord(t, w1 * w2, w0, s0, e0)
        c1 = _coord(t, w2, w1, s1, e1)
        c2 = _coord(t, 1, w2, s2, e2)
        p0 = c0 * b00 + c1 * b10 + c2 * b20 - v0
        p1 = c0 * b01 + c1 * b11 + c2 * b21 - v1
        p2 = c0 * b02 + c1 * b12 + c2 * b22 - v2
        dc = p0 * p0 + p1 * p1 + p2 * p2
        better = dc < d
        z0 = tl.where(better, c0, z0)
        z1 = tl.where(better, c1, z1)
        z2 = tl.where(better, c2, z2)
        d = tl.where(better, dc, d)
    tl.store(out_ptr + i * 3, z0, mask=live)
    tl.store(out_ptr + i * 3 + 1, z1, mask=live)
    tl.store(out_ptr + i * 3 + 2, z2, mask=live)


def interpreted() -> bool:
    """True when the kernel was defined under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_enumerate, InterpretedFunction)


def supports(v: Tensor, basis: Tensor) -> bool:
    """Whether the kernel takes these inputs: float32 vectors and bases of dimension ``n <= 3``."""
    return v.dtype == torch.float32 and basis.dtype == torch.float32 and 1 <= v.shape[-1] <= MAX_N


def _pad(t: Tensor, n: int, dims: int) -> Tensor:
    """Zero-pad the last ``dims`` dimensions of ``t`` from ``n`` to 3, float32, contiguous."""
    pad = []
    for _ in range(dims):
        pad += [0, MAX_N - n]
    return torch.nn.functional.pad(t.to(torch.float32), pad).contiguous()


def enumerate_offsets(vs: Tensor, bases: Tensor, start: Tensor, stop: Tensor, z: Tensor, d: Tensor,
                      width: list[int]) -> Tensor:
    """:func:`qcore_latticeq.cvp.enumerate_offsets` in one kernel launch (an ``EnumerateFn``)."""
    n = vs.shape[-1]
    if vs.shape[0] == 0:
        return z
    w = [int(x) for x in width] + [1] * (MAX_N - n)
    total = w[0] * w[1] * w[2]
    out = torch.empty((vs.shape[0], MAX_N), dtype=torch.float32, device=vs.device)
    _enumerate[(triton.cdiv(vs.shape[0], BLOCK),)](
        _pad(vs, n, 1), _pad(bases, n, 2), _pad(start, n, 1), _pad(stop, n, 1), _pad(z, n, 1),
        d.to(torch.float32).contiguous(), out, vs.shape[0], w[0], w[1], w[2], total, BLOCK=BLOCK,
        enable_fp_fusion=False)  # no fused multiply-add: the distances round as the reference's do
    return out[:, :n].to(z.dtype)


def closest_points(v: Tensor, basis: Tensor, qmin: Tensor, qmax: Tensor, max_offsets: int | None) -> Tensor:
    """``qcore_latticeq::closest_points`` with the enumeration in Triton (inputs :func:`supports` accepts)."""
    from qcore_latticeq.cvp import closest_points_reference

    return closest_points_reference(v, basis, qmin, qmax, max_offsets, enumerate_fn=enumerate_offsets)
