"""The ``lattice-search`` calibrator: lattice bases by data-free search, activation ranges at the seed's
bit-dependent quantiles, and optionally block reconstruction through qcore-recon.

It calibrates every quantizer through the :class:`qcore.FakeQuantizer` protocol (``calibrate_rows``: a range
where the format uses one, then ``fit``), so it also calibrates core's uniform grid (weights: MSE ranges); a
:class:`~qcore_latticeq.quantizer.LatticeFakeQuant` then gets its bases searched
(:func:`~qcore_latticeq.search.search_bases`) and stored with ``set_basis``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import qcore
from qcore.ranges import RangeFn, mse_range
from qcore_latticeq.activations import quantile_range
from qcore_latticeq.quantizer import LatticeFakeQuant
from qcore_latticeq.search import SearchSettings, loss_power, search_bases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatticeSearchOptions:
    """``-o`` options of ``lattice-search``."""

    steps: int = field(default=20, metadata={
        "help": "basis-search proposals per noise level and restart (the seed: 80 quick, 800-1500 paper)"})
    restarts: int = field(default=1, metadata={
        "help": "independent searches from the scalar grid, best kept per channel (0: the scalar grid)"})
    refine: int = field(default=8, metadata={
        "help": "straight-through refinement rounds per restart (least-squares basis for the fixed codes)"})
    select: bool = field(default=True, metadata={
        "help": "keep the searched bases of the channels that pay for their n^2 * basis_bits stored bits, chosen "
                "exactly per tensor (best gain over the scalar grid at equal rate, a 1-bit flag per channel counted "
                "when mixed; never below the scalar grid); false: every searched basis is kept"})
    loss: Literal["mse", "cubic"] = field(default="mse", metadata={
        "help": "basis-search loss: squared weight error, or the seed's cubic error sum |w_hat - w|^3"})
    weighting: Literal["none", "input"] = field(default="none", metadata={
        "help": "input: weight each weight's error by the second moment E[x_j^2] of the input it multiplies "
                "(the diagonal of E[x x^T] on the calibration data, FP model: an output-aware loss) in the scalar "
                "start, the basis search and the basis choice; none: plain weight error"})
    act_quantile: float = field(default=0.0, metadata={
        "help": "activation clip quantile in (0.5, 1]; 0 = the seed's level for the bit-width (4 bits: 0.9997)"})
    act_samples: int = field(default=2**20, metadata={
        "help": "activation values kept per row for the quantiles (exact extremes always kept)"})
    recon: bool = field(default=False, metadata={
        "help": "after calibration, block reconstruction with qcore-recon (lattice STE rounding + LSQ act steps)"})
    recon_iters: int = field(default=300, metadata={"help": "reconstruction steps per block (-o recon=true)"})

    def __post_init__(self) -> None:
        if self.steps < 0 or self.restarts < 0 or self.refine < 0:
            raise qcore.QcoreError("steps, restarts and refine must be 0 or more (0 restarts keeps the scalar grid)")
        if self.act_quantile != 0.0 and not 0.5 < self.act_quantile <= 1.0:
            raise qcore.QcoreError(f"act_quantile={self.act_quantile} must be in (0.5, 1], or 0 for the seed's levels")
        if self.act_samples < 16:
            raise qcore.QcoreError(f"act_samples={self.act_samples} must be at least 16")
        if self.recon_iters < 0:
            raise qcore.QcoreError(f"recon_iters={self.recon_iters} must be 0 or more")


class LatticeSearchCalibrator(qcore.Calibrator):
    """Lattice bases by search from the MSE-optimal scalar grid; activation ranges at quantiles; optional
    block reconstruction."""

    name = "lattice-search"
    description = ("lattice bases searched from the MSE-optimal scalar grid (-o steps, restarts, refine, loss); "
                   "activations at the seed's bit-dependent quantiles; -o recon=true reconstructs blocks")
    Options = LatticeSearchOptions

    def settings(self, seed: int) -> SearchSettings:
        o = self.options
        return SearchSettings(steps=o.steps, restarts=o.restarts, refine=o.refine, loss=o.loss, seed=seed,
                              select=o.select)

    def input_weights(self, model: nn.Module, ctx: qcore.RunContext) -> dict[str, Tensor]:
        """Per lattice layer, one loss weight per weight of a row (``rows_of`` order ``C_in, kh, kw``): the
        second moment ``E[x_c^2]`` of input channel ``c`` on the calibration data, through the FP model
        (``ctx.model``), divided by its mean and floored at 1e-3 of it (a dead input still counts a little).
        An equalized layer (``-o equalize``) quantizes ``W * s`` against the input ``x / s``, so its moments are
        taken of ``x / s`` (the FP input times :attr:`QuantLayer.input_scale`)."""
        wrapped = {name: layer for name, layer in qcore.quant_layers(model).items()
                   if isinstance(layer.weight_quantizer, LatticeFakeQuant)}
        names = {name: layer.info for name, layer in wrapped.items()}
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}

        def on_input(name: str, x: Tensor) -> None:
            info = names[name]
            rows = qcore.input_rows(x.detach().float(), info, per_channel=True)
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(dim=1)
            counts[name] = counts.get(name, 0) + rows.shape[1]

        qcore.watch_layers(ctx.model, ctx.task.forward, ctx.calibration_batches(), names, on_input=on_input)
        out = {}
        for name in names:
            if name not in sums:
                continue
            m = sums[name] / max(counts[name], 1)
            inv = wrapped[name].input_scale
            if inv is not None:  # E[(x_c / s_c)^2] = E[x_c^2] / s_c^2
                m = m * inv.detach().float().to(m.device).reshape(-1).pow(2)
            m = m / m.mean().clamp_min(1e-30)
            out[name] = m.clamp_min(1e-3)
        return out

    def calibrate_weights(self, model: nn.Module, ctx: qcore.RunContext) -> dict[str, Any]:
        """Fit every weight quantizer, then search the lattice ones; returns per-layer facts."""
        facts: dict[str, Any] = {}
        layers = qcore.quant_layers(model)
        moments = self.input_weights(model, ctx) if self.options.weighting == "input" else {}
        for i, (name, layer) in enumerate(qcore.track(list(layers.items()), desc="lattice bases", unit="layer")):
            q = layer.weight_quantizer
            if q is None:
                continue
            if not isinstance(q, qcore.FakeQuantizer):
                raise qcore.QcoreError(f"lattice-search calibrates qcore.FakeQuantizer modules; layer {name!r} has "
                                       f"a {type(q).__name__}")
            with torch.no_grad():
                rows = q.rows_of(layer.module.weight.detach())
                qcore.calibrate_rows(q, rows, mse_range)
                weights = None
                if isinstance(q, LatticeFakeQuant) and name in moments:
                    m = moments[name].to(rows.device)
                    if rows.shape[1] % m.numel() == 0:  # C_in inputs, each read by kh * kw weights of a row
                        weights = m.repeat_interleave(rows.shape[1] // m.numel())
                        step = q.scalar_step(rows, weights=weights, p=loss_power(self.options.loss))
                        q.set_basis(step[:, None, None] * torch.eye(q.n, device=rows.device))
                    else:
                        log.warning("lattice-search %s: %d input channels do not divide its rows of %d weights; "
                                    "plain weight error", name, m.numel(), rows.shape[1])
                if isinstance(q, LatticeFakeQuant) and q.n > 1:
                    start = time.perf_counter()
                    basis, rep = search_bases(q, rows, self.settings(ctx.config.seed + i), weights)
                    q.set_basis(basis)
                    gain = 10 * math.log10(rep["loss_end"] / rep["loss_start"]) if rep["loss_start"] > 0 else 0.0
                    kept = int(q.basis_rows().sum())
                    facts[name] = {"n": q.n, "gain_db": round(gain, 3), "rows_improved": rep["rows_improved"],
                                   "rows_with_basis": kept, "rows": rep["rows"],
                                   "basis_bits_stored": q.stored_extra_bits(),
                                   "gain_equal_rate_db": rep.get("gain_equal_rate_db"),
                                   "loss": self.options.loss + ("" if weights is None else ", input-weighted"),
                                   "seconds": round(time.perf_counter() - start, 2)}
                    log.info("lattice-search %s: n=%d, %s loss %+.2f dB vs the scalar grid, %d/%d channels improved, "
                             "%d keep a basis", name, q.n, self.options.loss, gain, rep["rows_improved"], rep["rows"],
                             kept)
                elif isinstance(q, LatticeFakeQuant):
                    facts[name] = {"n": 1, "gain_db": 0.0, "note": "scalar grid (first layer or other kernel)"}
            layer.unfreeze()
        return facts

    def act_estimator(self) -> RangeFn:
        level = self.options.act_quantile or None
        return functools.partial(quantile_range, level=level)

    def calibrate(self, model: nn.Module, ctx: qcore.RunContext) -> None:
        start = time.perf_counter()
        facts: dict[str, Any] = {"layers": self.calibrate_weights(model, ctx)}
        facts["weight_seconds"] = round(time.perf_counter() - start, 2)
        layers = qcore.quant_layers(model)
        est = self.act_estimator()
        for name, obs in qcore.observe_activations(model, ctx, self.options.act_samples).items():
            q = layers[name].act_quantizer
            if not isinstance(q, qcore.FakeQuantizer):
                raise qcore.QcoreError(f"lattice-search calibrates qcore.FakeQuantizer modules; the input of "
                                       f"{name!r} has a {type(q).__name__}")
            with torch.no_grad():
                qcore.calibrate_rows(q, obs.sample(), est)
        facts["act_quantile"] = self.options.act_quantile or "seed levels by bits (4: 0.9997, 8: 1.0)"
        if self.options.recon:
            facts["recon"] = self.reconstruct(model, ctx)
        facts["seconds"] = round(time.perf_counter() - start, 2)
        ctx.measured[self.name] = facts

    def reconstruct(self, model: nn.Module, ctx: qcore.RunContext) -> dict[str, Any]:
        """Block reconstruction with qcore-recon's engine (QDrop settings, lattice STE rounding)."""
        try:
            from qcore_recon import ReconSettings, reconstruct
        except ImportError as exc:
            raise qcore.MissingDependencyError("qcore-recon", "pip install -e plugins/recon") from exc
        report = reconstruct(model, ctx.model, ctx, settings=ReconSettings(iters=self.options.recon_iters,
                                                                          seed=ctx.config.seed),
                             desc="lattice-search recon")
        return report.as_dict()
