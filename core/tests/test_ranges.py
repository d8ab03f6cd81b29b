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


def test_mse_range_with_p_is_a_grid_search_on_the_mean_lp_error():
    """p other than 2 scores candidates by the mean |error|^p (BRECQ's 80-step search at p = 2.4): the same
    answer as scoring every factor one by one with fake_quantize; p = 2 is unchanged."""
    from qcore.ops import fake_quantize, qparams_from_range

    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [0.2], [5.0]])
    x[1, 0] = 4.0  # an outlier row: the search must clip it
    bits = torch.tensor([4, 3, 4])
    for symmetric in (False, True):
        lo, hi = mse_range(x, bits, symmetric, steps=80, lowest=0.21, p=2.4)
        factors = torch.linspace(0.21, 1.0, 80)
        for r in range(3):
            errs = []
            for f in factors:
                a, b = x[r].min() * f, x[r].max() * f
                s, z, qlo, qhi = qparams_from_range(a.reshape(1), b.reshape(1), bits[r:r + 1], symmetric)
                q = fake_quantize(x[r], s, z, qlo, qhi, bits=bits[r:r + 1].float())
                errs.append(float((q - x[r]).abs().pow(2.4).mean()))
            best = min(range(80), key=lambda i: (errs[i], i))
            assert torch.isclose(hi[r], x[r].max() * factors[best]) and torch.isclose(lo[r], x[r].min() * factors[best])
        assert torch.equal(quantize_error(x, lo[:, None], hi[:, None], bits[:, None].float(), symmetric, p=2.0),
                           quantize_error(x, lo[:, None], hi[:, None], bits[:, None].float(), symmetric))
