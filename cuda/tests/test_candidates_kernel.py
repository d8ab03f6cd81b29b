"""Kernel 2 (every quantization candidate of a layer, MSE clip search included) against qcore's reference.

Ranges and quantized rows: bit for bit. The one freedom the kernel has is the order of the error sum of each
shrink factor, so where two factors' errors are equal within float32 rounding it may pick the other one; the
test then checks that the two errors are indeed equal within rounding, and that the quantized rows are the
reference's on the range the kernel chose. Without a GPU the kernel runs under Triton's interpreter
(``conftest.py``), so the cases are small.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import qcore_cuda.plugin as plugin
from qcore.ops import CANDIDATE_LOWEST, CANDIDATE_STEPS, candidate_quantize, quantize_error, quantize_rows
from qcore.ranges import mse_range
from qcore.testing import same_bits
from qcore_cuda import candidates as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor, bool, int, float]:
    """Random odd-sized rows (some all zero, some constant, some one-signed), a random set of bit-widths."""
    gen = torch.Generator().manual_seed(seed)
    r, n = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    if seed == 0:
        r, n = 1, 1100  # more than one block per row
    rows = torch.randn(r, n, generator=gen) * float(torch.rand(1, generator=gen) * 3 + 1e-3)
    kind = seed % 4
    if kind == 1:
        rows[0] = 0.0  # a zero range
    elif kind == 2:
        rows[-1] = rows[-1].abs()  # one-signed: the affine grid widens to 0
    elif kind == 3:
        rows[0] = 0.75  # a constant row
    extra = torch.randperm(17, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))]
    bits = torch.cat([torch.tensor([seed % 17]), extra[extra != seed % 17]]).float()  # every width across cases
    steps = int(torch.randint(1, 5, (1,), generator=gen))
    lowest = 0.2
    if seed == 5:  # the default search (100 factors) on one small row: the interpreter is slow
        rows, bits, steps, lowest = rows[:1, :12], bits[:1], CANDIDATE_STEPS, CANDIDATE_LOWEST
    return rows, bits, seed % 2 == 0, steps, lowest


CASES = [_case(seed) for seed in range(17)]


def test_kernel_runs_where_the_tests_think():
    assert kernels.interpreted() == (DEVICE == "cpu")


def test_cases_cover_every_bit_width_and_both_grids():
    assert set(torch.cat([c[1] for c in CASES]).long().tolist()) == set(range(17))
    assert {c[2] for c in CASES} == {True, False}


def test_the_op_defaults_are_mse_ranges():
    params = inspect.signature(mse_range).parameters
    assert (params["steps"].default, params["lowest"].default) == (CANDIDATE_STEPS, CANDIDATE_LOWEST)


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_kernel_is_the_reference(seed):
    rows, bits, symmetric, steps, lowest = CASES[seed]
    want_lo, want_hi, want_q = candidate_quantize(rows, bits, symmetric, steps, lowest, kernels="reference")
    lo, hi, q = (t.cpu() for t in kernels.candidate_quantize(rows.to(DEVICE), bits.to(DEVICE), symmetric, steps,
                                                             lowest))
    # the quantized rows are exactly the reference's on the range the kernel chose
    assert same_bits(q, quantize_rows(rows, lo, hi, bits, symmetric))
    same = (lo.view(torch.int32) == want_lo.view(torch.int32)) & (hi.view(torch.int32) == want_hi.view(torch.int32))
    # a different choice only between errors equal within float32 rounding (the sum's order)
    for b, r in (~same).nonzero().tolist():
        x, nb = rows[r:r + 1], bits[b:b + 1]
        got = quantize_error(x, lo[b, r:r + 1], hi[b, r:r + 1], nb, symmetric)
        want = quantize_error(x, want_lo[b, r:r + 1], want_hi[b, r:r + 1], nb, symmetric)
        torch.testing.assert_close(got, want, rtol=x.shape[1] * torch.finfo(torch.float32).eps, atol=0.0)
    assert int((~same).sum()) <= max(1, same.numel() // 10)
    assert same_bits(q[same], want_q[same])


def test_rows_are_independent_and_zero_rows_stay_zero():
    rows = torch.zeros(3, 17)
    rows[1] = torch.linspace(-1, 2, 17)
    bits = torch.tensor([0.0, 3.0, 16.0])
    lo, hi, q = kernels.candidate_quantize(rows.to(DEVICE), bits.to(DEVICE), False, 2, 0.3)
    lo1, hi1, q1 = kernels.candidate_quantize(rows[1:2].to(DEVICE), bits.to(DEVICE), False, 2, 0.3)
    assert same_bits(q[:, 1:2], q1) and same_bits(lo[:, 1:2], lo1) and same_bits(hi[:, 1:2], hi1)
    assert not q[:, 0].any() and not q[0].any()  # a zero row quantizes to 0; 0 bits prune to 0


def test_the_plugin_registers_the_kernel_for_cuda_only():
    op = torch.ops.qcore.candidate_quantize.default
    assert op.has_kernel_for_dispatch_key("CUDA") and "qcore::candidate_quantize" in plugin.OPS
    rows, bits, symmetric, steps, lowest = CASES[1]
    got = torch.ops.qcore.candidate_quantize(rows, bits, symmetric, steps, lowest)  # CPU: the reference
    want = candidate_quantize(rows, bits, symmetric, steps, lowest, kernels="reference")
    assert all(same_bits(g, w) for g, w in zip(got, want, strict=True))


def test_unsupported_inputs_are_left_to_the_reference():
    assert not kernels.supports(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([4.0]))
    assert not kernels.supports(torch.zeros(2, 0), torch.tensor([4.0]))
    assert not kernels.supports(torch.zeros(2, 3), torch.tensor([2.5]))
    assert not kernels.supports(torch.tensor([[0.0, float("nan")]]), torch.tensor([4.0]))
    assert kernels.supports(torch.zeros(2, 3), torch.tensor([0.0, 16.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_op_on_cuda_runs_the_kernel():
    rows, bits, symmetric, steps, lowest = CASES[0]
    lo, hi, q = torch.ops.qcore.candidate_quantize(rows.cuda(), bits.cuda(), symmetric, steps, lowest)
    assert plugin.candidate_kernels() is not None
    assert same_bits(q.cpu(), quantize_rows(rows, lo.cpu(), hi.cpu(), bits, symmetric))
