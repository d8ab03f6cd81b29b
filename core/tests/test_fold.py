import torch
from torch import nn

from qcore._fold import fold_batchnorm
from qcore.testing import tiny_convnet


def test_folding_preserves_outputs():
    model = tiny_convnet()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_batchnorm(model)
        out = model(x)
    assert pairs == [("0", "1"), ("3", "4")]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(out, ref, atol=1e-5)


def test_bn_with_two_consumers_is_not_folded():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)
            self.bn = torch.nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output used twice: folding would change the sum

    net = Net().eval()
    assert fold_batchnorm(net) == []


def test_shared_or_reused_modules_are_not_folded():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)
            self.bn = torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x * 2)  # conv called twice, only once into the BN

    class Twice(Shared):
        def forward(self, x):
            return self.bn(self.conv(self.bn(self.conv(x))))  # the same pair applied twice

    for cls in (Shared, Twice):
        net = cls().eval()
        with torch.no_grad():
            net.bn.running_mean.fill_(0.3)
            net.bn.running_var.fill_(2.0)
        x = torch.randn(2, 2, 3, 3)
        ref = net(x)
        assert fold_batchnorm(net) == []
        assert torch.allclose(net(x), ref)
    stats_free = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, track_running_stats=False))
    assert fold_batchnorm(stats_free.eval()) == []


class _Untraceable(nn.Module):
    """A conv and a BN behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_an_untraceable_model_is_left_unfolded_with_a_warning_unless_expected(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="qcore"):
        assert fold_batchnorm(_Untraceable().eval()) == []
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qcore"):
        assert fold_batchnorm(_Untraceable().eval(), untraceable="sparse tensors") == []
    assert [r.levelname for r in caplog.records] == ["INFO"] and "sparse tensors" in caplog.text
