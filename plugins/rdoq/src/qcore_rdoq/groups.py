"""Channel groups (the units RDOQ allocates bits to) and their candidate quantized weights.

A weight group is ``group_size`` consecutive output channels of one layer (the last may be smaller). Its
candidate at ``b`` bits is exactly what deployment produces for a layer whose groups all carry ``b`` bits:
core's :class:`~qcore.UniformFakeQuant` with one scale per group, the clip chosen by the range estimator and
the grid symmetry the run deploys (a :class:`~qcore_rdoq.deployment.Clip`; the rdoq method's default is core's
MSE estimator on the symmetric grid). Curves and the deployed model therefore use the same quantizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qcore import LayerInfo, QcoreError, QuantSpec, UniformFakeQuant, WeightCorrection
from qcore.ops import candidate_quantize, quantize_rows
from qcore_rdoq.deadzone import DeadZoneFakeQuant, fit_layers
from qcore_rdoq.deployment import WEIGHT_CLIP, Clip


@dataclass(frozen=True)
class WeightGroup:
    """Output channels ``[start, stop)`` of layer ``layer``; ``size`` weight elements."""

    layer: str
    index: int
    start: int
    stop: int
    size: int


def weight_groups(info: LayerInfo, group_size: int) -> list[WeightGroup]:
    """Split a layer's output channels into groups of ``group_size``."""
    per_channel = info.weight_numel // info.out_channels
    n = math.ceil(info.out_channels / group_size)
    return [WeightGroup(info.name, g, g * group_size, min((g + 1) * group_size, info.out_channels),
                        (min((g + 1) * group_size, info.out_channels) - g * group_size) * per_channel)
            for g in range(n)]


def weight_spec(group_size: int, bits: list[int] | tuple[int, ...], out_channels: int,
                deadzones: list[float] | tuple[float, ...] | None = None, symmetric: bool = True) -> QuantSpec:
    """The plan spec of a layer whose groups carry ``bits`` (one scale per group, on the symmetric grid unless
    ``symmetric`` is False); with ``deadzones`` (one ratio per group), on the ``deadzone`` quantizer's grid
    (always symmetric)."""
    bits = tuple(int(b) for b in bits)
    assert len(bits) == math.ceil(out_channels / group_size)
    mean = round(sum(bits) / len(bits))
    if deadzones is None:
        return QuantSpec(bits=mean, symmetric=symmetric, granularity="group", group_size=group_size,
                         group_bits=bits)
    return QuantSpec(bits=mean, symmetric=True, granularity="group", group_size=group_size, group_bits=bits,
                     quantizer="deadzone", group_params=tuple(float(d) for d in deadzones))


def _fake_quant(info: LayerInfo, group_size: int, bits: int, device: torch.device, deadzone: float,
                symmetric: bool = True) -> UniformFakeQuant:
    n = math.ceil(info.out_channels / group_size)
    if deadzone > 0:
        spec = weight_spec(group_size, [bits] * n, info.out_channels, [deadzone] * n)
        return DeadZoneFakeQuant(spec, info.out_channels, info.weight_axis).to(device)
    spec = weight_spec(group_size, [bits] * n, info.out_channels, symmetric=symmetric)
    return UniformFakeQuant(spec, info.out_channels, info.weight_axis).to(device)


@torch.no_grad()
def quantize_at(weight: Tensor, info: LayerInfo, group_size: int, bits: int, clip: Clip = WEIGHT_CLIP,
                correction: WeightCorrection | None = None, deadzone: float = 0.0) -> Tensor:
    """``weight`` with every group quantized at ``bits`` exactly as deployment would (see module docstring)."""
    return candidate_table(weight, info, group_size, [bits], clip, correction, deadzone)[bits]


