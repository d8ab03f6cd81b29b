"""The ``qcore::fake_quantize_channels`` torch op is the reference, bit for bit, forward and backward.

Random cases cover every layout the fake quantizers produce: per-tensor / per-channel / per-group parameters
(groups spread to channels, a short last group), bits 0..16, symmetric and affine grids, odd sizes, any axis,
zero-width and one-point clip ranges, float32 and float16 inputs.
"""

from __future__ import annotations

import pytest
import torch

from qcore import QuantSpec, UniformFakeQuant
from qcore.ops import (
    KERNELS_ENV,
    fake_quantize,
    fake_quantize_channels,
    fake_quantize_grad,
    qparams_from_range,
)
from qcore.testing import fake_quant_case, same_bits


def shaped(params: tuple[torch.Tensor, ...], ndim: int, axis: int) -> list[torch.Tensor]:
    """Per-channel vectors shaped to broadcast, as :class:`UniformFakeQuant` always shaped them."""
    out = []
    for v in params:
        if v.numel() == 1:
            out.append(v.reshape([]))
        else:
            s = [1] * ndim
            s[axis] = v.numel()
            out.append(v.reshape(s))
    return out


def reference(x: torch.Tensor, params: tuple[torch.Tensor, ...], axis: int) -> torch.Tensor:
    s, z, qmin, qmax, bits, prune = shaped(params, x.dim(), axis)
    return fake_quantize(x, s, z, qmin, qmax, bits=bits, prune_value=prune).to(x.dtype)


CASES = [fake_quant_case(seed) for seed in range(300)]


def test_cases_cover_the_space():
    bits = torch.cat([c.params[4] for c in CASES])
    assert set(bits.long().tolist()) == set(range(17))
    assert {c.granularity for c in CASES} == {"tensor", "channel", "group"}
    assert {c.symmetric for c in CASES} == {True, False} and {c.x.dtype for c in CASES} == {torch.float16,
                                                                                          torch.float32}
    assert any((c.params[0] == 1e-12).any() for c in CASES)  # zero-width ranges reached
    assert any(c.x.shape[c.axis] % 2 == 1 and c.x.shape[c.axis] > 1 for c in CASES if c.granularity == "group")


@pytest.mark.parametrize("case", CASES[:150], ids=repr)
def test_op_forward_and_gradient_are_the_reference_bit_for_bit(case):
    x, params, axis = case.x, case.params, case.axis
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)

    xr = x.clone().requires_grad_(True)
    want = reference(xr, params, axis)
    want.backward(grad)

    xo = x.clone().requires_grad_(True)
    got = torch.ops.qcore.fake_quantize_channels(xo, *params, axis)
    got.backward(grad)

    assert got.dtype == x.dtype and got.shape == x.shape
    assert same_bits(got, want)
    assert same_bits(xo.grad, xr.grad)


@pytest.mark.parametrize("case", CASES[150:], ids=repr)
def test_explicit_gradient_formula_is_autograds(case):
    x, params, axis = case.x, case.params, case.axis
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    xr = x.clone().requires_grad_(True)
    reference(xr, params, axis).backward(grad)
    s, z, qmin, qmax, bits, _ = shaped(params, x.dim(), axis)
    assert same_bits(fake_quantize_grad(grad, x, s, z, qmin, qmax, bits=bits), xr.grad)


def test_gradient_is_straight_through_inside_and_zero_outside():
    # 2 bits symmetric on [-1, 1]: scale 1, grid {-2, -1, 0, 1}; 0.4 and -0.7 pass, 1.6 and -2.6 round outside
    # the grid (zero); 1.2 rounds onto qmax, where torch's clamp splits the gradient with the bound (half)
    row = [0.4, 1.6, -2.6, -0.7, 1.2]
    x = torch.tensor([row, row], requires_grad=True)
    s, z, qmin, qmax = qparams_from_range(-torch.ones(2), torch.ones(2), torch.tensor([2.0, 0.0]), True)
    out = fake_quantize_channels(x, s, z, qmin, qmax, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), axis=0)
    out.backward(torch.full_like(x, 3.0))
    assert out.tolist() == [[0.0, 1.0, -2.0, -1.0, 1.0], [3.0] * 5]
    assert x.grad.tolist() == [[3.0, 0.0, 0.0, 3.0, 1.5], [0.0] * 5]  # the pruned row gets none


def test_parameters_needing_a_gradient_take_the_reference_path():
    case = CASES[3]
    x, params, axis = case.x.float(), list(case.params), case.axis
    params[0] = params[0].clone().requires_grad_(True)
    fake_quantize_channels(x, *params, axis).sum().backward()
    want = params[0].detach().clone().requires_grad_(True)
    reference(x, (want, *params[1:]), axis).sum().backward()
    assert torch.equal(params[0].grad, want.grad)


def test_op_passes_torch_library_checks():
    case = next(c for c in CASES if c.x.dtype == torch.float32 and c.x.dim() >= 2 and c.granularity == "group")
    x = case.x.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.qcore.fake_quantize_channels.default, (x, *case.params, case.axis))
    torch.library.opcheck(torch.ops.qcore.fake_quantize_channels_backward.default,
                          (torch.ones_like(case.x), case.x, *case.params[:5], case.axis))


def test_the_module_calls_the_op_unless_the_reference_is_forced(monkeypatch):
    fq = UniformFakeQuant(QuantSpec(bits=4, granularity="channel", symmetric=True), channels=3, axis=0)
    fq.set_range(-torch.ones(3), torch.ones(3))

    def targets() -> set[str]:  # torch.export traces with fake tensors: the op's register_fake runs
        return {str(n.target) for n in torch.export.export(fq, (torch.randn(3, 5),)).graph.nodes}

    assert "qcore.fake_quantize_channels.default" in targets()
    monkeypatch.setenv(KERNELS_ENV, "reference")
    assert "qcore.fake_quantize_channels.default" not in targets()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_module_output_is_the_same_with_the_reference_forced(granularity, monkeypatch):
    spec = QuantSpec(bits=3, granularity=granularity, symmetric=False,
                     **({"group_size": 2, "group_bits": (0, 5, 16)} if granularity == "group" else {}))
    fq = UniformFakeQuant(spec, channels=5, axis=1)
    fq.set_range(-torch.rand(fq.rows), torch.rand(fq.rows))
    x = torch.randn(2, 5, 3, requires_grad=True)
    via_op = fq(x)
    (g_op,) = torch.autograd.grad(via_op.sum(), x)
    monkeypatch.setenv(KERNELS_ENV, "reference")
    direct = fq(x)
    (g_ref,) = torch.autograd.grad(direct.sum(), x)
    assert same_bits(via_op, direct) and same_bits(g_op, g_ref)


def test_unknown_kernel_choice_is_an_error(monkeypatch):
    from qcore import QcoreError

    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(QcoreError, match="QCORE_KERNELS"):
        fake_quantize_channels(torch.zeros(2), *(torch.ones(1),) * 6, axis=0)
