"""Kernel 3 (LSQ and AdaRound fake quantization for block reconstruction) against qcore's reference.

LSQ: forward bit for bit (it is kernel 1's forward); backward to ``x`` bit for bit and to the step within float32
rounding (the per-channel sum is torch's on the device; on CPU it is the reference's own sum). AdaRound: every
operation after the sigmoid is the reference's, the sigmoid's ``exp`` is the device's: outputs equal the
reference's bit for bit wherever the sigmoids agree (checked to be almost everywhere) and within one ulp of ``h``
times the scale elsewhere; the backward, which uses the sigmoid directly, within float32 rounding. Random cases
from ``qcore.testing.fake_quant_case`` (odd shapes, any axis, per tensor / channel / group, bits 0..16, zero
ranges); float32, the kernels' inputs.
"""

from __future__ import annotations

import pytest
import torch

import qcore_cuda.plugin as plugin
from qcore import ops
from qcore.testing import fake_quant_case, same_bits
from qcore_cuda import adaround, lsq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = torch.finfo(torch.float32).eps
CASES = [c for c in (fake_quant_case(seed, max_dim=7, half=0.0) for seed in range(40))]


def _shaped(t: torch.Tensor, case) -> torch.Tensor:
    shape = [1] * case.x.dim()
    if t.numel() > 1:
        shape[case.axis] = t.numel()
    return t.reshape(shape if t.numel() > 1 else [])


def _dev(ts):
    return tuple(t.to(DEVICE) for t in ts)


def test_kernels_run_where_the_tests_think():
    assert lsq.interpreted() == adaround.interpreted() == (DEVICE == "cpu")


def test_cases_cover_bits_layouts_and_zero_ranges():
    assert set(torch.cat([c.params[4] for c in CASES]).long().tolist()) == set(range(17))
    assert {c.granularity for c in CASES} == {"tensor", "channel", "group"}
    assert any((c.params[0] == 1e-12).any() for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_lsq_forward_bit_for_bit_backward_within_rounding(case):
    x, params, axis = case.x, case.params, case.axis
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    got = lsq.lsq_fake_quantize(x.to(DEVICE), *_dev(params), axis).cpu()
    assert same_bits(got, ops.fake_quantize_channels(x, *params, axis, kernels="reference"))
    gx, gs = lsq.lsq_fake_quantize_grad(grad.to(DEVICE), x.to(DEVICE), *_dev(params[:5]), axis)
    want_gx, want_gs = ops.lsq_fake_quantize_grad(grad, x, *params[:5], axis)
    assert same_bits(gx.cpu(), want_gx)
    assert gs.shape == params[0].shape
    torch.testing.assert_close(gs.cpu(), want_gs, rtol=1e-5, atol=1e-5 * float(want_gs.abs().max()) + 1e-30)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_adaround_forward_and_backward_are_the_reference(case):
    x, (scale, zero, qmin, qmax, bits, prune), axis = case.x, case.params, case.axis
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(x.shape, generator=gen) * 4  # both clamps of h are reached
    floor = torch.floor(x / _shaped(scale, case))
    grad = torch.randn(x.shape, generator=gen)
    p = (scale, zero, qmin, qmax, bits, prune)
    got = adaround.adaround_fake_quantize(v.to(DEVICE), floor.to(DEVICE), *_dev(p), axis).cpu()
    want = ops.adaround_fake_quantize(v, floor, *p, axis, kernels="reference")
    # where the device's sigmoid differs in its last bit, the output moves by one ulp of h times the scale
    step = float(scale.max()) * EPS
    torch.testing.assert_close(got, want, rtol=2 * EPS, atol=step)
    assert float((got == want).float().mean()) >= 0.95
    gv = adaround.adaround_fake_quantize_grad(grad.to(DEVICE), v.to(DEVICE), floor.to(DEVICE), *_dev(p[:5]),
                                              axis).cpu()
    want_gv = ops.adaround_fake_quantize_grad(grad, v, floor, *p[:5], axis)
    torch.testing.assert_close(gv, want_gv, rtol=4 * EPS, atol=4 * EPS * float(want_gv.abs().max()) + 1e-30)


def test_nan_and_inf_pass_through_as_in_the_reference():
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3])
    floor = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    p = (torch.full((1,), 0.5), torch.zeros(1), torch.full((1,), -8.0), torch.full((1,), 7.0), torch.full((1,), 4.0),
         torch.zeros(1))
    got = adaround.adaround_fake_quantize(v.to(DEVICE), floor.to(DEVICE), *_dev(p), 0).cpu()
    want = ops.adaround_fake_quantize(v, floor, *p, 0, kernels="reference")
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0, equal_nan=True)  # a NaN's sign bit is free


def test_the_plugin_registers_the_kernels_for_cuda_only():
    for name in ("lsq_fake_quantize", "lsq_fake_quantize_backward", "adaround_fake_quantize",
                 "adaround_fake_quantize_backward"):
        assert getattr(torch.ops.qcore, name).default.has_kernel_for_dispatch_key("CUDA")
        assert f"qcore::{name}" in plugin.OPS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ops_on_cuda_run_the_kernels_and_train_like_the_cpu():
    case = next(c for c in CASES if c.x.dim() >= 2 and c.granularity == "channel")
    x, params, axis = case.x, case.params, case.axis
    xs = [x.clone().requires_grad_(True), x.cuda().requires_grad_(True)]
    ss = [params[0].clone().requires_grad_(True), params[0].cuda().requires_grad_(True)]
    for xi, si in zip(xs, ss, strict=True):
        rest = tuple(t.to(xi.device) for t in params[1:])
        ops.lsq_fake_quantize(xi, si, *rest, axis).sum().backward()
    assert plugin.recon_kernels()
    assert same_bits(xs[1].grad.cpu(), xs[0].grad)
    torch.testing.assert_close(ss[1].grad.cpu(), ss[0].grad, rtol=1e-5, atol=1e-6)
