import torch

from qcore.ops import quantize_error
from qcore.ranges import minmax_range, mse_range, percentile_range


def test_mse_range_never_worse_than_minmax():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((3, 4000))
    bits = torch.tensor([2.0, 3.0, 4.0])
    lo0, hi0 = minmax_range(x, bits, True)
    lo1, hi1 = mse_range(x, bits, True)
    e0 = quantize_error(x, lo0[:, None], hi0[:, None], bits[:, None], True, dim=1)
    e1 = quantize_error(x, lo1[:, None], hi1[:, None], bits[:, None], True, dim=1)
    assert (e1 <= e0 + 1e-9).all()
    assert (hi1 < hi0).all()  # heavy tails: clipping pays at low bits


def test_percentile_range():
    x = torch.arange(10001, dtype=torch.float32).reshape(1, -1)
    lo, hi = percentile_range(x, torch.tensor([8.0]), False, q=99.0)
    assert abs(lo.item() - 100) < 1e-3 and abs(hi.item() - 9900) < 1e-3
    lo, hi = percentile_range(x - 5000, torch.tensor([8.0]), True, q=50.0)
    assert abs(hi.item() - 2500) < 1 and lo.item() == -hi.item()
