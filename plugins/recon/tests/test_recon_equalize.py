"""qcore-recon on an equalized layer (``-o equalize``): its trainable stand-ins see ``x / s`` and ``W * s``."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.testing import make_host, tiny_gelu_mlp
from qcore_recon import act_quant_for, acts_disabled, learning_layers, plugin, plugin_qdrop, rounding_for

CALIB = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def host():
    return make_host(("recon", plugin), ("qdrop", plugin_qdrop))


def test_stand_ins_agree_with_the_equalized_layer(host):
    q = qcore.quantize(tiny_gelu_mlp(), CALIB, "uniform", w_bits=4, a_bits=4, host=host,
                       options={"equalize": "gelu"})
    layer = qcore.quant_layers(q.model)["4"]
    assert layer.input_scale is not None
    fp = tiny_gelu_mlp()
    with torch.no_grad():
        x = fp[:4](CALIB)  # the GELU output, fc2's input
        want_fp, want_q, w0 = fp[4](x), layer(x), layer.module.weight.clone()
        with learning_layers({"4": layer}, rounding_for, None) as (roundings, _):
            assert list(roundings) == ["4"]
            with acts_disabled(q.model):  # AdaRound's start is the (equalized) FP weight: the FP layer
                torch.testing.assert_close(layer(x), want_fp, rtol=1e-4, atol=1e-5)
        layer.module.weight.copy_(w0)  # leaving wrote the hard-rounded weight: back to the run's
        with learning_layers({"4": layer}, None, lambda aq: act_quant_for(aq, learn=True), commit_acts=False):
            torch.testing.assert_close(layer(x), want_q, rtol=1e-5, atol=1e-6)  # LSQ's start: the same grid on x/s


def test_qdrop_runs_on_an_equalized_model(host):
    q = qcore.quantize(tiny_gelu_mlp(), CALIB, "qdrop", w_bits=4, a_bits=4, host=host, batch_size=32,
                       options={"equalize": "gelu", "iters": 4, "cache": "off"})
    assert q.report["quantized"]["equalized"]["layers"] == ["4"]
    layer = qcore.quant_layers(q.model)["4"]
    with torch.no_grad():  # the learned input range is one of x / s, whose largest channels were shrunk
        x = tiny_gelu_mlp()[:4](CALIB)
        assert float(layer.act_quantizer.hi) < 0.5 * float(x.max())
        assert torch.isfinite(q.model(CALIB)).all()
