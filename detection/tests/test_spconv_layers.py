"""spconv layers through core's layer description and QuantLayer wrapper."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import spconv.pytorch as spconv
import torch
from torch import nn

from qcore import LayerSpec, Observer, QuantLayer, QuantSpec, UniformFakeQuant, replace_module
from qcore.ranges import minmax_range
from qcore_detection.spconv_layers import (
    SparseQuantLayer,
    spconv_cpu_guard,
    spconv_layer_info,
    spconv_wrap_module,
)

SHAPE_3D = [6, 12, 12]
SHAPE_2D = [16, 16]


def _sparse(shape: list[int], channels: int, n: int = 120, batch: int = 2, seed: int = 0) -> spconv.SparseConvTensor:
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, batch, (n,), generator=g)]
                         + [torch.randint(0, s, (n,), generator=g) for s in shape], 1)
    coords = torch.unique(coords, dim=0).int()
    feats = torch.randn(len(coords), channels, generator=g)
    return spconv.SparseConvTensor(feats, coords, shape, batch)


def _layer(kind: str) -> tuple[nn.Module, spconv.SparseConvTensor]:
    """A bias-free layer of ``kind`` and an input for it (the inverse conv gets the output of its pair)."""
    torch.manual_seed(0)
    if kind == "spinv3d":
        down = spconv.SparseConv3d(3, 5, 3, stride=2, padding=1, bias=False, indice_key="d1")
        x = _call(down, _sparse(SHAPE_3D, 3))
        return spconv.SparseInverseConv3d(5, 4, 3, bias=False, indice_key="d1"), x
    make = {"subm3d": lambda: spconv.SubMConv3d(3, 4, 3, padding=1, bias=False),
            "spconv3d": lambda: spconv.SparseConv3d(3, 4, 3, stride=2, padding=1, bias=False),
            "subm2d": lambda: spconv.SubMConv2d(3, 4, 3, padding=1, bias=False),
            "spconv2d": lambda: spconv.SparseConv2d(3, 4, 3, stride=2, padding=1, bias=False)}[kind]
    return make(), _sparse(SHAPE_2D if kind.endswith("2d") else SHAPE_3D, 3)


KINDS = ("subm3d", "spconv3d", "spinv3d", "subm2d", "spconv2d")


def _wrap(module: nn.Module, x: spconv.SparseConvTensor, bits: int, act: str = "tensor",
          cls: type[QuantLayer] = QuantLayer) -> QuantLayer:
    """Core's QuantLayer (per-channel symmetric weights, affine activations), ranges set by core's minmax."""
    info = spconv_layer_info(module, "layer")
    spec = LayerSpec(weight=QuantSpec(bits, symmetric=True, granularity="channel"),
                     act=QuantSpec(bits, symmetric=False, granularity=act))
    wq = UniformFakeQuant(spec.weight, info.out_channels, info.weight_axis)
    aq = UniformFakeQuant(spec.act, info.in_channels, info.act_axis)
    wq.set_range(*minmax_range(wq.rows_of(module.weight.detach()), wq.row_bits(), True))
    aq.set_range(*minmax_range(aq.rows_of(x.features), aq.row_bits(), False))
    return cls(module, info, spec, wq, aq)


def _call(module: nn.Module, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
    with torch.no_grad(), spconv_cpu_guard():
        return module(x)


def _run(module: nn.Module, x: spconv.SparseConvTensor) -> torch.Tensor:
    return _call(module, x).features


@pytest.mark.parametrize("kind", KINDS)
def test_layer_info(kind: str) -> None:
    module, _ = _layer(kind)
    info = spconv_layer_info(module, "backbone.conv")
    kvol = 27 if kind.endswith("3d") else 9
    assert (info.kind, info.name, info.weight_axis, info.act_axis) == (kind, "backbone.conv", 0, 1)
    assert (info.in_channels, info.out_channels) == (module.in_channels, module.out_channels)
    assert module.weight.shape[0] == info.out_channels and module.weight.shape[-1] == info.in_channels
    assert info.macs_per_out == module.in_channels * kvol
    assert info.quantize_input is not None


def test_other_modules_are_not_described() -> None:
    assert spconv_layer_info(nn.Conv2d(3, 4, 3), "c") is None
    assert spconv_layer_info(spconv.SparseSequential(), "s") is None
    assert spconv_layer_info(nn.BatchNorm1d(4), "bn") is None


@pytest.mark.parametrize("kind", KINDS)
def test_16_bit_reproduces_fp(kind: str) -> None:
    module, x = _layer(kind)
    for m in (module, module.eval()):  # training and eval mode
        ref = _run(m, x)
        out = _run(_wrap(m, x, 16), x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_4_bit_differs_and_keeps_indices(kind: str) -> None:
    module, x = _layer(kind)
    module.eval()
    ref = _call(module, x)
    out = _call(_wrap(module, x, 4), x)
    assert torch.equal(out.indices, ref.indices)
    assert (out.features - ref.features).abs().max() > 1e-2 * ref.features.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_activation_statistics_cover_active_sites_only(kind: str) -> None:
    module, x = _layer(kind)
    layer = _wrap(module, x, 8, act="channel")
    obs = Observer(max_per_row=10**6)
    layer.act_quantizer.observer = obs
    _run(layer, x)
    n_active = x.features.shape[0]
    assert obs.buf.shape == (module.in_channels, n_active)  # one row per channel, one value per active site
    assert n_active < x.spatial_size * x.batch_size
    torch.testing.assert_close(obs.hi, x.features.amax(0))
    torch.testing.assert_close(obs.lo, x.features.amin(0))


def test_weight_is_substituted_not_modified() -> None:
    module, x = _layer("subm3d")
    w = module.weight.detach().clone()
    layer = _wrap(module, x, 2)
    out = _run(layer, x)
    assert torch.equal(module.weight, w)
    with torch.no_grad():
        module.weight.copy_(layer.quantized_weight())
    direct = _run(module, layer.info.quantize_input(x, layer.act_quantizer))
    torch.testing.assert_close(out, direct)


def test_sparse_quant_layer_adds_bias_outside_spconv() -> None:
    """spconv's CPU kernels refuse a bias in eval mode; SparseQuantLayer adds it to the features instead."""
    torch.manual_seed(0)
    biased = spconv.SubMConv3d(3, 4, 3, padding=1, bias=True).eval()
    x = _sparse(SHAPE_3D, 3)
    if not torch.cuda.is_available():
        with pytest.raises(AssertionError, match="cpu don't support"):
            biased(x)
    free = spconv.SubMConv3d(3, 4, 3, padding=1, bias=False).eval()
    free.weight.data.copy_(biased.weight.data)
    ref = _run(free, x) + biased.bias.detach()
    out = _run(_wrap(biased, x, 16, cls=SparseQuantLayer), x)
    torch.testing.assert_close(out, ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


def test_wrap_hook_inside_sparse_sequential() -> None:
    """The hook's wrapper is a SparseModule, so SparseSequential hands it the sparse tensor."""
    conv = spconv.SubMConv3d(3, 4, 3, padding=1, bias=False)
    seq = spconv.SparseSequential(conv, nn.BatchNorm1d(4), nn.ReLU()).eval()
    x = _sparse(SHAPE_3D, 3)
    ref = _run(seq, x)
    info = spconv_layer_info(conv, "0")
    spec = LayerSpec(weight=QuantSpec(16, granularity="channel"), act=None)
    ctx = SimpleNamespace(quantizer=SimpleNamespace(make=lambda s, role, i: UniformFakeQuant(s, i.out_channels, 0)),
                          weight_correction=None)
    wrapped = spconv_wrap_module(conv, info, spec, ctx)
    assert isinstance(wrapped, SparseQuantLayer)
    wrapped.weight_quantizer.set_range(*minmax_range(wrapped.weight_quantizer.rows_of(conv.weight.detach()),
                                                     wrapped.weight_quantizer.row_bits(), True))
    replace_module(seq, "0", wrapped)
    torch.testing.assert_close(_run(seq, x), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
    assert spconv_wrap_module(nn.Conv2d(3, 4, 3), info, spec, ctx) is None
    # core's plain QuantLayer is not a SparseModule: SparseSequential would hand it the features only
    replace_module(seq, "0", _wrap(conv, x, 16))
    with pytest.raises(TypeError, match="SparseConvTensor"):
        _run(seq, x)


def test_cpu_backward_through_quant_layer() -> None:
    """Gradients flow through the fake-quantized weight (straight-through) on CPU."""
    module, x = _layer("subm3d")
    layer = _wrap(module, x, 8)
    feats = x.features.clone().requires_grad_()
    with spconv_cpu_guard():
        layer(x.replace_feature(feats)).features.square().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_guard_gives_correct_cpu_results() -> None:
    """spconv's CPU scatter-add races with several torch threads; under the guard every call is exact."""
    torch.manual_seed(0)
    shape = [8, 32, 32]
    x = _sparse(shape, 32, n=3000)
    conv = spconv.SubMConv3d(32, 32, 3, padding=1, bias=False).eval()
    idx = x.indices.long()
    dense = torch.zeros(x.batch_size, 32, *shape)
    dense[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]] = x.features
    w = conv.weight.detach().permute(0, 4, 1, 2, 3)
    ref = torch.nn.functional.conv3d(dense, w, padding=1)[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]]
    threads = torch.get_num_threads()
    for _ in range(20):
        torch.testing.assert_close(_run(conv, x), ref, atol=1e-4, rtol=1e-4)
    assert torch.get_num_threads() == threads


