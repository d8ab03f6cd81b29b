"""Bin allocation (paper eq. 10) on a mid-tread grid, and the entropy of the codes it produces.

Instead of a power-of-two number of levels, channel ``i`` of a tensor gets ``omega_i`` bins,

    omega_i = round(C 2^t sigma_i^(2/3) / sum_j sigma_j^(2/3)),

so the layer keeps about ``C 2^t`` bins in all (``t``: ``-o bin_target_w`` / ``bin_target_a`` for every layer but
the pinned first/last ones; default the layer's bits). The grid is mid-tread:
``q = clamp(round(x / Delta), qlo, qhi)`` with ``qhi - qlo = omega`` (``omega + 1`` levels, zero exact).
Weights span their min/max; activations their ACIQ clip for ``omega`` bins (the mid-rise optimum,
:func:`qcore_aciq.clipping.midrise_alpha_bins`). A 0-bin channel is its mean. Per-channel bits from an
allocator are refused (use ``--allocator fixed``): the bins are this module's allocation.

The rate of such a grid is what an entropy coder would spend: the Shannon entropy of the integer codes,
pooled over each layer's tensor (as the original code measures it), averaged over layers weighted by
element count; weights measured on the weights, activations on the calibration set. It is reported in
result.json under ``measured.aciq_entropy``. Not deployable with integer GEMM (variable-length codes and
non-power-of-two grids): simulation only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcore import (
    FakeQuantizer,
    LayerInfo,
    QcoreError,
    Quantizer,
    QuantSpec,
    RunContext,
    observe_activations,
    quant_layers,
)
from qcore.ops import round_ste
from qcore_aciq.clipping import midrise_alpha_bins
from qcore_aciq.stats import row_stats


class MidTreadFakeQuant(FakeQuantizer):
    """Per-row mid-tread grid ``clamp(round(x / step), qlo, qhi) * step`` with any integer number of bins.

    Set by :func:`calibrate_bins`; until then it refuses to run (as every qcore quantizer does). It has no clip
    range (``uses_range = False``): range calibrators cannot set it.
    """

    uses_range = False

    def __init__(self, spec: QuantSpec, channels: int | None, axis: int) -> None:
        if spec.granularity == "group":
            raise QcoreError("the mid-tread quantizer has per-tensor or per-channel bins, not channel groups")
        super().__init__(spec, channels, axis)
        n = self.rows
        self.register_buffer("step", torch.ones(n))
        self.register_buffer("qlo", torch.zeros(n))
        self.register_buffer("qhi", torch.zeros(n))
        self.recorder: Callable[[Tensor], None] | None = None

    def set_bins(self, step: Tensor, qlo: Tensor, qhi: Tensor, mean: Tensor) -> None:
        """Step, integer window and mean (the value of a 0-bin row) of every row."""
        for buf, v in ((self.step, step), (self.qlo, qlo), (self.qhi, qhi)):
            buf.copy_(torch.as_tensor(v, dtype=torch.float32).reshape(-1).to(buf.device))
        if not torch.isfinite(self.step).all():
            raise QcoreError("a mid-tread step is not finite (NaN or inf in the data); check the model and data")
        self.set_prune_value(self.channel_values(torch.as_tensor(mean, dtype=torch.float32).reshape(-1)))
        self.mark_calibrated()

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        raise QcoreError("the mid-tread quantizer is set by bin allocation: use --calibrator aciq with "
                         "--quantizer midtread")

    def fit(self, rows: Tensor) -> None:
        raise QcoreError("the mid-tread quantizer is set by bin allocation: use --calibrator aciq with "
                         "--quantizer midtread")

    @property
    def bins(self) -> Tensor:
        return self.qhi - self.qlo

    def _params(self, ndim: int) -> tuple[Tensor, ...]:
        return tuple(self._shape(self.channel_values(t), ndim) for t in (self.step, self.qlo, self.qhi, self.bins))

    def codes(self, x: Tensor) -> Tensor:
        """The integer codes of ``x`` (0 for 0-bin rows)."""
        step, qlo, qhi, bins = self._params(x.dim())
        return torch.where(bins > 0, torch.clamp(torch.round(x / step), qlo, qhi), torch.zeros_like(x))

    def quantize(self, x: Tensor) -> Tensor:
        if self.recorder is not None:
            self.recorder(self.codes(x.detach()))
        step, qlo, qhi, bins = self._params(x.dim())
        out = torch.clamp(round_ste(x / step), qlo, qhi) * step
        return torch.where(bins > 0, out, self._shape(self.prune_value, x.dim())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mid-tread, {self.spec.granularity}, mean bins {float(self.bins.mean()):.1f}, axis={self.axis}"


class MidTreadQuantizer(Quantizer):
    """``--quantizer midtread``: bin allocation (eq. 10); calibrated by the ``aciq`` calibrator."""

    name = "midtread"
    description = "mid-tread grid with any integer number of bins per channel (ACIQ bin allocation, eq. 10)"
    #: variable-length (entropy-coded) codes: not an integer-GEMM grid
    integer_grid = False

    def make(self, spec: QuantSpec, role: str, info: LayerInfo) -> nn.Module:
        if role == "weight":
            return MidTreadFakeQuant(spec, info.out_channels, info.weight_axis if spec.axis is None else spec.axis)
        return MidTreadFakeQuant(spec, info.in_channels, info.act_axis if spec.axis is None else spec.axis)


def allocate_bins(spread: Tensor, target_bits: float) -> Tensor:
    """Eq. 10: bins per row proportional to ``spread^(2/3)``, about ``rows * 2^target`` in all."""
    w = spread.double().clamp(min=0).pow(2.0 / 3.0)
    total = spread.numel() * 2.0**target_bits
    share = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())
    return torch.round(total * share)


def _weight_bins(q: MidTreadFakeQuant, w: Tensor, target: float) -> None:
    rows = q.rows_of(w.detach()).double()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    bins = allocate_bins(rows.std(dim=1, unbiased=False), target)
    step = torch.where(bins > 0, (hi - lo) / bins.clamp(min=1), torch.ones_like(hi)).clamp(min=1e-12)
    q.set_bins(step, torch.round(lo / step), torch.round(hi / step), rows.mean(dim=1))


def _act_bins(q: MidTreadFakeQuant, sample: Tensor, target: float, prior: str, b_estimator: str,
              half_range: bool) -> None:
    st = row_stats(sample, prior, b_estimator, half_range)
    bins = allocate_bins(st.std.double(), target)
    mult = torch.tensor([midrise_alpha_bins(float(2 * o if h else o), prior)
                         for o, h in zip(bins.tolist(), st.half.tolist(), strict=True)], dtype=torch.float64)
    alpha = st.scale.double() * mult
    width = torch.where(st.half, alpha, 2 * alpha)
    step = torch.where(bins > 0, width / bins.clamp(min=1), torch.ones_like(width)).clamp(min=1e-12)
    centre = st.mean.double() / step
    qlo = torch.where(st.half, torch.zeros_like(step), torch.round(centre - bins / 2))
    qhi = torch.where(st.half, bins, qlo + bins)
    q.set_bins(step, qlo, qhi, st.mean)


def entropy_bits(counts: Counter) -> float:
    """Shannon entropy (bits per value) of a histogram of integer codes."""
    c = np.array(list(counts.values()), dtype=np.float64)
    if c.sum() <= 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def _histogram(codes: Tensor) -> Counter:
    values, counts = torch.unique(codes.reshape(-1), return_counts=True)
    return Counter(dict(zip(values.long().tolist(), counts.tolist(), strict=True)))


@torch.no_grad()
def measure_entropy(model: nn.Module, ctx: RunContext) -> dict[str, Any]:
    """Entropy of the weight codes and of the activation codes on the calibration set, per layer and on
    average (element-weighted)."""
    layers = quant_layers(model)
    per_layer: dict[str, dict[str, float]] = {}
    wsum = wn = 0.0
    hists: dict[str, Counter] = {}
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        if isinstance(wq, MidTreadFakeQuant):
            codes = wq.codes(layer.module.weight)
            h = entropy_bits(_histogram(codes))
            per_layer.setdefault(name, {})["weights"] = h
            wsum, wn = wsum + h * codes.numel(), wn + codes.numel()
        aq = layer.act_quantizer
        if isinstance(aq, MidTreadFakeQuant):
            hists[name] = Counter()
            aq.recorder = lambda c, n=name: hists[n].update(_histogram(c))
    try:
        for batch in ctx.calibration_batches():
            ctx.task.forward(model, batch)
    finally:
        for layer in layers.values():
            if isinstance(layer.act_quantizer, MidTreadFakeQuant):
                layer.act_quantizer.recorder = None
    asum = an = 0.0
    for name, hist in hists.items():
        h, n = entropy_bits(hist), sum(hist.values())
        per_layer.setdefault(name, {})["acts"] = h
        asum, an = asum + h * n, an + n
    return {"weights_bits_per_value": wsum / wn if wn else None, "acts_bits_per_value": asum / an if an else None,
            "measured_on": "weight codes of each layer; activation codes on the calibration set",
            "averaging": "Shannon entropy of each layer's codes pooled over its tensor, element-weighted mean",
            "per_layer": per_layer}


def calibrate_bins(model: nn.Module, ctx: RunContext, bin_target_w: float | None, bin_target_a: float | None,
                   prior: str, b_estimator: str, half_range: bool, samples: int) -> None:
    """Set every mid-tread quantizer of ``model`` by bin allocation, then record the code entropy in
    ``ctx.measured["aciq_entropy"]``."""
    layers = quant_layers(model)

    def target(name: str, q: MidTreadFakeQuant, override: float | None) -> float:
        return q.spec.bits if override is None or name in ctx.pinned else override  # pinned layers keep theirs

    for name, layer in layers.items():
        if layer.weight_quantizer is not None:
            q = _midtread(layer.weight_quantizer)
            _weight_bins(q, layer.module.weight, target(name, q, bin_target_w))
    for name, obs in observe_activations(model, ctx, samples).items():
        q = _midtread(layers[name].act_quantizer)
        _act_bins(q, obs.sample(), target(name, q, bin_target_a), prior, b_estimator, half_range)
    ctx.measured["aciq_entropy"] = measure_entropy(model, ctx)


def _midtread(q: Any) -> MidTreadFakeQuant:
    if not isinstance(q, MidTreadFakeQuant):
        raise QcoreError("bin allocation needs every quantizer to be mid-tread: run with --quantizer midtread "
                         "(and no other quantizer)")
    if q.spec.mixed:
        raise QcoreError("bin allocation chooses every channel's bins itself (eq. 10); per-channel bit-widths from "
                         "an allocator would be ignored: run --quantizer midtread with --allocator fixed")
    return q
