"""Issue 17: a quantized Linear/Conv really stores its bits in memory (``qcore.load(..., packed=True)``,
:func:`qcore.packing.pack_layers`): no float weight left, fewer bytes, the unpacked model's outputs."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import qcore
from qcore import packing
from qcore.testing import make_host, same_bits, tiny_convnet


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of the quantized layers' modules and packed codes (quantizer
    buffers left out: both models hold the same ones)."""
    total = 0
    for layer in qcore.quant_layers(model).values():
        tensors = [*layer.module.parameters(), *layer.module.buffers()]
        tensors += [b for n, b in layer.named_buffers(recurse=False) if n.startswith("packed_")]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def test_packed_layers_hold_codes_not_floats_and_give_the_same_outputs(tmp_path):
    host = make_host()
    model = tiny_convnet()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = qcore.quantize(model, x, w_bits=4, a_bits=8, host=host)
    path = q.save(tmp_path / "m.qcore")
    fp = qcore.load(path, model, host=host)
    with mock.patch.object(packing, "dequant_matmul", wraps=packing.dequant_matmul) as spy:
        pk = qcore.load(path, model, host=host, packed=True)
        with torch.no_grad():
            assert same_bits(pk(x), fp(x))  # Conv decodes bit for bit; the Linear's matmul happens to match too
        assert spy.call_count == 1  # the Linear multiplied through the packed op
    layers = qcore.quant_layers(pk)
    assert {type(layer.module).__name__ for layer in layers.values()} == {"Conv2d", "Linear"}
    for name, layer in layers.items():
        assert layer.module.weight is None and layer._wq is None, name
        assert all(n != "weight" for n, _ in layer.module.named_parameters()), name
        assert layer.packed_codes.dtype == torch.uint8
        floats = [n for n, t in layer.named_buffers() if t.numel() >= layer.packed_shape[0] * 2
                  and t.is_floating_point()]
        assert not floats, (name, floats)  # only [C]-sized per-row parameters are float
    assert not [k for k in pk.state_dict() if k.endswith("module.weight")]
    # 4-bit inner conv, 8-bit first/last: codes are 1/8 and 1/4 of float32, per-row parameters on top
    assert _weight_bytes(pk) < 0.4 * _weight_bytes(fp)
    # inference only: saving or exporting the in-memory packed model is refused in one line
    from qcore._saved import unsaved_reason

    assert "packed weight codes in memory" in unsaved_reason(pk)
    with pytest.raises(qcore.QcoreError, match="cannot be exported"):
        qcore.export_onnx(pk, x[:2], tmp_path / "m.onnx", check=False)


@pytest.mark.parametrize("options", [{}, {"bias": "int32", "act_correction": "affine"}])
def test_packed_linear_on_3d_input_matches_within_float32_rounding(options):
    host = make_host()
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 12))
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    q = qcore.quantize(model, x, w_bits=3, a_bits=8, host=host, options=options)
    if options:  # the int32 bias and the output correction run on the packed path too
        layers = qcore.quant_layers(q.model).values()
        assert all(layer.out_scale is not None and layer.int32_bias() is not None for layer in layers)
    with torch.no_grad():
        want = q.model(x)
        packed = packing.pack_layers(q.model)
        assert set(packed) == set(qcore.quant_layers(q.model)) and all(packed.values())
        got = q.model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
