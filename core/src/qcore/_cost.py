"""Model size, BOPs and average bits from a :class:`~qcore._spec.Plan`, computed the same way for every method.

Conventions (also written into result.json):

* **size_mb**: MiB (2^20 bytes) of every parameter and floating-point buffer the deployed model needs.
  Quantized weights count at their bit-width (per channel group); each quantization parameter (scale, and
  zero point on affine grids), of weights and activations alike, counts 32 bits; everything else (biases, norms,
  unquantized layers) 32 bits.
  ``fp_size_mb`` is the same model with everything at 32 bits. Both are taken after BN folding, so they
  describe the model that is evaluated.
* **bops**: bit operations for one sample, ``sum over quantizable layers of MACs x w_bits x a_bits`` with 32
  for tensors left in floating point; mixed precision uses the element-weighted mean bits of the layer (exact
  for dense layers). Operations outside conv/linear layers (attention matmuls, norms, sums) are not counted.
* **w_bits_avg**: mean weight bits over the quantized layers, weighted by element count; **a_bits_avg**: the
  same over quantized activation tensors, weighted by their elements per sample.
* **extra storage**: bits a quantizer declares beyond these (``Quantizer.extra_bits``: a lattice basis, a
  codebook) are added to the size and spread over the tensor's elements in ``w_bits_avg`` / ``a_bits_avg``.
  Average bits of activations are per sample, so their extra bits count once per sample (a conservative view).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qcore._layers import LayerInfo
from qcore._spec import Plan, QuantSpec

FP_BITS = 32
MIB = 2**20


def mean_bits(spec: QuantSpec, channels: int) -> float:
    """Element-weighted mean bits of a tensor with ``channels`` equal-sized channels."""
    if spec.group_bits is None:
        return float(spec.bits)
    g = spec.group_size or 1
    per_channel = [b for b in spec.group_bits for _ in range(g)][:channels]
    return sum(per_channel) / len(per_channel)


def qparam_count(spec: QuantSpec, channels: int) -> int:
    """Quantization parameters stored for one tensor (scales, plus zero points when affine)."""
    rows = {"tensor": 1, "channel": channels, "group": -(-channels // (spec.group_size or 1))}[spec.granularity]
    return rows * (1 if spec.symmetric else 2)


@dataclass(frozen=True)
class Cost:
    size_mb: float
    fp_size_mb: float
    bops: float
    fp_bops: float
    w_bits_avg: float | None
    a_bits_avg: float | None

    def to_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


def _fp_bits_total(model: nn.Module) -> int:
    params = sum(p.numel() for p in model.parameters())
    bufs = sum(b.numel() for b in model.buffers() if torch.is_floating_point(b))
    return (params + bufs) * FP_BITS


#: ``extra_bits(spec, role, info)``: bits stored for one tensor beyond its elements and scales
#: (``Quantizer.extra_bits``)
ExtraBits = Callable[[QuantSpec, str, LayerInfo], float]


def plan_cost(model: nn.Module, layers: Mapping[str, LayerInfo], plan: Plan,
              extra_bits: ExtraBits | None = None) -> Cost:
    """Size, BOPs and average bits of ``model`` (FP, unwrapped) quantized as ``plan`` says; ``extra_bits`` (the
    run's ``Quantizer.extra_bits``) adds what a format stores besides its elements and scales."""
    fp_bits = _fp_bits_total(model)
    saved = 0.0
    bops = fp_bops = 0.0
    w_num = w_den = a_num = a_den = 0.0
    for name, info in layers.items():
        spec = plan.layers.get(name)
        wb = ab = float(FP_BITS)
        if spec is not None and spec.weight is not None:
            wb = mean_bits(spec.weight, info.out_channels)
            saved += info.weight_numel * (FP_BITS - wb) - qparam_count(spec.weight, info.out_channels) * FP_BITS
            if extra_bits is not None and info.weight_numel:
                extra = float(extra_bits(spec.weight, "weight", info))
                saved -= extra
                w_num += extra
            w_num += wb * info.weight_numel
            w_den += info.weight_numel
        if spec is not None and spec.act is not None:
            ab = mean_bits(spec.act, info.in_channels)
            saved -= qparam_count(spec.act, info.in_channels) * FP_BITS
            if extra_bits is not None and info.act_numel:
                extra = float(extra_bits(spec.act, "act", info))
                saved -= extra
                a_num += extra
            a_num += ab * info.act_numel
            a_den += info.act_numel
        bops += info.macs * wb * ab
        fp_bops += info.macs * FP_BITS * FP_BITS
    return Cost(size_mb=(fp_bits - saved) / 8 / MIB, fp_size_mb=fp_bits / 8 / MIB, bops=bops, fp_bops=fp_bops,
                w_bits_avg=w_num / w_den if w_den else None, a_bits_avg=a_num / a_den if a_den else None)
