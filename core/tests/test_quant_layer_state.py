"""QuantLayer state: a fresh layer loads the optional buffers (equalization, output corrections) from a state dict,
and the int32 bias (``-o bias=int32``) is cached yet follows every change of what it is computed from."""

from __future__ import annotations

import copy
import pickle
import re

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


def _int32_layer(calib: torch.Tensor) -> tuple[torch.nn.Module, qcore.QuantLayer]:
    """A tiny conv net quantized with ``-o bias=int32`` and its last layer (a Linear with a bias)."""
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4, options={"bias": "int32"})
    return q.model, list(qcore.quant_layers(q.model).values())[-1]


def _fresh(layer: qcore.QuantLayer) -> bool:
    """Whether the layer's int32 bias is what it computes from scratch now."""
    codes, scale = layer.int32_bias()
    ref_codes, ref_scale = layer._compute_int32_bias()
    return torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_a_copied_layer_does_not_serve_the_originals_int32_bias(calib, duplicate) -> None:
    """Before: a copy kept the cache key of the original's tensors' version counters, while the copy's tensors
    count again (a copied buffer starts at 1), so once the copy's counters had caught up with the original's (here:
    every buffer written once, as a switchable quantizer's ``select_bits`` and ``set_prune_value`` do, then as many
    range changes as the original had) the stale key matched and the copy served the original's int32 bias."""
    model, last = _int32_layer(calib)
    aq = last.act_quantizer
    with torch.no_grad():
        for q in (last.weight_quantizer, aq):
            for b in q.buffers():
                if b._version == 0:
                    b.add_(0)
        for _ in range(3):  # the original's range buffers are some versions on
            aq.set_range(aq.lo.clone(), aq.hi.clone())
        last.int32_bias()
        for k in range(1, 6):  # whatever a copy's counters start at, one of these lands on the original's
            dup = copy.deepcopy(model) if duplicate == "deepcopy" else pickle.loads(pickle.dumps(model))
            layer = list(qcore.quant_layers(dup).values())[-1]
            for i in range(k):  # k changes in a row, then the forward's int32_bias
                layer.act_quantizer.set_range(aq.lo * (1.5 + i), aq.hi * (1.5 + i))
            assert _fresh(layer), k


def test_int32_bias_follows_a_bias_replaced_through_data_and_a_dtype_move(calib) -> None:
    """Assigning ``.data`` keeps the tensor and its version counter (before: the cache kept the old bias when the
    new data had the same device, dtype and shape); ``model.double()`` moves every tensor it reads."""
    model, last = _int32_layer(calib)
    with torch.no_grad():
        before = torch.mul(*last.int32_bias())
        last.module.bias.data = last.module.bias.detach() + 1.0
        assert _fresh(last) and not torch.equal(torch.mul(*last.int32_bias()), before)
        model.double()
        assert _fresh(last) and last.int32_bias()[1].device == last.module.bias.device


def test_a_fresh_layer_refuses_optional_buffers_of_the_wrong_size_and_reports_unknown_keys(calib) -> None:
    """Before: a fresh layer created each optional buffer in the shape the state dict held, so a correction of
    another layer's size loaded silently (and broke or, with one entry, silently broadcast at the forward)."""
    src = qcore.quantize(gelu_mlp(), calib, method="uniform", w_bits=4, a_bits=4,
                         options={"equalize": "gelu", "act_correction": "affine", "first_last": "same"})
    state = src.model.state_dict()
    fresh = qcore.quantize(gelu_mlp(seed=1), calib, method="uniform", w_bits=4, a_bits=4,
                           options={"equalize": "off", "first_last": "same"})
    for name in OPTIONAL:
        key = next(k for k in state if k.endswith("." + name))
        target = copy.deepcopy(fresh.model)  # the buffer under test stays None: a refused one is not created
        for wrong in (torch.ones(1), torch.ones(state[key].numel() + 3), state[key].reshape(-1, 1)):
            for strict in (True, False):
                with pytest.raises(RuntimeError, match=f"size mismatch for {re.escape(key)}"):
                    target.load_state_dict({**state, key: wrong}, strict=strict)
        assert getattr(target.get_submodule(key.rsplit(".", 1)[0]), name) is None
    layer_key = next(k for k in state if k.endswith(".out_scale")).rsplit(".", 1)[0]
    extra = {f"{layer_key}.bogus": torch.ones(3), f"{layer_key}.packed_codes": torch.ones(3, dtype=torch.uint8)}
    result = fresh.model.load_state_dict({**state, **extra}, strict=False)
    assert sorted(result.unexpected_keys) == sorted(extra) and not result.missing_keys
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.model.load_state_dict({**state, **extra})
