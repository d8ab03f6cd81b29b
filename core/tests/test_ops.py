"""Fake-quant arithmetic against hand-computed values."""

import torch

from qcore.ops import fake_quantize, int_range, qparams_from_range, round_ste


def fq(x, lo, hi, bits, symmetric, prune_value=0.0):
    b = torch.as_tensor(bits, dtype=torch.float32)
    s, z, qmin, qmax = qparams_from_range(torch.as_tensor(lo), torch.as_tensor(hi), b, symmetric)
    return fake_quantize(x, s, z, qmin, qmax, bits=b, prune_value=prune_value)


def test_int_ranges():
    lo, hi = int_range(torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0]), symmetric=True)
    assert lo.tolist() == [0, -1, -2, -8, -128] and hi.tolist() == [0, 0, 1, 7, 127]
    lo, hi = int_range(torch.tensor([1.0, 4.0]), symmetric=False)
    assert lo.tolist() == [0, 0] and hi.tolist() == [1, 15]


def test_symmetric_4bit_by_hand():
    # clip 7 -> scale 1: values round to integers, clamp to [-8, 7]
    x = torch.tensor([-9.0, -3.4, -0.5, 0.49, 2.5, 6.6, 10.0])
    out = fq(x, -7.0, 7.0, 4, True)
    assert out.tolist() == [-8.0, -3.0, -0.0, 0.0, 2.0, 7.0, 7.0]


def test_affine_range_includes_exact_zero():
    # [0.5, 3.5] is widened to [0, 3.5]; 2 bits -> scale 3.5/3, zero point 0
    x = torch.tensor([0.0, 1.0, 2.0, 3.5, 5.0])
    out = fq(x, 0.5, 3.5, 2, False)
    s = 3.5 / 3
    assert torch.allclose(out, torch.tensor([0.0, s, 2 * s, 3 * s, 3 * s]))
    # an asymmetric range around zero: zero must map to 0.0 exactly
    out = fq(torch.tensor([0.0, -1.0, 3.0]), -1.0, 3.0, 3, False)
    assert out[0].item() == 0.0


def test_one_bit_symmetric_levels():
    out = fq(torch.tensor([-2.0, -0.6, -0.4, 0.3, 2.0]), -1.0, 1.0, 1, True)
    assert out.tolist() == [-1.0, -1.0, -0.0, 0.0, 0.0]


def test_per_channel_mixed_bits_and_pruning():
    x = torch.tensor([[1.0, -1.0, 0.3], [1.0, -1.0, 0.3], [5.0, 4.0, 3.0]])
    bits = torch.tensor([[8.0], [1.0], [0.0]])
    lo = torch.tensor([[-1.0], [-1.0], [-1.0]])
    hi = torch.tensor([[1.0], [1.0], [1.0]])
    s, z, qmin, qmax = qparams_from_range(lo, hi, bits, True)
    out = fake_quantize(x, s, z, qmin, qmax, bits=bits, prune_value=torch.tensor([[0.0], [0.0], [4.0]]))
    assert torch.allclose(out[0], torch.round(x[0] * 127) / 127)
    assert out[1].tolist() == [0.0, -1.0, 0.0]
    assert out[2].tolist() == [4.0, 4.0, 4.0]  # pruned row takes the prune value (e.g. the channel mean)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 0.7, 5.0], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    fq(x, -1.0, 1.0, 4, True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped value gets no gradient
