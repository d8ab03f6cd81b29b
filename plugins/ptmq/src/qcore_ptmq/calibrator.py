"""The ``ptmq`` calibrator: per-bit MSE ranges, then one block reconstruction for all bit-widths.

1. Every :class:`~qcore_ptmq.quantizer.MultiBitFakeQuant` gets a clip range **per bit-width** from core's range
   machinery (MSE by default; weights from their own rows, activations from one observation of the calibration
   data): the frozen weight step set S_w and the starting activation step set S_a. First/last layers pinned by
   ``-o first_last`` (8 bits by default) are restricted to their pinned bits (``-o stem_fc``).
2. :func:`qcore_recon.reconstruct` walks the units (blocks; other layers alone) with :class:`PTMQObjective`: each
   step draws one bit per group (low, mid, high) for weights and activations together, builds the unit's input
   with the **multi-bit feature mixer** (λ-mix of the quantized model's inputs at the three drawn bit-widths, then
   element-wise random replacement by the FP model's input, a fresh mask each step), runs the unit at the three
   bit-widths and minimises the **group-wise distillation loss** (:func:`gd_loss`). Weight roundings are one
   shared tensor per layer (:class:`~qcore_ptmq.quantizer.SharedRounding`), activation steps are learned per bit
   (:class:`~qcore_ptmq.quantizer.MultiBitLSQ`). qcore-recon's per-unit cache makes a killed run resume per unit.
3. The model is left at the run's ``--w-bits``/``--a-bits`` (what the run evaluates); every other setting is
   one :func:`qcore.select_bits` away (``qcore eval --w-bits B --a-bits B``).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import qcore
from qcore_ptmq.quantizer import MultiBitFakeQuant, parse_bits
from qcore_recon import ReconSettings, Unit, find_units, mse_loss, reconstruct, rounding_for
from qcore_recon.cache import default_cache_root
from qcore_recon.calibrators import PAPER_ITERS, ReconOptions
from qcore_recon.recon import capture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PTMQOptions(ReconOptions):
    """``-o`` options of the ``ptmq`` calibrator (plus qcore-recon's: iters, recon_batch, round_lr, reg_weight,
    warmup, cache, weight_range, act_range)."""

    low_bits: str = field(default="3,4", metadata={
        "help": "low-bit group (comma-separated bit-widths; 2,3,4 adds 2 bits at a cost to 3 bits, see the README)"})
    mid_bits: str = field(default="5,6", metadata={"help": "middle-bit group"})
    high_bits: str = field(default="7,8", metadata={"help": "high-bit group (the distillation teacher)"})
    lambdas: str = field(default="0.3333333,0.3333333,0.3333334", metadata={
        "help": "MFM: weights of the low, mid and high features in the mix (sum 1)"})
    replace_prob: float = field(default=0.5, metadata={
        "help": "MFM: probability that an element of the mixed input is replaced by the FP model's feature"})
    gammas: str = field(default="1,1,1", metadata={
        "help": "GD loss weights: FP vs mix, sg(high) vs mid, sg(high) vs low (squared error summed over channels)"})
    gamma_bits: float = field(default=1.0, metadata={
        "help": "weight of the per-bit FP terms |f_fp - f_b|^2 averaged over the three groups (0: paper's loss only)"})
    scale_lr: float = field(default=4e-5, metadata={"help": "Adam learning rate of the LSQ activation steps"})
    drop_prob: float = field(default=0.5, metadata={
        "help": "QDrop inside the unit: probability of KEEPING activation quantization element-wise (1 = always)"})
    stem_fc: Literal["fixed8", "multibit"] = field(default="fixed8", metadata={
        "help": "first/last layer: 'fixed8' keeps weights and inputs at their pinned bits (8; reconstructed with "
                "MSE); 'multibit' switches their weights with the rest (inputs stay pinned)"})
    round_init_bits: int = field(default=3, metadata={
        "help": "the shared rounding starts at the FP weight's fractional part on this bit-width's grid"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("low_bits", "mid_bits", "high_bits"):
            parse_bits(getattr(self, key), key)
        lam = self.mix_weights()
        if abs(sum(lam) - 1.0) > 1e-4 or any(v < 0 for v in lam):
            raise qcore.QcoreError(f"lambdas={self.lambdas!r} must be three non-negative numbers summing to 1")
        if any(v < 0 for v in self.gd_weights()) or self.gamma_bits < 0:
            raise qcore.QcoreError(f"gammas={self.gammas!r}, gamma_bits={self.gamma_bits}: use numbers >= 0")
        if not 0.0 <= self.replace_prob <= 1.0 or not 0.0 <= self.drop_prob <= 1.0:
            raise qcore.QcoreError(f"replace_prob={self.replace_prob} and drop_prob={self.drop_prob} must be in [0, 1]")
        if self.scale_lr < 0:
            raise qcore.QcoreError(f"scale_lr={self.scale_lr} must be 0 or more (QDrop uses 4e-5)")

    def _floats(self, key: str) -> tuple[float, float, float]:
        try:
            v = tuple(float(x) for x in str(getattr(self, key)).split(","))
        except ValueError:
            raise qcore.QcoreError(f"{key}={getattr(self, key)!r}: give three numbers separated by commas") from None
        if len(v) != 3:
            raise qcore.QcoreError(f"{key}={getattr(self, key)!r}: give three numbers (low, mid, high)")
        return v  # type: ignore[return-value]

    def mix_weights(self) -> tuple[float, float, float]:
        """λ (low, mid, high)."""
        return self._floats("lambdas")

    def gd_weights(self) -> tuple[float, float, float]:
        """γ (FP vs mix, high vs mid, high vs low)."""
        return self._floats("gammas")

    def groups(self) -> tuple[tuple[int, ...], ...]:
        return tuple(parse_bits(getattr(self, k), k) for k in ("low_bits", "mid_bits", "high_bits"))


def gd_loss(feats: Sequence[Tensor], fp: Tensor, lambdas: Sequence[float], gammas: Sequence[float],
            gamma_bits: float = 0.0) -> tuple[Tensor, Tensor]:
    """PTMQ's group-wise distillation loss on one unit's outputs ``feats = (f_low, f_mid, f_high)``:

        γ1·‖f_fp − Σλ_g f_g‖² + γ2·‖sg(f_high) − f_mid‖² + γ3·‖sg(f_high) − f_low‖² + γ_b·mean_g ‖f_fp − f_g‖²

    with ‖·‖² QDrop's squared error (summed over channels, averaged over the rest) and sg the stop-gradient:
    the high-bit teacher is pulled only by the FP terms, never towards its students. Returns ``(loss, mix)``."""
    low, mid, high = feats
    mix = lambdas[0] * low + lambdas[1] * mid + lambdas[2] * high
    teacher = high.detach()
    loss = gammas[0] * mse_loss(mix, fp) + gammas[1] * mse_loss(mid, teacher) + gammas[2] * mse_loss(low, teacher)
    if gamma_bits:
        loss = loss + gamma_bits * sum(mse_loss(f, fp) for f in feats) / len(feats)
    return loss, mix


@dataclass
class _UnitData:
    fp_in: Tensor
    fp_out: Tensor
    q_in: dict[int, Tensor]
    gen: torch.Generator
    switch: list[MultiBitFakeQuant]


class PTMQObjective:
    """``objective(module, x, target, unit)`` for :func:`qcore_recon.reconstruct`: the MFM input and the GD loss at
    one drawn bit per group. It draws its own mini-batches (its input mixes the quantized model's inputs at
    several bit-widths, which it caches per unit on first use, with the FP model's), so ``x`` and ``target`` from
    the engine are not used. Draws come from a generator seeded by the run's seed and the unit's name, so a unit
    recomputed after a resume is the same."""

    def __init__(self, model: nn.Module, fp_model: nn.Module, batches: Sequence[Any],
                 forward: Callable[[nn.Module, Any], Any], quantizers: dict[str, tuple[Any, Any]],
                 options: PTMQOptions, seed: int = 0) -> None:
        self.model, self.fp_model, self.batches, self.forward = model, fp_model, list(batches), forward
        self.quantizers = quantizers
        self.groups = options.groups()
        self.all_bits = tuple(sorted({b for g in self.groups for b in g}))
        self.lambdas, self.gammas = options.mix_weights(), options.gd_weights()
        self.gamma_bits, self.replace_prob = options.gamma_bits, options.replace_prob
        self.batch_size = options.recon_batch
        self.seed = seed
        self._unit: str | None = None
        self._data: _UnitData | None = None
        #: the last step's replacement mask (True: the FP feature) and drawn bits, for inspection
        self.last_mask: Tensor | None = None
        self.last_bits: tuple[int, ...] = ()
        # the engine's cache key names the objective by __qualname__: make it carry every option that shapes it
        key = {"groups": self.groups, "lambdas": self.lambdas, "gammas": self.gammas, "gamma_bits": self.gamma_bits,
               "replace_prob": self.replace_prob, "batch": self.batch_size}
        self.__qualname__ = f"PTMQObjective{json.dumps(key, sort_keys=True)}"

    def _prepare(self, unit: Unit) -> _UnitData:
        if self._unit == unit.name and self._data is not None:
            return self._data
        self._data = None
        fp_in, fp_out = capture(self.fp_model, self.forward, self.batches, unit.name, output=True)
        assert fp_out is not None
        saved = {n: (w.active_bits if isinstance(w, MultiBitFakeQuant) else None,
                     a.active_bits if isinstance(a, MultiBitFakeQuant) else None)
                 for n, (w, a) in self.quantizers.items()}
        q_in: dict[int, Tensor] = {}
        switching = any(qcore.switchable_bits(self.model).values())
        for b in self.all_bits:  # the quantized model up to this unit, at W_b A_b (earlier units final)
            if not switching and q_in:
                q_in[b] = next(iter(q_in.values()))  # nothing switches: one input serves every bit
                continue
            if switching:
                qcore.select_bits(self.model, b, b)
            q_in[b] = capture(self.model, self.forward, self.batches, unit.name, output=False)[0]
        for n, (wb, ab) in saved.items():
            w, a = self.quantizers[n]
            if wb is not None and w.bit_choices():
                w.select_bits(wb)
            if ab is not None and a.bit_choices():
                a.select_bits(ab)
        switch = [q for n in unit.layers for q in self.quantizers.get(n, (None, None))
                  if isinstance(q, MultiBitFakeQuant) and q.bit_choices()]
        gen = torch.Generator().manual_seed(self.seed * 1000003 + zlib.crc32(unit.name.encode()))
        self._unit, self._data = unit.name, _UnitData(fp_in, fp_out, q_in, gen, switch)
        return self._data

    def set_unit_bits(self, data: _UnitData, bits: int) -> None:
        """Switch the unit's switchable quantizers (weights and activations together) to ``bits``."""
        for q in data.switch:
            q.select_bits(bits)

    def mfm_input(self, data: _UnitData, idx: Tensor, bits: Sequence[int]) -> Tensor:
        """The multi-bit feature mixer's output for samples ``idx``: Σλ_g · (quantized input at bits[g]), each
        element replaced by the FP model's with probability ``replace_prob`` (a fresh mask every call)."""
        fp = data.fp_in[idx]
        mixed = sum(lam * data.q_in[b][idx] for lam, b in zip(self.lambdas, bits, strict=True))
        u = torch.rand(fp.shape, generator=data.gen).to(fp.device)
        mask = u < self.replace_prob
        self.last_mask = mask
        return torch.where(mask, fp, mixed)

    def __call__(self, module: nn.Module, x: Tensor, target: Tensor, unit: Unit) -> Tensor:
        data = self._prepare(unit)
        n = data.fp_in.shape[0]
        idx = torch.randint(n, (min(self.batch_size, n),), generator=data.gen)
        bits = tuple(g[int(torch.randint(len(g), (1,), generator=data.gen))] for g in self.groups)
        self.last_bits = bits
        inp = self.mfm_input(data, idx, bits)
        fp_out = data.fp_out[idx]
        if not data.switch:  # every layer of the unit holds one bit-width (first/last at 8 bits): plain MSE
            return mse_loss(module(inp), fp_out)
        feats = []
        for b in bits:
            self.set_unit_bits(data, b)
            feats.append(module(inp))
        loss, _ = gd_loss(feats, fp_out, self.lambdas, self.gammas, self.gamma_bits)
        return loss


class PTMQCalibrator(qcore.RangeCalibrator):
    """PTMQ (Xu et al., AAAI 2024): a multi-bit model from one block reconstruction (see the module docstring)."""

    name = "ptmq"
    description = ("PTMQ: per-bit MSE step sets, then one block reconstruction for every bit-width (MFM + group-wise "
                   "distillation, shared rounding); the model switches bits at run time")
    Options = PTMQOptions

    def calibrate(self, model: nn.Module, ctx: qcore.RunContext) -> None:
        o = self.options
        start = time.perf_counter()
        layers = qcore.quant_layers(model)
        quantizers: dict[str, tuple[Any, Any]] = {}
        fixed_format = []
        for name, layer in layers.items():
            for q in (layer.weight_quantizer, layer.act_quantizer):
                if q is not None and not isinstance(q, MultiBitFakeQuant):
                    fixed_format.append(f"{name} ({type(q).__name__})")
            quantizers[name] = (layer.weight_quantizer, layer.act_quantizer)
        if fixed_format:
            log.warning("ptmq: %d quantizer(s) hold one bit-width (e.g. %s; the run's quantizer is not 'ptmq'): they "
                        "are reconstructed at that bit-width only and the model does not switch there",
                        len(fixed_format), fixed_format[0])
        held = set(parse_bits(o.low_bits, "low_bits") + parse_bits(o.mid_bits, "mid_bits")
                   + parse_bits(o.high_bits, "high_bits"))
        multibit = any(isinstance(q, MultiBitFakeQuant) for pair in quantizers.values() for q in pair)
        for flag, b in (("--w-bits", ctx.budget.w_bits), ("--a-bits", ctx.budget.a_bits)):
            if multibit and b is not None and b not in held:
                raise qcore.QcoreError(f"{flag} {b} is not in the bit groups ({', '.join(map(str, sorted(held)))}); "
                                       "the run evaluates that setting: choose one of them or widen the groups")
        self._restrict_pinned(ctx, quantizers)
        self._ranges(model, ctx, quantizers)
        seconds_ranges = time.perf_counter() - start
        # reconstruction, all bit-widths at once
        units = find_units(model, blocks=self._declared_blocks(ctx))
        root = None if o.cache == "off" else default_cache_root() if o.cache == "auto" else Path(o.cache)
        batches = list(ctx.calibration_batches())
        objective = PTMQObjective(model, ctx.model, batches, ctx.task.forward, quantizers, o, ctx.config.seed)
        settings = ReconSettings(iters=o.iters, batch_size=o.recon_batch, round_lr=o.round_lr, act_lr=o.scale_lr,
                                 reg_weight=o.reg_weight, warmup=o.warmup, seed=ctx.config.seed, inputs="fp",
                                 keep_prob=None if o.drop_prob >= 1.0 else o.drop_prob)
        rounding = _rounding_factory(o.round_init_bits)
        report = reconstruct(model, ctx.model, batches, forward=ctx.task.forward, settings=settings, units=units,
                             objective=objective, weight_rounding=rounding, desc="ptmq", cache=root)
        objective._data = None
        # the run's own setting is what it evaluates; every other one is a select_bits away
        done = (qcore.select_bits(model, ctx.budget.w_bits, ctx.budget.a_bits)
                if any(qcore.switchable_bits(model).values()) else {})  # a single-setting quantizer: as it is
        ctx.measured[self.name] = {
            "bit_groups": {"low": list(o.groups()[0]), "mid": list(o.groups()[1]), "high": list(o.groups()[2])},
            "switchable_bits": qcore.switchable_bits(model),
            "evaluated_setting": {"w_bits": ctx.budget.w_bits, "a_bits": ctx.budget.a_bits,
                                  "switched_layers": len(done)},
            "fixed_layers": {n: [int(q.bits[0]) for q in pair if q is not None]
                             for n, pair in quantizers.items()
                             if all(not (isinstance(q, MultiBitFakeQuant) and q.bit_choices()) for q in pair)},
            "iters_per_unit": o.iters, "paper_iters_per_unit": PAPER_ITERS,
            "iters_note": "each step runs the unit at three bit-widths (one per group)",
            "calibration_samples": _samples(batches),
            "options": asdict(o),
            "ranges_seconds": round(seconds_ranges, 2),
            "recon": report.as_dict(),
            "seconds": round(time.perf_counter() - start, 2),
        }

    def _declared_blocks(self, ctx: qcore.RunContext) -> list[str] | None:
        if self.options.recon_granularity == "layer":
            return []
        hook = getattr(ctx.hooks, "qcore_blocks", None)
        declared = hook(model=ctx.model) if hook is not None else None
        return list(declared) if declared is not None else None

    def _restrict_pinned(self, ctx: qcore.RunContext, quantizers: dict[str, tuple[Any, Any]]) -> None:
        """Pinned layers (first/last by ``-o first_last``, YAML ``layers:``) keep their pinned bits: their input
        always, their weight too unless ``stem_fc=multibit``."""
        for name, pin in ctx.pinned.items():
            if name not in quantizers:
                continue
            w, a = quantizers[name]
            if isinstance(a, MultiBitFakeQuant) and pin.a_bits is not None:
                a.restrict(pin.a_bits)
            if isinstance(w, MultiBitFakeQuant) and pin.w_bits is not None and self.options.stem_fc == "fixed8":
                w.restrict(pin.w_bits)

    def _ranges(self, model: nn.Module, ctx: qcore.RunContext, quantizers: dict[str, tuple[Any, Any]]) -> None:
        """An MSE (``-o weight_range``/``act_range``) clip range per held bit-width of every quantizer."""
        west, aest = self.weight_estimator(), self.act_estimator()
        layers = qcore.quant_layers(model)
        with torch.no_grad():
            for name, (w, _) in quantizers.items():
                if w is None:
                    continue
                rows = w.rows_of(layers[name].module.weight.detach())
                for b in _held(w):
                    if b is not None:
                        w.select_bits(b)
                    qcore.calibrate_rows(w, rows, west)
            observers = qcore.observe_activations(model, ctx, self.options.act_samples)
            for name, obs in observers.items():
                a = quantizers[name][1]
                sample = obs.sample()
                for b in _held(a):
                    if b is not None:
                        a.select_bits(b)
                    qcore.calibrate_rows(a, sample, aest)


def _rounding_factory(init_bits: int) -> Callable[[Any, Tensor], Any]:
    from qcore_ptmq.quantizer import SharedRounding

    def make(quantizer: Any, weight: Tensor) -> Any:
        if not isinstance(quantizer, MultiBitFakeQuant):  # one bit-width: AdaRound or the format's own rounding
            return rounding_for(quantizer, weight)
        return SharedRounding(quantizer, weight, init_bits)

    make.__qualname__ = f"shared_rounding(init_bits={init_bits})"
    return make


def _samples(batches: Sequence[Any]) -> int | None:
    n = 0
    for b in batches:
        x = b[0] if isinstance(b, (list, tuple)) and b else b
        if not isinstance(x, Tensor):
            return None
        n += int(x.shape[0]) if x.dim() else 1
    return n


def _held(q: Any) -> tuple[int | None, ...]:
    """The bit-widths to calibrate ``q`` at: every one a multi-bit quantizer holds, else its own (None)."""
    return q.held_bits() if isinstance(q, MultiBitFakeQuant) else (None,)
