"""qcore.packing: packed low-bit codes round-trip exactly, decode to the fake-quantized weight bit for bit, the
dequant-matmul reference is the fake-quant matmul, and a packed ``.qcore`` file holds the bits and loads back to
the same outputs."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore import packing
from qcore.testing import make_host, same_bits, tiny_convnet


def _codes(seed: int, rows: int, length: int, bits: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, length, generator=g) * 2.0 ** bits[:, None].double()).floor().to(torch.int32)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 5, 7, 13, 64])
def test_int2_int3_int4_round_trip_exactly_with_odd_lengths(width, length):
    bits = torch.full((3,), width)
    codes = _codes(length, 3, length, bits)
    codes[0, 0], codes[-1, -1] = 0, 2 ** width - 1  # both ends of the code range
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 3 * ((length * width + 7) // 8)
    assert torch.equal(packing.unpack_codes(packed, bits, length), codes)


def test_layout_is_little_endian_bitstreams_per_row():
    assert packing.pack_codes(torch.tensor([[1, 2, 3]]), torch.tensor([4])).tolist() == [0x21, 0x03]
    assert packing.pack_codes(torch.tensor([[3, 0, 1, 2]]), torch.tensor([2])).tolist() == [0b10010011]
    # int3: 1, 2, 3, 0, 1 -> bits 100 010 110 000 100 (LSB first) -> bytes 0b11010001, 0b00010000
    assert packing.pack_codes(torch.tensor([[1, 2, 3, 0, 1]]), torch.tensor([3])).tolist() == [0xD1, 0x10]


def test_mixed_rows_0_to_16_bits_round_trip_and_0_bit_rows_take_no_byte():
    bits = torch.arange(17).repeat(2)
    codes = _codes(1, bits.numel(), 11, bits)
    packed = packing.pack_codes(codes, bits)
    assert packed.numel() == packing.packed_nbytes(bits, 11) == int(((bits * 11 + 7) // 8).sum())
    assert torch.equal(packing.unpack_codes(packed, bits, 11), codes)


def test_bad_codes_and_bit_widths_are_refused():
    with pytest.raises(qcore.QcoreError, match="does not fit"):
        packing.pack_codes(torch.tensor([[4]]), torch.tensor([2]))
    with pytest.raises(qcore.QcoreError, match="0..16"):
        packing.pack_codes(torch.tensor([[0]]), torch.tensor([17]))
    with pytest.raises(qcore.QcoreError, match="flat uint8"):
        packing.unpack_codes(torch.zeros(3, dtype=torch.uint8), torch.tensor([4]), 7)


def _group_quantizer(symmetric: bool) -> tuple[qcore.UniformFakeQuant, torch.Tensor]:
    g = torch.Generator().manual_seed(int(symmetric))
    w = torch.randn(10, 3, 3, 3, generator=g)
    spec = qcore.QuantSpec(4, symmetric=symmetric, granularity="group", group_size=3, group_bits=(2, 3, 0, 4))
    q = qcore.UniformFakeQuant(spec, 10, 0)
    rows = q.rows_of(w)
    q.set_range(rows.amin(1) * 0.8, rows.amax(1) * 0.8)  # some values clip
    q.set_prune_value(torch.linspace(-1, 1, 10))
    return q, w


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_decode_to_the_fake_quantized_weight_bit_for_bit(symmetric):
    q, w = _group_quantizer(symmetric)
    scale, zero, qmin, qmax, bits = q.qparams()
    rows = w.reshape(10, -1)
    codes = packing.codes_from_weight(rows, scale, zero, qmin, qmax)
    packed = packing.pack_codes(codes, bits)
    got = packing.dequantize(packing.unpack_codes(packed, bits, rows.shape[1]), scale, zero, qmin, bits,
                             q.prune_value)
    assert same_bits(got.reshape(w.shape), q(w))


def test_dequant_matmul_is_the_fake_quant_matmul():
    q, w = _group_quantizer(False)
    scale, zero, qmin, qmax, bits = q.qparams()
    rows = w.reshape(10, -1)
    packed = packing.pack_codes(packing.codes_from_weight(rows, scale, zero, qmin, qmax), bits)
    x = torch.randn(5, 27, generator=torch.Generator().manual_seed(3))
    want = x @ q(w).reshape(10, -1).t()
    for kernels in ("reference", "auto"):  # direct, and through the torch op
        got = packing.dequant_matmul(x, packed, bits, scale, zero, qmin, q.prune_value, 27, kernels=kernels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(qcore.QcoreError, match="features"):
        packing.dequant_matmul(x[:, :5], packed, bits, scale, zero, qmin, q.prune_value, 27)


@pytest.mark.parametrize("w_bits", [2, 3, 4])
def test_a_packed_file_holds_the_bits_and_loads_back_to_the_same_outputs(tmp_path, w_bits):
    host = make_host()
    model = tiny_convnet()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = qcore.quantize(model, x, w_bits=w_bits, a_bits=8, host=host)
    fp = q.save(tmp_path / "fp.qcore")
    pk = q.save(tmp_path / "packed.qcore", packed=True)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    # every float32 weight is replaced by its codes (at each layer's bits: first/last stay at 8 by default),
    # give or take a header entry per layer
    layers = qcore.quant_layers(q.model)
    codes = sum(packing.packed_nbytes(layer.weight_quantizer.bits.expand(layer.module.weight.shape[0]),
                                      layer.module.weight[0].numel()) for layer in layers.values())
    assert {int(b) for layer in layers.values() for b in layer.weight_quantizer.bits} >= {w_bits}
    assert abs(pk.stat().st_size - (fp.stat().st_size - 4 * weights + codes)) <= 100 * len(layers)
    loaded = qcore.load(pk, model, host=host)
    with torch.no_grad():
        assert same_bits(loaded(x), q.model(x))
        assert same_bits(loaded(x), qcore.load(fp, model, host=host)(x))


def test_a_packed_file_into_another_architecture_is_a_one_line_error(tmp_path):
    from qcore._saved import read_meta

    host = make_host()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = qcore.quantize(tiny_convnet(), x, w_bits=4, a_bits=8, host=host)
    pk = q.save(tmp_path / "packed.qcore", packed=True)
    assert read_meta(pk)["format_version"] == 2  # a reader of format 1 only says "upgrade qcore"
    assert read_meta(q.save(tmp_path / "plain.qcore"))["format_version"] == 1
    wider = tiny_convnet()
    wider[3] = torch.nn.Conv2d(8, 24, 3, stride=2, padding=1, bias=False)  # 24 output channels instead of 16
    wider[4] = torch.nn.BatchNorm2d(24)
    with pytest.raises(qcore.QcoreError, match="does not fit this model"):
        qcore.load(pk, wider, host=host)
