"""QuantLayer state: a fresh layer loads the optional buffers (equalization, output corrections) from a state dict,
and the int32 bias (``-o bias=int32``) is cached yet follows every change of what it is computed from."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.testing import tiny_convnet
from qcore.testing import tiny_gelu_mlp as gelu_mlp

OPTIONAL = ("input_scale", "out_correction", "out_scale")


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_fresh_layers_load_equalization_and_corrections_from_a_state_dict(calib) -> None:
    """Before: the fresh layers' None buffers made ``load_state_dict`` refuse the keys (strict) or drop them (not
    strict), and a frozen layer kept serving the weight it had quantized before loading."""
    src = qcore.quantize(gelu_mlp(), calib, method="uniform", w_bits=4, a_bits=4,
                         options={"equalize": "gelu", "act_correction": "affine", "first_last": "same"})
    held = {(n, b) for n, layer in qcore.quant_layers(src.model).items() for b in OPTIONAL
            if getattr(layer, b) is not None}
    assert {b for _, b in held} == set(OPTIONAL)  # the source has every optional buffer somewhere
    for strict in (True, False):
        fresh = qcore.quantize(gelu_mlp(seed=1), calib, method="uniform", w_bits=4, a_bits=4,
                               options={"equalize": "off", "first_last": "same"})
        layers = qcore.quant_layers(fresh.model)
        assert all(getattr(layer, b) is None for layer in layers.values() for b in OPTIONAL)
        result = fresh.model.load_state_dict(src.model.state_dict(), strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        assert {(n, b) for n, layer in layers.items() for b in OPTIONAL if getattr(layer, b) is not None} == held
        assert all(layer._wq is not None for layer in layers.values())  # still frozen, on the loaded weight
        with torch.no_grad():
            assert torch.equal(fresh.model(calib[:16]), src.model(calib[:16]))
        for name, layer in layers.items():
            for b in OPTIONAL:
                if (name, b) in held:
                    assert torch.equal(getattr(layer, b), getattr(qcore.quant_layers(src.model)[name], b))


def test_int32_bias_is_cached_and_equals_the_recomputed_one(calib, monkeypatch) -> None:
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4,
                       options={"bias": "int32", "act_correction": "affine"})
    layers = qcore.quant_layers(q.model)
    x = calib[:8]
    with torch.no_grad():
        cached_out = q.model(x)
        calls: list[str] = []
        compute = qcore.QuantLayer._compute_int32_bias

        def counting(layer: qcore.QuantLayer) -> object:
            calls.append("x")
            return compute(layer)

        monkeypatch.setattr(qcore.QuantLayer, "_compute_int32_bias", counting)
        assert torch.equal(q.model(x), cached_out) and not calls  # served from the cache: nothing recomputed
        monkeypatch.setattr(qcore.QuantLayer, "int32_bias", compute)  # the uncached path
        assert torch.equal(q.model(x), cached_out)
        monkeypatch.undo()
        for layer in layers.values():
            codes, scale = layer.int32_bias()
            ref_codes, ref_scale = layer._compute_int32_bias()
            assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
            assert layer.int32_bias()[0] is codes  # the same tensors: cached

    def check(layer: qcore.QuantLayer, before: torch.Tensor) -> None:
        codes, scale = layer.int32_bias()
        ref_codes, ref_scale = layer._compute_int32_bias()
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        assert not torch.equal(codes * scale, before)  # the change reached the cached value

    last = list(layers.values())[-1]  # the Linear, with a bias of its own
    with torch.no_grad():
        before = torch.mul(*last.int32_bias())
        last.module.bias.add_(1.0)  # in place
        check(last, before)
        before = torch.mul(*last.int32_bias())
        last.out_correction = last.out_correction - 0.5  # replaced
        check(last, before)
        before = torch.mul(*last.int32_bias())
        aq = last.act_quantizer
        aq.set_range(aq.lo * 2, aq.hi * 2)  # another input scale
        check(last, before)
        before = torch.mul(*last.int32_bias())
        last.bias_mode = "float"
        assert last.int32_bias() is None
        last.bias_mode = "int32"
        assert torch.equal(torch.mul(*last.int32_bias()), before)