def _clip_ranges(weight: Tensor, info: LayerInfo, group_size: int, bits: list[int], clip: Clip
                 ) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]], dict[int, Tensor]]:
    """The layer's rows (one per group, as the deployed quantizer sees them), each bit-width's clip range per
    row, and each bit-width's rows quantized on the plain grid with that range.

    The clip search runs once for all bit-widths (rows stacked); rows are independent in the range estimators,
    so each range equals what deployment computes for that bit-width alone. With the MSE estimator, search and
    quantization are one call of :func:`qcore.ops.candidate_quantize` (the torch op a device kernel serves);
    other estimators set the ranges and :func:`qcore.ops.quantize_rows` quantizes. A pruned (0-bit) group has
    no range to search and keeps its min/max.
    """
    rows = _fake_quant(info, group_size, max(bits), weight.device, 0.0, clip.symmetric).rows_of(weight)
    ranges = {0: (rows.amin(dim=1), rows.amax(dim=1))}
    quantized: dict[int, Tensor] = {}
    searched = [b for b in bits if b > 0]
    if searched:
        sb = torch.tensor(searched, dtype=torch.float32, device=rows.device)
        r = rows.shape[0]
        if clip.estimator == "mse":
            lo, hi, q = candidate_quantize(rows, sb, clip.symmetric)
        else:
            lo, hi = clip.fn()(torch.cat([rows] * len(searched)), sb.repeat_interleave(r), clip.symmetric)
            lo, hi = lo.reshape(len(searched), r), hi.reshape(len(searched), r)
            q = quantize_rows(rows, lo, hi, sb, clip.symmetric)
        ranges |= {b: (lo[k], hi[k]) for k, b in enumerate(searched)}
        quantized |= {b: q[k] for k, b in enumerate(searched)}
    if 0 in bits:
        lo0, hi0 = ranges[0]
        quantized[0] = quantize_rows(rows, lo0[None], hi0[None], torch.zeros(1, device=rows.device),
                                     clip.symmetric)[0]
    if not all(bool(torch.isfinite(t).all()) for pair in ranges.values() for t in pair):
        raise QcoreError(f"layer {info.name!r}: a weight clip range is not finite (NaN or inf in the weights); "
                         "check the model")
    return rows, {b: ranges[b] for b in bits}, {b: quantized[b] for b in bits}


def _quantizers(info: LayerInfo, group_size: int, rows: Tensor, ranges: dict[int, tuple[Tensor, Tensor]],
                deadzones: Sequence[float], symmetric: bool = True) -> dict[float, dict[int, UniformFakeQuant]]:
    """The deployed per-group quantizer of the layer at each dead-zone ratio and bit-width of ``ranges``, its
    clip ranges set and, on the dead-zone grid, its dead zones fitted (the dead-zone grid keeps the plain range
    for its plain groups; the fit is row-independent, so each equals what ``fit`` gives it alone)."""
    fqs = {d: {b: _fake_quant(info, group_size, b, rows.device, d, symmetric) for b in ranges} for d in deadzones}
    for by_bits in fqs.values():
        for b, fq in by_bits.items():
            fq.set_range(*ranges[b])
    # every ratio's and bit-width's dead zones in one search (what fit does one quantizer at a time)
    fit_layers([(fq, rows) for by_bits in fqs.values() for fq in by_bits.values()
                if isinstance(fq, DeadZoneFakeQuant)])
    return fqs


def _ranged(weight: Tensor, info: LayerInfo, group_size: int, bits: list[int], clip: Clip = WEIGHT_CLIP,
            deadzones: Sequence[float] = (0.0,)) -> dict[float, dict[int, UniformFakeQuant]]:
    """The deployed quantizer at each dead-zone ratio and bit-width, ranged and fitted (see
    :func:`_clip_ranges` and :func:`_quantizers`)."""
    rows, ranges, _ = _clip_ranges(weight, info, group_size, bits, clip)
    return _quantizers(info, group_size, rows, ranges, deadzones, clip.symmetric)


