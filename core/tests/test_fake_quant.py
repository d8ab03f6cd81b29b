import pytest
import torch

from qcore._errors import QcoreError
from qcore._fake_quant import Observer, UniformFakeQuant
from qcore._spec import QuantSpec


def test_group_rows_and_bits():
    spec = QuantSpec(4, granularity="group", group_size=2, group_bits=(8, 2, 0))
    q = UniformFakeQuant(spec, channels=5, axis=0)
    w = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    rows = q.rows_of(w)
    assert rows.shape == (3, 6)
    assert rows[2].tolist() == [12, 13, 14, 12, 13, 14]  # short last group repeats its own channel
    assert q.row_bits().tolist() == [8, 2, 0]
    assert q.bits.tolist() == [8, 8, 2, 2, 0]


def test_uncalibrated_module_refuses_to_run():
    q = UniformFakeQuant(QuantSpec(8), None, axis=1)
    with pytest.raises(QcoreError, match="before calibration"):
        q(torch.ones(2, 3))


def test_per_channel_forward_matches_reference():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    q = UniformFakeQuant(QuantSpec(4, granularity="channel"), channels=4, axis=0)
    rows = q.rows_of(w)
    q.set_range(rows.amin(1), rows.amax(1))
    out = q(w)
    for c in range(4):  # slow reference: channel by channel
        clip = w[c].abs().max()
        scale = clip / 7
        ref = torch.clamp(torch.round(w[c] / scale), -8, 7) * scale
        assert torch.allclose(out[c], ref, atol=1e-6)


def test_activation_channel_axis_and_prune_value():
    spec = QuantSpec(8, symmetric=False, granularity="channel", group_size=1, group_bits=(8, 0))
    q = UniformFakeQuant(spec, channels=2, axis=1)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [B=1, C=2, 2]
    q.set_range(torch.tensor([0.0, 0.0]), torch.tensor([2.0, 4.0]))
    q.set_prune_value(torch.tensor([0.0, 3.5]))
    out = q(x)
    assert torch.allclose(out[0, 0], x[0, 0], atol=2 / 255)
    assert out[0, 1].tolist() == [3.5, 3.5]


def test_set_range_rejects_nan():
    q = UniformFakeQuant(QuantSpec(8), None, axis=1)
    with pytest.raises(Exception, match="not finite"):
        q.set_range(torch.tensor(float("nan")), torch.tensor(1.0))


def test_observer_keeps_exact_extremes_and_bounded_sample():
    obs = Observer(max_per_row=100, seed=0)
    for i in range(10):
        obs.update(torch.arange(1000, dtype=torch.float32).reshape(1, -1) + i)
    s = obs.sample()
    assert s.shape[1] <= 2 * 100 + 2
    assert s.min().item() == 0 and s.max().item() == 1008


def test_observer_sample_is_uniform_over_batches():
    obs = Observer(max_per_row=600, seed=0)
    for i in range(12):
        obs.update(torch.full((1, 5000), float(i)) + torch.rand(1, 5000) * 0.1)
    counts = torch.bincount(obs.buf[0].floor().long(), minlength=12)
    assert counts.min() >= 25 and counts.max() <= 80  # expected 50 from each batch


def test_mean_correction_preserves_each_channel_mean_exactly():
    from qcore._bias_correction import correct_weight

    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    w = w + torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None, None, None]
    q = UniformFakeQuant(QuantSpec(3, granularity="channel", group_size=1, group_bits=(3, 3, 2, 2, 0, 1)), 6, 0)
    rows = q.rows_of(w.float())
    q.set_range(rows.amin(1), rows.amax(1))
    wq = q(w.float()).double()
    for mode in ("mean", "mean+var"):
        out = correct_weight(w, wq, mode)
        assert torch.allclose(out.mean(dim=(1, 2, 3)), w.mean(dim=(1, 2, 3)), atol=1e-12)
    var = correct_weight(w, wq, "mean+var")
    nz = [0, 1, 2, 3, 5]  # channels that were not pruned keep their FP spread
    assert torch.allclose(var[nz].std(dim=(1, 2, 3), unbiased=False), w[nz].std(dim=(1, 2, 3), unbiased=False))
    assert torch.allclose(correct_weight(w, wq, "mean")[4], w[4].mean().expand_as(w[4]))  # pruned: FP mean
    assert correct_weight(w, wq, "none") is wq
