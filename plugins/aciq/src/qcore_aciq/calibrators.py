"""ACIQ's calibrators: analytical clipping (``aciq``) and the seed's baselines (``nstd``, ``kl``).

All three clip *activations*; weights use one of core's range estimators (``-o weight_range``, min/max by
default as in the seed, which never clips weights). Statistics are collected once on the calibration set
(drawn from the training split) and frozen; ``-o stats=dynamic`` recomputes them from every evaluated batch,
as the seed's default mode does — test-time statistics, labelled as such in the log and in result.json's
options, and not a post-training calibration. 0-bit channels (from per-channel bit allocation) become their
mean.

Any method can use these by name: ``qcore run --plugin uniform --calibrator aciq``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from qcore import (
    FakeQuantizer,
    QcoreError,
    RangeCalibrator,
    RunContext,
    WeightRangeOptions,
    calibrate_rows,
    iter_quantizers,
    quant_layers,
)
from qcore.ranges import RangeFn
from qcore_aciq.bins import MidTreadFakeQuant, calibrate_bins
from qcore_aciq.clipping import MAX_TABLE_BITS, optimal_alpha
from qcore_aciq.kl import kl_range
from qcore_aciq.stats import BEstimator, row_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClippingOptions(WeightRangeOptions):
    stats: Literal["frozen", "dynamic"] = field(default="frozen", metadata={
        "help": "'frozen': activation statistics from the calibration set (post-training); 'dynamic': "
                "recomputed from every evaluated batch (the seed's default; test-time statistics)"})


@dataclass(frozen=True)
class ACIQOptions(ClippingOptions):
    prior: Literal["laplace", "gauss"] = field(default="laplace", metadata={
        "help": "distribution fitted to each activation (Laplace: b, Gaussian: sigma)"})
    b_estimator: BEstimator = field(default="mean", metadata={
        "help": "Laplace b: mean |x - mean| (the seed) or mean |x - median| (maximum likelihood)"})
    alpha_model: Literal["grid", "midrise"] = field(default="grid", metadata={
        "help": "clip optimal for qcore's grid (2^M levels, end points at the clip), or the paper's mid-rise "
                "table used as the end points (the seed; 10%% too wide at 2 bits)"})
    half_range: bool = field(default=True, metadata={
        "help": "non-negative activations (after a ReLU) get a window [0, alpha] fitted to their positive part"})
    bin_target_w: float | None = field(default=None, metadata={
        "help": "--quantizer midtread: average bits (log2 of bins) per weight channel (default --w-bits)"})
    bin_target_a: float | None = field(default=None, metadata={
        "help": "--quantizer midtread: average bits (log2 of bins) per activation channel (default --a-bits)"})


@dataclass(frozen=True)
class NstdOptions(ClippingOptions):
    nstd: float = field(default=2.0, metadata={"help": "clip at mean +- nstd standard deviations"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nstd <= 0:
            raise QcoreError(f"nstd={self.nstd} must be positive")


@dataclass(frozen=True)
class KLOptions(ClippingOptions):
    kl_bins: int = field(default=2048, metadata={"help": "histogram bins of the KL search"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_bins < 64:
            raise QcoreError(f"kl_bins={self.kl_bins} must be at least 64")


def aciq_range(x: Tensor, bits: Tensor, symmetric: bool, prior: str = "laplace", b_estimator: BEstimator = "mean",
               alpha_model: str = "grid", half_range: bool = True) -> tuple[Tensor, Tensor]:
    """ACIQ clip range of each row of ``x`` at each row's bit-width.

    Signed rows: ``[max(min, mu - alpha), min(max, mu + alpha)]`` with ``alpha = scale * A(M)``; non-negative
    rows: ``[0, min(max, scale * A_half(M))]``. ``A`` is :func:`qcore_aciq.clipping.optimal_alpha` for the
    prior, the model and the grid (affine unless ``symmetric``).
    """
    st = row_stats(x, prior, b_estimator, half_range)
    bits = bits.float().reshape(-1).expand(x.shape[0]).to(torch.int64)
    if (bits > MAX_TABLE_BITS).any():
        raise QcoreError(f"ACIQ clipping covers 1..{MAX_TABLE_BITS} bits")
    mult = torch.tensor([0.0 if int(b) == 0 else optimal_alpha(int(b), prior, alpha_model, bool(h), symmetric)
                         for b, h in zip(bits.tolist(), st.half.tolist(), strict=True)])
    alpha = st.scale * mult
    lo = torch.where(st.half, torch.zeros_like(st.lo), torch.maximum(st.lo, st.mean - alpha))
    hi = torch.where(st.half, torch.minimum(st.hi, alpha), torch.minimum(st.hi, st.mean + alpha))
    pruned = bits == 0  # the range of a pruned row is never used; keep the observed one
    return torch.where(pruned, st.lo, lo), torch.where(pruned, st.hi, hi)


def nstd_range(x: Tensor, bits: Tensor, symmetric: bool, nstd: float = 2.0) -> tuple[Tensor, Tensor]:
    """``[mean - n sigma, mean + n sigma]`` within the observed range (the seed's ``Nstd`` clipping)."""
    st = row_stats(x, "gauss", half_range=False)
    return torch.maximum(st.lo, st.mean - nstd * st.std), torch.minimum(st.hi, st.mean + nstd * st.std)


class DynamicRange(nn.Module):
    """Recalibrates its quantizer from every batch it sees (test-time statistics; the seed's default)."""

    def __init__(self, quantizer: FakeQuantizer, estimator: RangeFn) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.estimator = estimator

    def forward(self, x: Tensor) -> Tensor:
        q = self.quantizer
        with torch.no_grad():
            rows = q.rows_of(x.detach()).float()
            calibrate_rows(q, rows.cpu(), self.estimator)
            q.set_prune_value(q.channel_values(rows.mean(dim=1)))
        return q(x)


class ClippingCalibrator(RangeCalibrator):
    """Base of the activation-clipping calibrators: weights by core's estimators, activations by
    :meth:`act_estimator`, 0-bit channels at their mean, statistics frozen unless ``stats=dynamic``."""

    Options = ClippingOptions
    prune_to_mean = True

    def calibrate(self, model: nn.Module, ctx: RunContext) -> None:
        if self.options.stats == "frozen":
            super().calibrate(model, ctx)
            return
        log.warning("calibrator %s: stats=dynamic: activation ranges are recomputed from every evaluated batch "
                    "(test-time statistics, batch-size dependent; not a post-training calibration)", self.name)
        self.calibrate_weights(model)
        for layer in quant_layers(model).values():
            if layer.act_quantizer is not None:
                layer.act_quantizer = DynamicRange(layer.act_quantizer,
                                                   self.act_estimator())


class ACIQCalibrator(ClippingCalibrator):
    name = "aciq"
    description = ("ACIQ analytical clipping of activations: Laplace/Gaussian fit, clip optimal for the grid used, "
                   "half range after ReLU; weights min/max; with --quantizer midtread: bin allocation (eq. 10)")
    Options = ACIQOptions

    def calibrate(self, model: nn.Module, ctx: RunContext) -> None:
        if any(isinstance(q, MidTreadFakeQuant) for _, _, q in iter_quantizers(model)):
            o = self.options
            if o.stats == "dynamic":
                raise QcoreError("bin allocation (--quantizer midtread) supports only stats=frozen")
            calibrate_bins(model, ctx, o.bin_target_w, o.bin_target_a, o.prior, o.b_estimator, o.half_range,
                           o.act_samples)
            return
        super().calibrate(model, ctx)

    def act_estimator(self) -> RangeFn:
        o = self.options
        return functools.partial(aciq_range, prior=o.prior, b_estimator=o.b_estimator, alpha_model=o.alpha_model,
                                 half_range=o.half_range)


class NstdCalibrator(ClippingCalibrator):
    name = "nstd"
    description = "activations clipped at mean +- N standard deviations (ACIQ's baseline; -o nstd=2)"
    Options = NstdOptions

    def act_estimator(self) -> RangeFn:
        return functools.partial(nstd_range, nstd=self.options.nstd)


class KLCalibrator(ClippingCalibrator):
    name = "kl"
    description = "activations clipped at the KL-divergence threshold (TensorRT calibration; ACIQ's baseline)"
    Options = KLOptions

    def act_estimator(self) -> RangeFn:
        return functools.partial(kl_range, nbins=self.options.kl_bins)
