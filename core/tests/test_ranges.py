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


def _assert_grid_search(x, bits, symmetric, lo, hi, factors, p, weights=None):
    """Each row's range is the factor of ``factors`` with the least mean ``weights * |error|^p``, every factor
    scored one by one with fake_quantize (first minimum on ties)."""
    from qcore.ops import fake_quantize, qparams_from_range

    w = torch.ones(x.shape[1]) if weights is None else weights
    for r in range(x.shape[0]):
        errs = []
        for f in factors:
            a, b = x[r].min() * f, x[r].max() * f
            s, z, qlo, qhi = qparams_from_range(a.reshape(1), b.reshape(1), bits[r:r + 1], symmetric)
            q = fake_quantize(x[r], s, z, qlo, qhi, bits=bits[r:r + 1].float())
            errs.append(float(((q - x[r]).abs().pow(p) * w).mean()))
        best = min(range(len(factors)), key=lambda i: (errs[i], i))
        assert torch.isclose(hi[r], x[r].max() * factors[best]) and torch.isclose(lo[r], x[r].min() * factors[best])


def test_mse_range_with_p_is_a_grid_search_on_the_mean_lp_error():
    """p other than 2 scores candidates by the mean |error|^p (BRECQ's 80-step search at p = 2.4): the same
    answer as scoring every factor one by one with fake_quantize; p = 2 is unchanged."""
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [0.2], [5.0]])
    x[1, 0] = 4.0  # an outlier row: the search must clip it
    bits = torch.tensor([4, 3, 4])
    for symmetric in (False, True):
        lo, hi = mse_range(x, bits, symmetric, steps=80, lowest=0.21, p=2.4)
        _assert_grid_search(x, bits, symmetric, lo, hi, torch.linspace(0.21, 1.0, 80), 2.4)
        assert torch.equal(quantize_error(x, lo[:, None], hi[:, None], bits[:, None].float(), symmetric, p=2.0),
                           quantize_error(x, lo[:, None], hi[:, None], bits[:, None].float(), symmetric))


def test_mse_range_weights_score_the_weighted_error_and_none_is_unchanged():
    """weights= scores each factor by the mean of weights * |error|^p (checked factor by factor against
    fake_quantize); all-ones weights give the unweighted answer bit for bit; a bad shape or a negative weight is a
    QcoreError."""
    import pytest

    from qcore import QcoreError
    from qcore.ops import fake_quantize, qparams_from_range

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=gen) * torch.linspace(0.1, 3.0, 300)
    bits = torch.tensor([2, 3, 4, 3])
    w = torch.rand(300, generator=gen) ** 4 * 40
    for symmetric in (True, False):
        plain = mse_range(x, bits, symmetric)
        for same in (mse_range(x, bits, symmetric, weights=torch.ones(300)),
                     mse_range(x, bits, symmetric, weights=torch.ones(4, 300)), mse_range(x, bits, symmetric, block=7)):
            assert all(torch.equal(a, b) for a, b in zip(same, plain, strict=True))
        for p in (2.0, 3.0):
            lo, hi = mse_range(x, bits, symmetric, steps=40, p=p, weights=w)
            _assert_grid_search(x, bits, symmetric, lo, hi, torch.linspace(0.05, 1.0, 40), p, w)
    per_row = torch.rand(4, 300, generator=gen)
    lo, hi = mse_range(x, bits, True, weights=per_row)
    for r in range(4):  # rows are independent: a row's weights decide its own range only
        lo_r, hi_r = mse_range(x[r:r + 1], bits[r:r + 1], True, weights=per_row[r])
        assert torch.equal(hi[r:r + 1], hi_r) and torch.equal(lo[r:r + 1], lo_r)
    assert not torch.equal(mse_range(x, bits, True, weights=w)[1], mse_range(x, bits, True)[1])  # w matters
    with pytest.raises(QcoreError, match="shape"):
        mse_range(x, bits, True, weights=torch.ones(299))
    with pytest.raises(QcoreError, match="non-negative"):
        mse_range(x, bits, True, weights=-w)
    e = quantize_error(x, plain[0][:, None], plain[1][:, None], bits[:, None], True, dim=1, weights=w)
    s, z, qlo, qhi = qparams_from_range(plain[0], plain[1], bits, True)
    q = fake_quantize(x, s[:, None], z[:, None], qlo[:, None], qhi[:, None], bits=bits[:, None].float())
    assert torch.allclose(e, ((q - x) ** 2 * w).mean(dim=1))


def test_input_rows_is_one_row_per_input_channel_or_one_row():
    """qcore.input_rows: a Conv2d input [N, C, H, W] becomes [C, N*H*W] (channel c's values), a Linear input
    [..., C] becomes [C, ...]; per_channel=False flattens to one row."""
    import torch.nn as nn

    from qcore import input_rows, torch_layer_info

    x = torch.randn(2, 3, 4, 5)
    conv = torch_layer_info(nn.Conv2d(3, 6, 3), "conv")
    rows = input_rows(x, conv, per_channel=True)
    assert rows.shape == (3, 40) and torch.equal(rows[1], x[:, 1].reshape(-1))
    assert torch.equal(input_rows(x, conv, per_channel=False), x.reshape(1, -1))
    t = torch.randn(2, 7, 5)
    lin = torch_layer_info(nn.Linear(5, 8), "fc")
    rows = input_rows(t, lin, per_channel=True)
    assert rows.shape == (5, 14) and torch.equal(rows[4], t[..., 4].reshape(-1))
