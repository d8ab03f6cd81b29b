"""Kernel 5 (dequantize-matmul on packed low-bit weights) against the fake-quant matmul.

The weights come from :class:`qcore.UniformFakeQuant` with per-group bit-widths (2/3/4 and mixed 0..16, odd row
lengths, symmetric and affine, clipped values); the kernel reads only their packed codes
(:mod:`qcore.packing`) and must give ``x @ fake_quant(W)^T`` within 1e-5 relative. Without a GPU it runs under
Triton's interpreter (``conftest.py``), so shapes are small.
"""

from __future__ import annotations

import pytest
import torch

import qcore
import qcore_cuda.plugin as plugin
from qcore import packing
from qcore_cuda import packed as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(seed: int, n: int, k: int, group_bits: tuple[int, ...], symmetric: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    group = -(-n // len(group_bits))
    spec = qcore.QuantSpec(max(group_bits), symmetric=symmetric, granularity="group", group_size=group,
                           group_bits=group_bits)
    q = qcore.UniformFakeQuant(spec, n, 0)
    rows = q.rows_of(w)
    q.set_range(rows.amin(1) * 0.7, rows.amax(1) * 0.7)  # clip some values at the grid ends
    q.set_prune_value(torch.randn(n, generator=g))
    scale, zero, qmin, qmax, bits = q.qparams()
    codes = packing.pack_codes(packing.codes_from_weight(w, scale, zero, qmin, qmax), bits)
    x = torch.randn(int(torch.randint(1, 40, (1,), generator=g)), k, generator=g)
    return x, q(w), (codes, bits, scale, zero, qmin, q.prune_value, k)


CASES = [  # (seed, N, K, group bits, symmetric)
    (0, 8, 7, (2,), True), (1, 9, 13, (3,), False), (2, 16, 33, (4,), True), (3, 5, 1, (3,), True),
    (4, 40, 45, (2, 3, 4, 0), False), (5, 17, 19, tuple(range(17)), False), (6, 33, 70, (4, 2, 3), True),
]


def test_kernel_runs_where_the_tests_think():
    assert kernels.interpreted() == (DEVICE == "cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[1]}-K{c[2]}-bits{'_'.join(map(str, c[3]))}")
def test_dequant_matmul_equals_the_fake_quant_matmul(case):
    seed, n, k, group_bits, symmetric = case
    x, wq, args = _layer(seed, n, k, group_bits, symmetric)
    want = x @ wq.t()
    got = kernels.dequant_matmul(x.to(DEVICE), *(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and the core reference it replaces agrees with both
    torch.testing.assert_close(packing.dequant_matmul_reference(x, *args), want, rtol=1e-5, atol=1e-6)


def test_leading_dimensions_are_kept():
    x, wq, args = _layer(9, 12, 10, (4, 2), True)
    x3 = x[:6].reshape(2, 3, 10)
    got = kernels.dequant_matmul(x3.to(DEVICE), *(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(got.cpu(), x3 @ wq.t(), rtol=1e-5, atol=1e-6)


def test_the_plugin_registers_the_kernel_for_cuda_only():
    op = torch.ops.qcore.dequant_matmul.default
    assert op.has_kernel_for_dispatch_key("CUDA") and "qcore::dequant_matmul" in plugin.PACKED_OPS
    x, wq, args = _layer(3, 6, 9, (3,), False)
    # CPU tensors keep the reference (the op's default kernel)
    assert torch.equal(packing.dequant_matmul(x, *args), packing.dequant_matmul_reference(x, *args))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_op_on_cuda_runs_the_kernel():
    x, wq, args = _layer(4, 64, 96, (4, 2, 3, 0), False)
    got = packing.dequant_matmul(x.cuda(), *(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(got.cpu(), x @ wq.t(), rtol=1e-5, atol=1e-5)
