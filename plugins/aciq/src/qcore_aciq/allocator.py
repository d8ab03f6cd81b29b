"""The ``aciq-channel`` allocator: per-channel bit-widths of weights (per output channel) and of activations
(per input channel) inside each layer, at an average equal to the run's ``--w-bits`` / ``--a-bits`` (or
``-o w_target`` / ``a_target``), solved exactly (:mod:`qcore_aciq.channel_bits`).

Pinned layers (first/last, per-layer overrides) keep their uniform bits. Weight statistics come from the
(BN-folded) FP weights; activation statistics from the FP model on the calibration set. Per-channel activation
bits need per-channel activation scales (``-o act_granularity=channel``), which is a simulation: integer GEMM
cannot apply a scale along its reduction axis.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from qcore import Allocator, LayerSpec, Plan, QcoreError, QuantSpec, RunContext, layer_spec, observe_inputs, track
from qcore_aciq.channel_bits import allocate_channel_bits, minmax_distortion, prior_distortion, rule_distortion
from qcore_aciq.stats import BEstimator, row_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelAllocOptions:
    alloc_weights: bool = field(default=True, metadata={"help": "allocate bits per weight output channel"})
    alloc_acts: bool = field(default=True, metadata={
        "help": "allocate bits per activation channel (needs act_granularity=channel: simulation only)"})
    alloc_model: Literal["rule", "noise"] = field(default="rule", metadata={
        "help": "'rule': the paper's spread^2 4^-M (alpha^(2/3) rule); 'noise': expected MSE of the quantizer "
                "that runs (clipping noise included)"})
    alloc_min_bits: int = field(default=0, metadata={"help": "clamp: fewest bits of a channel (0 = its mean)"})
    alloc_max_bits: int = field(default=8, metadata={"help": "clamp: most bits of a channel"})
    w_target: float | None = field(default=None, metadata={
        "help": "average weight bits per layer (default --target-bits, else --w-bits)"})
    a_target: float | None = field(default=None, metadata={
        "help": "average activation bits per layer (default --a-bits)"})
    prior: Literal["laplace", "gauss"] = field(default="laplace", metadata={
        "help": "distribution fitted to each activation (Laplace: b, Gaussian: sigma)"})
    b_estimator: BEstimator = field(default="mean", metadata={
        "help": "Laplace b: mean |x - mean| (the seed) or mean |x - median| (maximum likelihood)"})
    alloc_samples: int = field(default=8192, metadata={"help": "activation values sampled per channel"})

    def __post_init__(self) -> None:
        if not 0 <= self.alloc_min_bits <= self.alloc_max_bits <= 16:
            raise QcoreError(f"alloc_min_bits={self.alloc_min_bits}, alloc_max_bits={self.alloc_max_bits}: need "
                             "0 <= min <= max <= 16")
        for name in ("w_target", "a_target"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 16:
                raise QcoreError(f"{name}={v} is out of range; use 0..16")
        if self.alloc_samples < 16:
            raise QcoreError("alloc_samples must be at least 16")


class ChannelBitAllocator(Allocator):
    """Per-channel bits inside every free layer at the layer's average budget."""

    name = "aciq-channel"
    budget_convention = "free_layers"  # its target is each unpinned layer's average: pins are not paid from it
    description = "ACIQ per-channel bit allocation of weights and activations (eq. 10-11, solved exactly)"
    Options = ChannelAllocOptions

    def _bits(self) -> list[int]:
        return list(range(self.options.alloc_min_bits, self.options.alloc_max_bits + 1))

    def _weight_bits(self, ctx: RunContext, name: str, target: float) -> np.ndarray:
        info = ctx.layers[name]
        w = ctx.model.get_submodule(name).weight.detach().float().cpu()
        rows = w.movedim(info.weight_axis, 0).reshape(info.out_channels, -1).double()
        var = rows.var(dim=1, unbiased=False).numpy()
        if self.options.alloc_model == "rule":
            dist = rule_distortion(np.sqrt(var), self._bits())
        else:
            dist = minmax_distortion(rows.amin(dim=1).numpy(), rows.amax(dim=1).numpy(), var, self._bits())
        return allocate_channel_bits(dist, self._bits(), target)

    def _act_bits(self, sample: torch.Tensor, target: float, symmetric: bool) -> np.ndarray:
        o = self.options
        st = row_stats(sample, o.prior, o.b_estimator)
        if o.alloc_model == "rule":
            dist = rule_distortion(st.scale.double().numpy(), self._bits())
        else:
            dist = prior_distortion(st.scale.double().numpy(), st.half.numpy(), self._bits(), o.prior,
                                    symmetric=symmetric)
        return allocate_channel_bits(dist, self._bits(), target)

    def allocate(self, ctx: RunContext) -> Plan:
        o, b, pipe = self.options, ctx.budget, ctx.pipeline
        w_target = next((v for v in (o.w_target, b.target_bits, b.w_bits) if v is not None), None)
        a_target = o.a_target if o.a_target is not None else b.a_bits
        if w_target is None or a_target is None:
            raise QcoreError("aciq-channel needs --w-bits and --a-bits (or -o w_target / a_target): the average "
                             "bits per layer")
        if o.alloc_weights and pipe.weight_granularity != "channel":
            raise QcoreError("per-channel weight bits need -o weight_granularity=channel; or -o alloc_weights=false")
        alloc_acts = o.alloc_acts and pipe.act_targets != "none"
        if alloc_acts and pipe.act_granularity != "channel":
            raise QcoreError("per-channel activation bits need -o act_granularity=channel (simulation only: not "
                             "deployable with integer GEMM); or -o alloc_acts=false")
        w_uniform, a_uniform = round(w_target), round(a_target)
        for what, t in (("weight", w_target), ("activation", a_target)):
            if t >= o.alloc_max_bits:
                log.info("aciq-channel: the %s average %g is not below alloc_max_bits=%d: uniform %d bits, no "
                         "per-channel allocation", what, t, o.alloc_max_bits, round(t))
        free = [n for n in ctx.layers if n not in ctx.pinned]
        samples = {}
        if alloc_acts and free:
            samples = observe_inputs(ctx.model, ctx.task.forward, list(ctx.calibration_batches()),
                                     {n: ctx.layers[n] for n in free}, per_channel=True, samples=o.alloc_samples,
                                     seed=ctx.config.seed)
        layers: dict[str, LayerSpec] = {}
        for name in track(free, desc="aciq channel bits", unit="layer"):
            spec = layer_spec(pipe, w_uniform, a_uniform, ctx.quantizer.name)
            weight, act = spec.weight, spec.act
            if o.alloc_weights and weight is not None and w_target < o.alloc_max_bits:
                weight = _mixed(weight, self._weight_bits(ctx, name, w_target))
            if alloc_acts and act is not None and a_target < o.alloc_max_bits:
                act = _mixed(act, self._act_bits(samples[name], a_target, act.symmetric))
            layers[name] = LayerSpec(weight=weight, act=act)
        meta = {"allocator": self.name, "w_target": w_target, "a_target": a_target,
                "alloc_weights": o.alloc_weights, "alloc_acts": alloc_acts, "alloc_model": o.alloc_model,
                "clamp": [o.alloc_min_bits, o.alloc_max_bits]}
        return Plan(layers=layers, meta=meta)


def _mixed(spec: QuantSpec, bits: np.ndarray) -> QuantSpec:
    """``spec`` with one bit-width per channel."""
    return dataclasses.replace(spec, bits=int(round(float(bits.mean()))), granularity="channel", group_size=1,
                               group_bits=tuple(int(v) for v in bits))
