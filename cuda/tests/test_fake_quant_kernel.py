"""Kernel 1 (per-channel / per-group mixed-bit fake quantization) against qcore's reference.

Forward: bit for bit. Backward: the straight-through gradient within float32 rounding (in practice bit for bit
too; the bound leaves room for a compiler that fuses ``g * s / s``). Without a GPU the kernels run on CPU
tensors under Triton's interpreter (``conftest.py``), so the cases are tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

import qcore_cuda.plugin as plugin
from qcore.ops import fake_quantize_channels, fake_quantize_channels_grad, qparams_from_range
from qcore.testing import fake_quant_case, same_bits
from qcore_cuda import fake_quant as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [fake_quant_case(seed, max_dim=7) for seed in range(40)]


def _on(case):
    return case.x.to(DEVICE), tuple(p.to(DEVICE) for p in case.params), case.axis


def test_kernels_run_where_the_tests_think():
    assert kernels.interpreted() == (DEVICE == "cpu")


def test_cases_cover_bits_layouts_and_dtypes():
    assert set(torch.cat([c.params[4] for c in CASES]).long().tolist()) == set(range(17))
    assert {c.granularity for c in CASES} == {"tensor", "channel", "group"}
    assert {c.symmetric for c in CASES} == {True, False}
    assert any((c.params[0] == 1e-12).any() for c in CASES)  # zero-width ranges


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_is_the_reference_bit_for_bit_and_backward_within_rounding(case):
    x, params, axis = _on(case)
    want = fake_quantize_channels(case.x, *case.params, case.axis, kernels="reference")
    grad = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(7)).to(case.x.dtype)
    want_grad = fake_quantize_channels_grad(grad, case.x, *case.params[:5], case.axis)
    if not kernels.supports(x, *params):  # float16 with one value for the whole tensor: the reference's job
        assert case.x.dtype == torch.float16 and case.params[0].numel() == 1
        return
    got = kernels.fake_quantize_channels(x, *params, axis)
    assert same_bits(got, want)
    got_grad = kernels.fake_quantize_channels_grad(grad.to(DEVICE), x, *params[:5], axis)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=torch.finfo(case.x.dtype).eps, atol=0.0)


def test_ties_round_to_even_and_extremes_survive():
    # ties at every parity and sign, values just off a tie, a huge value, and a grid end; 16 bits, scale 1
    x = torch.tensor([-2.5, -1.5, -0.5, -0.0, 0.5, 1.5, 2.5, 3.4999998, -0.49999997, 1e10, -32768.0, 32767.5])
    s, z, qmin, qmax = qparams_from_range(torch.tensor([-32767.0]), torch.tensor([32767.0]), torch.tensor([16.0]),
                                          True)
    params = (s, z, qmin, qmax, torch.tensor([16.0]), torch.zeros(1))
    got = kernels.fake_quantize_channels(x.to(DEVICE), *(p.to(DEVICE) for p in params), 0)
    want = fake_quantize_channels(x, *params, 0, kernels="reference")
    assert same_bits(got, want)
    assert got.tolist()[:7] == [-2.0, -2.0, 0.0, 0.0, 0.0, 2.0, 2.0]


def test_non_contiguous_input_keeps_its_layout():
    case = next(c for c in CASES if c.x.dim() >= 2 and c.x.dtype == torch.float32 and c.granularity == "channel")
    x, params, axis = _on(case)
    xt = x.transpose(0, -1)  # same values, channels now along another axis
    axis_t = {0: x.dim() - 1, x.dim() - 1: 0}.get(axis, axis)
    got = kernels.fake_quantize_channels(xt, *params, axis_t)
    assert got.stride() == torch.empty_like(xt).stride()
    assert same_bits(got, fake_quantize_channels(xt.cpu(), *case.params, axis_t, kernels="reference"))


def test_the_plugin_registers_the_kernels_for_cuda_only():
    for name in plugin.OPS:
        op = getattr(torch.ops.qcore, name.split("::")[1]).default
        assert op.has_kernel_for_dispatch_key("CUDA")
    # CPU tensors keep the reference implementation (the op's default kernel)
    case = CASES[0]
    via_op = torch.ops.qcore.fake_quantize_channels(case.x, *case.params, case.axis)
    assert same_bits(via_op, fake_quantize_channels(case.x, *case.params, case.axis, kernels="reference"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_op_on_cuda_runs_the_kernel_and_matches_the_cpu_reference():
    case = next(c for c in CASES if c.x.dtype == torch.float32)
    x = case.x.cuda().requires_grad_(True)
    out = torch.ops.qcore.fake_quantize_channels(x, *(p.cuda() for p in case.params), case.axis)
    out.backward(torch.ones_like(out))
    xr = case.x.clone().requires_grad_(True)
    want = fake_quantize_channels(xr, *case.params, case.axis, kernels="reference")
    want.backward(torch.ones_like(want))
    assert plugin.kernels() is not None and same_bits(out, want)
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=torch.finfo(torch.float32).eps, atol=0.0)
