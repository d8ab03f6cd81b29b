"""LSQ and AdaRound through their torch ops: forward and the written-out backward equal autograd on the
reference bit for bit (so qcore-recon trains exactly as before), on random cases of every layout."""

import pytest
import torch

from qcore import QcoreError, ops
from qcore.testing import fake_quant_case, same_bits

CASES = [fake_quant_case(seed, max_dim=7, half=0.0) for seed in range(12)]


def _shaped(t, case):
    if t.numel() == 1:
        return t.reshape([])
    shape = [1] * case.x.dim()
    shape[case.axis] = t.numel()
    return t.reshape(shape)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_lsq_op_gradients_are_autograds(case):
    grad = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for kernels in ("reference", "op"):  # the public function runs the reference on CPU: call the op itself
        x = case.x.clone().requires_grad_(True)
        s = case.params[0].clone().requires_grad_(True)
        out = (ops.lsq_fake_quantize(x, s, *case.params[1:], case.axis, kernels=kernels) if kernels == "reference"
               else torch.ops.qcore.lsq_fake_quantize(x, s, *case.params[1:], case.axis % max(x.dim(), 1)))
        out.backward(grad)
        outs.append(out)
        grads.append((x.grad, s.grad))
    assert same_bits(outs[0], outs[1])
    assert same_bits(grads[0][0], grads[1][0]) and same_bits(grads[0][1], grads[1][1])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_adaround_op_gradient_is_autograds(case):
    scale, zero, qmin, qmax, bits, prune = case.params
    gen = torch.Generator().manual_seed(2)
    v0 = torch.randn(case.x.shape, generator=gen) * 4
    floor = torch.floor(case.x / _shaped(scale, case))
    grad = torch.randn(case.x.shape, generator=gen)
    results = []
    for kernels in ("reference", "op"):
        v = v0.clone().requires_grad_(True)
        out = (ops.adaround_fake_quantize(v, floor, *case.params, case.axis, kernels=kernels)
               if kernels == "reference"
               else torch.ops.qcore.adaround_fake_quantize(v, floor, *case.params, case.axis % max(v.dim(), 1)))
        out.backward(grad)
        results.append((out, v.grad))
    assert same_bits(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])
    h = ops.rectified_sigmoid(v0)
    p = [_shaped(t, case) for t in case.params]
    assert same_bits(results[0][0], ops.adaround_dequantize(h, floor, *p))


def test_adaround_op_refuses_gradients_it_does_not_compute():
    case = CASES[0]
    s = case.params[0].clone().requires_grad_(True)
    v = torch.zeros(case.x.shape, requires_grad=True)
    out = torch.ops.qcore.adaround_fake_quantize(v, torch.zeros_like(v), s, *case.params[1:], case.axis)
    with pytest.raises(QcoreError, match="differentiates only v"):
        out.sum().backward()


def test_ops_pass_torch_library_checks():
    # the AOT-dispatch check (torch.compile's path) once, on the LSQ op; schema, fake and autograd on all four
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    case = next(c for c in CASES if c.x.dim() >= 2 and c.granularity == "channel")
    x = case.x.clone().requires_grad_(True)
    s = case.params[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.qcore.lsq_fake_quantize.default, (x, s, *case.params[1:], case.axis))
    floor = torch.floor(case.x / _shaped(case.params[0], case))
    v = torch.randn(case.x.shape, requires_grad=True)
    torch.library.opcheck(torch.ops.qcore.adaround_fake_quantize.default, (v, floor, *case.params, case.axis),
                          test_utils=quick)
    grad = torch.randn(case.x.shape)
    torch.library.opcheck(torch.ops.qcore.lsq_fake_quantize_backward.default,
                          (grad, case.x, *case.params[:5], case.axis), test_utils=quick)
    torch.library.opcheck(torch.ops.qcore.adaround_fake_quantize_backward.default,
                          (grad, v.detach(), floor, *case.params[:5], case.axis), test_utils=quick)


def test_switching_bits_in_place_after_forward_keeps_the_forward_grid():
    # PTMQ's multi-bit quantizers switch their bits in place between a forward and its backward
    case = next(c for c in CASES if c.granularity == "tensor" and c.params[4].item() > 1)
    grad = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for switch in (False, True):
        bits = case.params[4].clone()
        x = case.x.clone().requires_grad_(True)
        s = case.params[0].clone().requires_grad_(True)
        out = torch.ops.qcore.lsq_fake_quantize(x, s, *case.params[1:4], bits, case.params[5],
                                                case.axis % max(x.dim(), 1))
        if switch:
            bits.fill_(0.0)
        out.backward(grad)
        grads.append((x.grad, s.grad))
    assert same_bits(grads[0][0], grads[1][0]) and same_bits(grads[0][1], grads[1][1])


def test_cpu_tensors_and_zero_point_gradients_take_the_reference():
    """On CPU the op's implementation is the reference, so the public functions skip the op (it was slower); a
    zero point that needs a gradient also takes the reference (the op differentiates x and scale only)."""
    case = CASES[0]
    calls = []
    real = torch.ops.qcore.lsq_fake_quantize

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    import unittest.mock as mock

    with mock.patch.object(torch.ops.qcore, "lsq_fake_quantize", Spy()):
        ops.lsq_fake_quantize(case.x, *case.params, case.axis)
    assert not calls
    zp = case.params[1].clone().requires_grad_(True)
    out = ops.lsq_fake_quantize(case.x, case.params[0], zp, *case.params[2:], case.axis)
    out.sum().backward()
    assert zp.grad is not None
