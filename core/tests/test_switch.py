"""Run-time bit-width switching (core): the FakeQuantizer protocol's ``bit_choices``/``select_bits``,
``qcore.select_bits`` uniformly and from a plan, ``qcore.load(..., bits=)``, and ``qcore eval`` on a saved file."""

from __future__ import annotations

import json

import pytest
import torch

import qcore
from qcore._evaluate import evaluate_saved
from qcore._saved import read_meta
from qcore._switch import bits_in_effect
from qcore.ranges import minmax_range
from qcore.testing import make_host, run_tiny


class TwoBit(qcore.UniformFakeQuant):
    """A switchable test format: one range per bit-width in (3, 5), the active one in lo/hi."""

    def __init__(self, spec: qcore.QuantSpec, channels: int | None, axis: int) -> None:
        super().__init__(spec, channels, axis)
        self.ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bit_choices(self) -> tuple[int, ...]:
        return (3, 5)

    def select_bits(self, bits: int) -> None:
        if bits not in (3, 5):
            raise qcore.QcoreError("no")
        self.bits.fill_(float(bits))


def test_a_fixed_quantizer_holds_its_own_bits_only():
    q = qcore.UniformFakeQuant(qcore.QuantSpec(4), None, 1)
    assert q.bit_choices() == ()
    q.select_bits(4)  # its own: fine
    with pytest.raises(qcore.QcoreError, match="holds one bit-width"):
        q.select_bits(3)


def test_select_bits_switches_only_switchable_quantizers_and_refreshes_frozen_weights():
    host = make_host()
    out = run_tiny(host, w_bits=4, a_bits=4)
    model = out.model
    layers = qcore.quant_layers(model)
    name = list(layers)[1]
    layer = layers[name]
    w = layer.module.weight.detach()
    layer.weight_quantizer = TwoBit(layer.weight_quantizer.spec, w.shape[0], 0)
    qcore.calibrate_rows(layer.weight_quantizer, layer.weight_quantizer.rows_of(w), minmax_range)
    layer.freeze()
    assert qcore.switchable_bits(model) == {"weight": [3, 5], "act": []}
    before = layer.quantized_weight().clone()
    with pytest.raises(qcore.QcoreError, match="no act quantizer of this model switches bit-width"):
        qcore.select_bits(model, w_bits=3, a_bits=8)  # inputs are at 4 bits (8 at first/last) and cannot switch
    done = qcore.select_bits(model, w_bits=3)
    assert done == {name: {"weight": 3}}
    assert 3 in bits_in_effect(model)["weight"]  # what runs now, not the plan's bits
    after = layer.quantized_weight()
    assert not torch.equal(before, after)  # the cached weight was recomputed at 3 bits
    assert len(torch.unique(after[0])) <= 8
    with pytest.raises(qcore.QcoreError, match="holds weight bit-widths 3, 5, not 4"):
        qcore.select_bits(model, w_bits=4)
    plan = {"version": 1, "layers": {name: {"weight": {"bits": 5, "granularity": "channel", "group_size": None}}}}
    assert qcore.select_bits(model, plan=plan) == {name: {"weight": 5}}
    with pytest.raises(qcore.QcoreError, match="holds one weight bit-width, not 5 from the bit plan"):
        qcore.select_bits(model, plan={"version": 1, "layers": {list(layers)[0]: {"weight": {"bits": 5}}}})
    with pytest.raises(qcore.QcoreError, match="a JSON object"):
        qcore.select_bits(model, plan=[1, 2])
    with pytest.raises(qcore.QcoreError, match="does not quantize"):
        qcore.select_bits(model, plan={"version": 1, "layers": {"nope": {"weight": {"bits": 5}}}})


def test_saved_file_records_the_run_and_qcore_eval_rebuilds_it(tmp_path):
    host = make_host()
    out = run_tiny(host, w_bits=4, a_bits=4, out=tmp_path / "run")
    path = tmp_path / "run" / "model.qcore"
    meta = read_meta(path)
    assert meta["run"]["task"] == "tiny" and meta["run"]["model"] == "tiny:convnet"
    assert meta["switchable_bits"] == {"weight": [], "act": []}
    assert meta["bits_in_effect"] == {"weight": [4, 8], "act": [4, 8]}  # first/last pinned at 8
    got = evaluate_saved(path, host, eval_size=128)
    assert got["bits_in_effect"] == meta["bits_in_effect"]
    assert got["quant"] == pytest.approx(out.result["quant"])  # same model, same evaluation data, no calibration
    with pytest.raises(qcore.QcoreError, match="holds one bit-width setting"):
        evaluate_saved(path, host, w_bits=3, a_bits=3)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(qcore.QcoreError, match="not valid JSON"):
        evaluate_saved(path, host, bit_plan=tmp_path / "bad.json")
    json.dumps(got, default=str)


def test_a_python_api_file_is_not_evaluated_by_the_cli(tmp_path):
    from qcore.testing import tiny_convnet

    host = make_host()
    q = qcore.quantize(tiny_convnet(), torch.randn(16, 1, 8, 8), w_bits=4, a_bits=8, host=host)
    path = q.save(tmp_path / "m.qcore")
    with pytest.raises(qcore.QcoreError, match="qcore.quantize"):
        evaluate_saved(path, host)