def _plain_tables(weight: Tensor, info: LayerInfo, quantized: dict[int, Tensor]) -> dict[int, Tensor]:
    """Every bit-width's quantized rows (from :func:`_clip_ranges`) put back into the weight's layout.

    The rows are the per-group quantizer's (:meth:`UniformFakeQuant.rows_of <qcore.UniformFakeQuant.rows_of>`:
    channels along the weight axis moved first, a short last group padded with its last channel), so each value
    is the one :meth:`UniformFakeQuant.forward <qcore.UniformFakeQuant.forward>` gives it with the same ranges;
    the tests check the tables equal the modules bit for bit.
    """
    c, axis = info.out_channels, info.weight_axis % weight.dim()
    moved = weight.movedim(axis, 0).shape
    per_channel = int(torch.Size(moved[1:]).numel())
    return {b: q.reshape(-1, per_channel)[:c].reshape(moved).movedim(0, axis) for b, q in quantized.items()}


@torch.no_grad()
def candidate_tables(weight: Tensor, info: LayerInfo, group_size: int, bits: list[int],
                     clip: Clip = WEIGHT_CLIP, correction: WeightCorrection | None = None,
                     deadzones: Sequence[float] = (0.0,)) -> dict[float, dict[int, Tensor]]:
    """Quantized weight of the whole layer at each dead-zone ratio and candidate bit-width (groups are sliced
    out later).

    ``clip`` is the deployed range estimator and grid symmetry (the dead-zone grid is symmetric: callers refuse
    an asymmetric ``clip`` with it). ``correction`` is the run's weight bias correction, applied per output
    channel as deployment applies it. A ratio > 0 puts every group on the dead-zone grid with that ratio
    (:mod:`qcore_rdoq.deadzone`).
    """
    rows, ranges, plain = _clip_ranges(weight, info, group_size, bits, clip)
    fitted = [d for d in deadzones if d > 0]
    quantized = {d: {b: fq(weight) for b, fq in by_bits.items()}
                 for d, by_bits in _quantizers(info, group_size, rows, ranges, fitted, clip.symmetric).items()}
    if len(fitted) < len(deadzones):
        quantized[0.0] = _plain_tables(weight, info, plain)
    return {d: {b: q if correction is None else correction.correct(weight, q, info.weight_axis)
                for b, q in quantized[d].items()}
            for d in deadzones}


def candidate_table(weight: Tensor, info: LayerInfo, group_size: int, bits: list[int],
                    clip: Clip = WEIGHT_CLIP, correction: WeightCorrection | None = None, deadzone: float = 0.0
                    ) -> dict[int, Tensor]:
    """:func:`candidate_tables` at one dead-zone ratio (0: the plain grid)."""
    return candidate_tables(weight, info, group_size, bits, clip, correction, [deadzone])[deadzone]


def _entropy(codes: Tensor) -> float:
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


@torch.no_grad()
def group_entropy(weight: Tensor, info: LayerInfo, group_size: int, bits: list[int], clip: Clip = WEIGHT_CLIP
                  ) -> np.ndarray:
    """``[groups, len(bits)]``: the empirical entropy (bits per weight) of each group's integer codes at each
    candidate bit-width — the rate an ideal entropy coder would spend (0 for a pruned group)."""
    groups = weight_groups(info, group_size)
    out = np.zeros((len(groups), len(bits)))
    per_channel = weight.movedim(info.weight_axis, 0).reshape(info.out_channels, -1)
    for j, (b, fq) in enumerate(_ranged(weight, info, group_size, bits, clip)[0.0].items()):
        if b == 0:
            continue
        scale, zero, qmin, qmax, _ = fq.qparams()
        codes = torch.clamp(torch.round(per_channel / scale[:, None]) + zero[:, None], qmin[:, None], qmax[:, None])
        for i, g in enumerate(groups):
            out[i, j] = _entropy(codes[g.start:g.stop])
    return out