def test_torch_fx_notice_for_export_users_is_dropped_and_nothing_else():
    import logging

    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    notice = fx_log.makeRecord(fx_log.name, logging.WARNING, "f", 1, "is_fx_tracing will return true for both ...",
                               None, None)
    other = fx_log.makeRecord(fx_log.name, logging.WARNING, "f", 1, "a real problem", None, None)
    assert not fx_log.filter(notice) and fx_log.filter(other)


@pytest.mark.parametrize("kind", KINDS)
def test_macs_count_the_rule_book_pairs(kind: str) -> None:
    """The MACs core measures for a spconv layer are spconv's own rule-book pair count (native algorithm,
    ``indice_pair_num``) x C_in x C_out, below kernel volume x active outputs; also with dilation and a 5x5 kernel.
    For submanifold layers spconv keeps half the offsets (the other half is the same pairs reversed) and runs the
    centre offset as one dense GEMM over all sites: pairs = sites + 2 x stored."""
    from qcore_detection.spconv_layers import move_bias_outside, neighbour_pairs

    def rule_book(out: spconv.SparseConvTensor, key: str, subm: bool) -> int:
        stored = int(out.indice_dict[key].indice_pair_num.sum())
        return len(out.indices) + 2 * stored if subm else stored

    module, x = _layer(kind)
    module.indice_key = module.indice_key or "k"
    module.algo = spconv.ConvAlgo.Native
    out = _call(module, x)
    pairs = rule_book(out, module.indice_key, kind.startswith("subm"))
    info = spconv_layer_info(module, "layer")
    macs = info.count_macs(x, out)
    assert macs == pairs * module.in_channels * module.out_channels
    assert 0 < macs < len(out.indices) * info.macs_per_out * module.out_channels
    if kind in ("subm3d", "spconv2d"):  # other geometries, against spconv's rule book too
        for extra in ({"kernel_size": 5, "padding": 2}, {"kernel_size": 3, "padding": 2, "dilation": 2}):
            cls = type(module)
            stride = {"stride": 2} if kind == "spconv2d" else {}
            other = cls(3, 4, bias=False, indice_key="g", algo=spconv.ConvAlgo.Native, **stride, **extra)
            got = _call(other, x)
            expected = rule_book(got, "g", kind.startswith("subm"))
            assert neighbour_pairs(x.indices, x.spatial_shape, got.spatial_shape, other.kernel_size, other.stride,
                                   other.padding, other.dilation, subm=kind.startswith("subm")) == expected, extra
    assert move_bias_outside(module) == []  # bias-free layers are left alone
