"""The calibrators ``adaround``, ``brecq`` and ``qdrop``: core's MSE range calibration first, then
reconstruction (:func:`qcore_recon.reconstruct`) with each method's settings."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import qcore
from qcore import RangeCalibrator, RangeOptions
from qcore.ranges import RangeFn, mse_range
from qcore_recon.blocks import find_units
from qcore_recon.cache import default_cache_root
from qcore_recon.recon import DEFAULT_MEMORY_LIMIT, LossFn, ReconSettings, lp_loss, reconstruct

log = logging.getLogger(__name__)

#: the papers' steps per block (BRECQ and QDrop: 20,000 for weights; BRECQ 5,000 more for activations)
PAPER_ITERS = 20000
#: the papers' Adam rate of AdaRound's rounding variables (the calibrators' default; the methods use 5e-3)
PAPER_ROUND_LR = 1e-3
#: this plugin's default, sized for a 2-core CPU (ResNet-14 W4A4 in a few minutes); -o iters=20000 is the paper's
DEFAULT_ITERS = 300
#: BRECQ's initial range search (-o weight_range=shrink / act_range=shrink): 80 factors 1% apart, |error|^2.4
SHRINK_STEPS, SHRINK_P = 80, 2.4


@dataclass(frozen=True)
class ReconOptions(RangeOptions):
    """``-o`` options shared by the reconstruction calibrators (plus the range options of the initial
    calibration, MSE for weights and activations by default)."""

    weight_range: Literal["minmax", "percentile", "mse", "shrink"] = field(default="mse", metadata={
        "help": "weight clip-range estimator of the initial calibration (scales stay frozen during AdaRound); "
                "'shrink': BRECQ's search, [min, max] shrunk in 1% steps (80 candidates), least |error|^2.4"})
    act_range: Literal["minmax", "percentile", "mse", "shrink"] = field(default="mse", metadata={
        "help": "activation clip-range estimator of the initial calibration (LSQ learns from there); 'shrink' as "
                "for weight_range"})
    iters: int = field(default=DEFAULT_ITERS, metadata={
        "help": f"optimisation steps per block/layer ({DEFAULT_ITERS}: sized for a CPU; the papers use "
                f"{PAPER_ITERS})"})
    recon_batch: int = field(default=32, metadata={"help": "calibration samples per reconstruction step"})
    round_lr: float = field(default=PAPER_ROUND_LR, metadata={
        "help": "Adam learning rate of AdaRound's rounding variables (the papers' 1e-3; the qdrop/brecq/recon methods "
                "default to 5e-3 for their 300 steps)"})
    reg_weight: float | None = field(default=None, metadata={
        "help": "AdaRound regulariser weight lambda; default 0.01, 0.1 for blocks with a depthwise conv"})
    warmup: float = field(default=0.2, metadata={"help": "fraction of steps before the rounding regulariser starts"})
    recon_granularity: Literal["block", "layer"] = field(default="block", metadata={
        "help": "reconstruct residual blocks as units ('block'; other layers layer-wise) or every layer alone"})
    memory_mb: float = field(default=DEFAULT_MEMORY_LIMIT / 2**20, metadata={
        "help": "MB each cached block input/target may hold in memory; larger ones are written to a temporary file "
                "($TMPDIR) and read memory-mapped (same result, slower steps)"})
    cache: str = field(default="auto", metadata={
        "help": "per-block resume cache: 'auto' ($QCORE_CACHE_DIR or ~/.cache/qcore/recon), 'off', or a folder"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0:
            raise qcore.QcoreError(f"iters={self.iters} must be 0 or more (the papers use {PAPER_ITERS})")
        if self.recon_batch < 1:
            raise qcore.QcoreError(f"recon_batch={self.recon_batch} must be at least 1 (the papers use 32)")
        if self.round_lr <= 0:
            raise qcore.QcoreError(f"round_lr={self.round_lr} must be positive (the papers use 1e-3)")
        if self.reg_weight is not None and self.reg_weight < 0:
            raise qcore.QcoreError(f"reg_weight={self.reg_weight} must be 0 or more (the papers: 0.01, MobileNet 0.1)")
        if not 0.0 <= self.warmup < 1.0:
            raise qcore.QcoreError(f"warmup={self.warmup} must be in [0, 1) (the papers use 0.2)")
        if not self.memory_mb >= 0:
            raise qcore.QcoreError(f"memory_mb={self.memory_mb} must be 0 or more (0 writes every cached block "
                                   "input/target to disk)")
        if not self.cache.strip():
            raise qcore.QcoreError("cache='' names no folder: use 'auto', 'off' or a folder")


@dataclass(frozen=True)
class QDropOptions(ReconOptions):
    drop_prob: float = field(default=0.5, metadata={
        "help": "QDrop: probability of KEEPING activation quantization, element-wise (1 = always quantize)"})
    scale_lr: float = field(default=4e-5, metadata={"help": "Adam learning rate of the LSQ activation steps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.drop_prob <= 1.0:
            raise qcore.QcoreError(f"drop_prob={self.drop_prob} must be in [0, 1] (the paper uses 0.5)")
        if self.scale_lr < 0:
            raise qcore.QcoreError(f"scale_lr={self.scale_lr} must be 0 or more (the paper uses 4e-5)")


@dataclass(frozen=True)
class BRECQOptions(ReconOptions):
    iters_act: int | None = field(default=None, metadata={
        "help": "activation-stage steps per block; default iters/4 (the paper: 5000 after 20000)"})
    act_lr: float = field(default=4e-4, metadata={"help": "Adam learning rate of the LSQ activation steps"})
    act_loss_p: float = field(default=2.4, metadata={
        "help": "exponent of the activation stage's loss, |error|^p summed over channels (the paper: 2.4)"})
    loss: Literal["mse", "fisher"] = field(default="mse", metadata={
        "help": "weight stage's loss: 'mse' (the shipped code's) or 'fisher' (the paper's diagonal Fisher: the "
                "squared error weighted by (|dKL/dz| + 1)^2 at the block output; one more backward pass per block)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters_act is not None and self.iters_act < 0:
            raise qcore.QcoreError(f"iters_act={self.iters_act} must be 0 or more (the paper uses 5000)")
        if self.act_lr < 0:
            raise qcore.QcoreError(f"act_lr={self.act_lr} must be 0 or more (the paper uses 4e-4)")
        if not self.act_loss_p > 0:
            raise qcore.QcoreError(f"act_loss_p={self.act_loss_p} must be positive (the paper uses 2.4)")


class _ReconCalibrator(RangeCalibrator):
    """MSE ranges for every quantizer (core's range machinery), then the method's reconstruction passes."""

    Options = ReconOptions
    #: every quantized layer is its own unit, whatever -o recon_granularity says (AdaRound)
    layerwise: bool = False

    def passes(self, ctx: qcore.RunContext) -> list[tuple[str, ReconSettings, LossFn | None]]:
        """``(name, settings, loss)`` of each reconstruction pass, in order (loss None: the squared error)."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, ctx: qcore.RunContext) -> None:
        super().calibrate(model, ctx)  # weight scales and activation ranges: the starting point, frozen z/s
        o = self.options
        units = find_units(model, blocks=self.declared_blocks(ctx))
        facts: dict[str, Any] = {
            "iters_per_unit": o.iters, "paper_iters_per_unit": PAPER_ITERS, "round_lr": o.round_lr,
            "iters_note": ("fewer steps per unit than the papers' 20000 (CPU-sized default); -o iters=20000 "
                           "-o round_lr=0.001 "
                           "--calib-size 1024 gives the papers' setting") if o.iters < PAPER_ITERS
            else "the papers' steps per unit",
            "calibration_samples": _samples(ctx.calibration_batches()),
            "blocks": [u.name for u in units if u.kind == "block"],
            "layerwise": [u.name for u in units if u.kind == "layer"],
        }
        if o.iters < PAPER_ITERS:
            log.info("%s: %d steps per block/layer at round_lr=%g (the papers use %d at 1e-3 on 1024 images; -o "
                     "iters=%d -o round_lr=0.001 --calib-size 1024 for their setting)", self.name, o.iters, o.round_lr,
                     PAPER_ITERS, PAPER_ITERS)
        elif o.round_lr != PAPER_ROUND_LR:
            facts["round_lr_note"] = (f"round_lr={o.round_lr:g} with the papers' {o.iters} steps: the methods' "
                                      f"default is sized for 300 steps; the papers use -o round_lr=0.001")
            log.warning("%s: %s", self.name, facts["round_lr_note"])
        start = time.perf_counter()
        root = None if o.cache == "off" else default_cache_root() if o.cache == "auto" else Path(o.cache)
        for stage, settings, loss in self.passes(ctx):
            report = reconstruct(model, ctx.model, ctx, settings=settings, units=units, loss=loss,
                                 desc=f"{self.name} {stage}", cache=root, memory_limit=int(o.memory_mb * 2**20))
            facts[stage] = report.as_dict()
        facts["seconds"] = round(time.perf_counter() - start, 2)
        ctx.measured[self.name] = facts

    def _estimator(self, name: str) -> RangeFn:
        if name == "shrink":  # BRECQ's initial ranges: factors 0.21, 0.22, ..., 1.00 of [min, max], |error|^2.4
            return functools.partial(mse_range, steps=SHRINK_STEPS, lowest=1.0 - 0.01 * (SHRINK_STEPS - 1),
                                     p=SHRINK_P)
        return super()._estimator(name)

    def declared_blocks(self, ctx: qcore.RunContext) -> list[str] | None:
        """None (recognise blocks by type), [] (layer-wise) or the blocks a plugin declares (``qcore_blocks``)."""
        if self.layerwise or self.options.recon_granularity == "layer":
            return []
        hook = getattr(ctx.hooks, "qcore_blocks", None)  # None when a context is built without a host
        declared = hook(model=ctx.model) if hook is not None else None
        if declared is not None:
            log.info("%s: blocks declared by a plugin (qcore_blocks): %s", self.name, ", ".join(declared) or "none")
            return list(declared)
        return None

    def _base(self, ctx: qcore.RunContext, **kw: Any) -> ReconSettings:
        o = self.options
        return ReconSettings(iters=o.iters, batch_size=o.recon_batch, round_lr=o.round_lr, reg_weight=o.reg_weight,
                             warmup=o.warmup, seed=ctx.config.seed, **kw)


class QDropCalibrator(_ReconCalibrator):
    """QDrop (Wei et al., ICLR 2022): one pass per block learning AdaRound and LSQ steps together, with
    activation quantization dropped element-wise (kept with ``drop_prob``) and mixed block inputs."""

    name = "qdrop"
    description = ("QDrop: block reconstruction, AdaRound + LSQ act steps together, activation quantization randomly "
                   "dropped (-o iters, drop_prob)")
    Options = QDropOptions

    def passes(self, ctx: qcore.RunContext) -> list[tuple[str, ReconSettings, LossFn | None]]:
        o = self.options
        return [("joint", self._base(ctx, act_lr=o.scale_lr, keep_prob=o.drop_prob, inputs="mixed"), None)]


class BRECQCalibrator(_ReconCalibrator):
    """BRECQ (Li et al., ICLR 2021): AdaRound per block with activations off (inputs from the model with earlier
    weights quantized), then LSQ activation steps per block on FP inputs and targets."""

    name = "brecq"
    description = "BRECQ: block reconstruction in two stages, AdaRound weights (acts off), then LSQ act steps"
    Options = BRECQOptions

    def passes(self, ctx: qcore.RunContext) -> list[tuple[str, ReconSettings, LossFn | None]]:
        o = self.options
        iters_act = o.iters_act if o.iters_act is not None else o.iters // 4
        weights = self._base(ctx, acts=False, learn_acts=False, keep_prob=None, inputs="quantized",
                             fisher=o.loss == "fisher")
        acts = ReconSettings(iters=iters_act, batch_size=o.recon_batch, act_lr=o.act_lr, learn_weights=False,
                             acts=True, learn_acts=True, keep_prob=None, inputs="fp", seed=ctx.config.seed)
        return [("weights", weights, None), ("acts", acts, functools.partial(lp_loss, p=o.act_loss_p))]


class AdaRoundCalibrator(_ReconCalibrator):
    """AdaRound (Nagel et al., ICML 2020): the rounding of each layer's weight learned layer by layer on its
    output, with the inputs of the quantized model; activation ranges stay those of the MSE calibration."""

    name = "adaround"
    description = "AdaRound: learned weight rounding, layer by layer (activation ranges: MSE)"
    layerwise = True

    def passes(self, ctx: qcore.RunContext) -> list[tuple[str, ReconSettings, LossFn | None]]:
        return [("weights", self._base(ctx, learn_acts=False, keep_prob=None, inputs="quantized"), None)]


def _samples(batches: Any) -> int | None:
    """Samples in the calibration batches (tensors, or tuples/lists led by one); None for other batch types."""
    n = 0
    for b in batches:
        x = b[0] if isinstance(b, (list, tuple)) and b else b
        if not isinstance(x, torch.Tensor):
            return None
        n += int(x.shape[0]) if x.dim() else 1
    return n
