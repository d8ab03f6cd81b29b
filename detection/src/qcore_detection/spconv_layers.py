"""spconv 2.x sparse convolutions as qcore layers.

Core's :class:`qcore.QuantLayer` runs a layer through ``torch.func.functional_call`` with the quantized
weight substituted; spconv's convolutions read ``self.weight`` in their forward, so they work unchanged.
What core needs from this module:

* :func:`spconv_layer_info` (for the ``qcore_layer_info`` hook) describes ``SubMConv3d``, ``SparseConv3d``,
  ``SparseInverseConv3d``, ``SubMConv2d`` and ``SparseConv2d`` (exact types: subclasses may change what the
  forward does). The weight layout is ``[out, k..., in]``, so the output-channel axis is 0. The input
  activation is a ``SparseConvTensor``; :func:`map_sparse_features` fake-quantizes its ``features``
  (``[N_active, C]``, channel axis 1) only, so statistics cover active sites and never a dense view.
* MACs (hence BOPs) of a spconv layer are counted from its rule book, measured on the example batch:
  input/output neighbour pairs x C_in/groups x C_out (:func:`neighbour_pairs`), not kernel volume x active
  outputs, which counts every empty neighbour of a sparse site.
* :func:`spconv_wrap_module` (for the ``qcore_wrap_module`` hook) wraps spconv layers in
  :class:`SparseQuantLayer`, a :class:`qcore.QuantLayer` that is also a spconv ``SparseModule`` (so
  ``spconv.SparseSequential`` still hands it the sparse tensor, not its features) and that adds a bias (e.g.
  one created by BatchNorm folding) to the output features itself: spconv's CPU kernels refuse a bias in eval
  mode ("cpu don't support act and bias").
* :func:`spconv_cpu_guard` makes spconv 2.3's CPU kernels give correct results (one torch thread: its CPU
  scatter-add races with several) and lets its CPU backward run where CUDA is absent. The detector's forward
  uses it; code that calls spconv layers on CPU on its own (a backward pass, one layer at a time) must too.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qcore import LayerInfo, MissingDependencyError, QuantLayer

#: spconv asks torch.fx whether it is tracing on every forward, and torch then logs, once per process, a notice
#: for torch.export users ("is_fx_tracing will return true for both ..."): nothing a qcore user can act on, so
#: it is dropped here; every other record of that logger passes.
logging.getLogger("torch.fx._symbolic_trace").addFilter(
    lambda record: "is_fx_tracing will return true" not in record.getMessage())

try:
    import spconv.pytorch as spconv
    import spconv.pytorch.ops as spconv_ops
except ImportError as exc:  # pragma: no cover - spconv is a dependency of qcore-detection
    raise MissingDependencyError("spconv", "pip install 'qcore-detection[cpu]' (spconv's CPU wheel) or "
                                 "'qcore-detection[cu126]' (its CUDA 12.6 build; one spconv build only)",
                                 "sparse convolutions") from exc

if TYPE_CHECKING:
    from qcore import LayerSpec, RunContext

#: spconv class name -> qcore layer kind
SPCONV_KINDS: dict[str, str] = {
    "SubMConv3d": "subm3d",
    "SparseConv3d": "spconv3d",
    "SparseInverseConv3d": "spinv3d",
    "SubMConv2d": "subm2d",
    "SparseConv2d": "spconv2d",
}


#: constructor arguments of every spconv convolution in the embedded detector: no bias (BatchNorm follows; spconv's
#: CPU kernels refuse a bias in eval mode) and the native gather-GEMM-scatter algorithm, which runs on CPU and CUDA
#: (a CUDA build of spconv defaults to implicit GEMM, which refuses CPU tensors: "implicit gemm only support cuda")
PORTABLE_CONV: dict[str, Any] = {"bias": False, "algo": spconv.ConvAlgo.Native}

_KIND_OF_TYPE: dict[type, str] = {getattr(spconv, name): kind for name, kind in SPCONV_KINDS.items()}


def _spconv_kind(module: nn.Module) -> str | None:
    """The qcore kind of ``module`` if it is exactly one of the supported spconv classes, else None."""
    return _KIND_OF_TYPE.get(type(module))


def is_spconv_layer(module: nn.Module) -> bool:
    """True for the spconv convolution types this module supports (see :data:`SPCONV_KINDS`)."""
    return _spconv_kind(module) is not None


def map_sparse_features(x: Any, fn: Any) -> Any:
    """``x`` with ``fn`` applied to its active features ``[N_active, C]`` (a fake-quantizer on a layer's input,
    an output correction, an observer); indices are kept."""
    features = getattr(x, "features", None)
    if features is None or not hasattr(x, "replace_feature"):
        raise TypeError(f"a spconv layer's input and output must be SparseConvTensors, got {type(x).__name__}")
    return x.replace_feature(fn(features))


def _keys(coords: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """One int64 key per (b, *spatial) row (mixed radix over ``shape``, batch outermost)."""
    key = coords[:, 0].clone()
    for d in range(1, coords.shape[1]):
        key = key * shape[d - 1] + coords[:, d]
    return key


#: the last few submanifold pair counts, by input indices (compared by value) and geometry: the submanifold
#: layers of a stage share one active set
_SUBM_CACHE: list[tuple[torch.Tensor, tuple[Any, ...], int]] = []


def neighbour_pairs(indices: torch.Tensor, spatial_shape: Any, out_spatial_shape: Any, kernel: Any, stride: Any,
                    padding: Any, dilation: Any, subm: bool) -> int:
    """The number of (input site, output site) pairs a sparse convolution's rule book holds: the products its
    gather-GEMM-scatter computes (per pair ``C_in x C_out`` MACs), counted from the active ``indices`` (b, *spatial).

    * submanifold (``subm``): outputs are the inputs; a pair per input site and kernel offset whose neighbour
      (site + (offset - k // 2) * dilation) is active;
    * strided/regular: a pair per input site and kernel offset that lands on an output position
      ((p + padding - offset * dilation) divisible by the stride and inside ``out_spatial_shape``); every such
      position is an active output, so the count factorises over the spatial dimensions.
    """
    coords = indices.long()
    n_dim = coords.shape[1] - 1
    if subm:
        geometry = (tuple(int(v) for v in spatial_shape), tuple(int(k) for k in kernel),
                    tuple(int(d) for d in dilation))
        for held, key, pairs in _SUBM_CACHE:
            if key == geometry and held.shape == indices.shape and (held is indices or torch.equal(held, indices)):
                return pairs
        shape = torch.tensor(geometry[0], device=coords.device)
        keys, _ = torch.sort(_keys(coords, shape))
        grid = torch.cartesian_prod(*(torch.arange(k) for k in geometry[1])).reshape(-1, n_dim)
        shifts = ((grid - torch.tensor([k // 2 for k in geometry[1]])) * torch.tensor(geometry[2])).to(coords.device)
        pairs = 0
        for chunk in torch.split(coords, max(1, 2**22 // len(shifts))):  # bounded memory on large sweeps
            moved = chunk[:, None, 1:] + shifts[None]  # [n, kvol, D]
            inside = ((moved >= 0) & (moved < shape)).all(dim=2)
            flat = torch.cat([chunk[:, None, :1].expand(-1, len(shifts), 1), moved], dim=2)[inside]
            probe = _keys(flat, shape)
            pos = torch.searchsorted(keys, probe).clamp(max=len(keys) - 1)
            pairs += int((keys[pos] == probe).sum())
        _SUBM_CACHE.append((indices, geometry, pairs))
        del _SUBM_CACHE[:-8]
        return pairs
    per_site = torch.ones(len(coords), dtype=torch.long, device=coords.device)
    for d in range(n_dim):
        p = coords[:, 1 + d]
        hits = torch.zeros_like(p)
        for o in range(int(kernel[d])):
            t = p + int(padding[d]) - o * int(dilation[d])
            q = torch.div(t, int(stride[d]), rounding_mode="floor")
            hits += ((t % int(stride[d]) == 0) & (q >= 0) & (q < int(out_spatial_shape[d]))).long()
        per_site *= hits
    return int(per_site.sum())


def _pair_counter(module: nn.Module, kind: str) -> Any:
    """``count_macs(input, output)`` of a spconv layer: rule-book pairs x C_in/groups x C_out. Inverse convs reuse
    the rule book of the conv they invert (their ``indice_key``), read from spconv's stored indice data; where
    it is not available their MACs are counted as for dense kernels (kernel volume x active outputs)."""
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    padding, dilation = tuple(module.padding), tuple(module.dilation)
    per_pair = int(module.in_channels) // int(getattr(module, "groups", 1) or 1) * int(module.out_channels)
    key = getattr(module, "indice_key", None)
    kvol = math.prod(int(k) for k in kernel)

    def count(x: Any, out: Any) -> int:
        if kind == "spinv3d":
            data = getattr(out, "indice_dict", {}).get(key)
            pair_num = getattr(data, "indice_pair_num", None)
            pairs = int(pair_num.sum()) if isinstance(pair_num, torch.Tensor) else kvol * len(out.indices)
        else:
            pairs = neighbour_pairs(x.indices, x.spatial_shape, out.spatial_shape, kernel, stride, padding,
                                    dilation, subm=kind.startswith("subm"))
        return pairs * per_pair

    return count


def spconv_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    """Describe a spconv convolution as a quantizable layer (None for any other module).

    :param name: the dotted module path.
    """
    kind = _spconv_kind(module)
    if kind is None:
        return None
    groups = int(getattr(module, "groups", 1) or 1)
    kvol = math.prod(int(k) for k in module.kernel_size)
    return LayerInfo(name=name, kind=kind, out_channels=int(module.out_channels),
                     in_channels=int(module.in_channels), weight_axis=0, act_axis=1,
                     macs_per_out=int(module.in_channels) // groups * kvol,
                     quantize_input=map_sparse_features, map_output=map_sparse_features,
                     count_macs=_pair_counter(module, kind))


#: name under which :func:`move_bias_outside` keeps a spconv layer's bias (``bias`` itself is set to None)
OUTSIDE_BIAS = "bias_outside"


def add_bias(out: Any, bias: torch.Tensor | None) -> Any:
    """A spconv layer's output with ``bias`` added to its active features (unchanged when ``bias`` is None): how
    every bias of a spconv convolution is applied in this package (the embedded head's learnt biases,
    :class:`SparseQuantLayer`, :func:`move_bias_outside`), because spconv's CPU kernels refuse one in eval mode."""
    return out if bias is None else out.replace_feature(out.features + bias)


def _add_outside_bias(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook of :func:`move_bias_outside` (a plain function, so deep copies use their own bias)."""
    return add_bias(out, getattr(module, OUTSIDE_BIAS))


def move_bias_outside(model: nn.Module) -> list[str]:
    """Make every spconv layer of ``model`` that has a bias run bias-free, with the bias added to its output
    features by a forward hook: the handling the embedded model builds in (bias-free spconv convs, biases added
    outside), applied to models built elsewhere (OpenPCDet builds ``SparseBasicBlock`` convs and head output convs
    with ``bias=True``, which spconv's CPU kernels refuse in eval mode: "cpu don't support act and bias").

    The bias stays a parameter of the layer, renamed ``bias_outside`` (:data:`OUTSIDE_BIAS`; state-dict keys
    change accordingly), so load checkpoints before calling this. Quantized, the layer's
    :class:`SparseQuantLayer` runs it through ``functional_call``, which runs the hook too. Outputs are those of
    the biased convolution (up to float rounding). Returns the names of the layers changed.
    """
    moved = []
    for name, module in model.named_modules():
        if not is_spconv_layer(module) or getattr(module, "bias", None) is None:
            continue
        bias = module.bias
        del module._parameters["bias"]
        module.register_parameter("bias", None)
        module.register_parameter(OUTSIDE_BIAS, bias)
        module.register_forward_hook(_add_outside_bias)
        moved.append(name)
    return moved


class SparseQuantLayer(QuantLayer, spconv.SparseModule):
    """:class:`qcore.QuantLayer` for spconv layers.

    The convolution runs bias-free and the module's bias (if any) is added to the output features, which
    spconv's CPU kernels cannot do in eval mode. Being a ``SparseModule``, it receives the whole sparse tensor
    inside ``spconv.SparseSequential`` (core's plain ``QuantLayer`` would be handed ``features`` there).
    """

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.act_quantizer is not None:
            x = map_sparse_features(x, self.act_quantizer)
        bias = self.module.bias
        params = {"weight": self.quantized_weight(), "bias": None}
        out = torch.func.functional_call(self.module, params, (x, *args), kwargs, strict=False)
        out = add_bias(out, bias)
        if self.out_correction is not None or self.out_scale is not None:
            out = self.info.output_tensor(out, self._add_correction)
        return out


def spconv_wrap_module(module: nn.Module, info: LayerInfo, spec: LayerSpec, ctx: RunContext
                       ) -> nn.Module | None:
    """The quantized replacement of a spconv layer (a :class:`SparseQuantLayer`); None for other modules."""
    if not is_spconv_layer(module):
        return None
    wq = ctx.quantizer.make(spec.weight, "weight", info) if spec.weight is not None else None
    aq = ctx.quantizer.make(spec.act, "act", info) if spec.act is not None else None
    return SparseQuantLayer(module, info, spec, wq, aq, weight_correction=ctx.weight_correction)


@contextlib.contextmanager
def spconv_cpu_guard(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run spconv 2.3's CPU kernels correctly inside the ``with`` block (forward and backward passes).

    Two defects of spconv 2.3.8 on CPU are worked around while the block runs on a CPU ``device`` (on a CUDA
    device the block changes nothing):

    * its CPU scatter-add (used by every sparse convolution, forward and backward) races when torch runs more
      than one thread: a few output rows come out wrong in some calls (measured: ~5 % of calls of a 3000-voxel
      SubMConv3d with 2 threads). torch is set to one thread inside the block and restored after it;
    * its backward asks torch for the current CUDA stream before taking the CPU path (which never uses it), so
      it fails without CUDA ("Found no NVIDIA driver" / "Torch not compiled with CUDA"); where CUDA is
      unavailable that lookup returns 0 inside the block.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    original = spconv_ops.get_current_stream
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        spconv_ops.get_current_stream = lambda: 0
    try:
        yield
    finally:
        spconv_ops.get_current_stream = original
        torch.set_num_threads(threads)
