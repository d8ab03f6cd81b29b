"""The ``rdoq`` allocator: measure RD curves of every weight group, then solve for the target average bits.

Budget convention (``-o budget=``): ``weights`` (default): ``--target-bits`` is the average weight bit-width
over *all* quantized weights, pinned layers (first/last at 8 bits by default) included, so pins are paid for
out of the same budget; activations are uniform at ``--a-bits``. ``joint``: one average over weight elements
and activation elements per sample, as the seed (activation curves per layer input, per tensor). ``separate``:
weights to ``--target-bits`` and activations to an average of ``--a-bits``, each by its own allocation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qcore import (
    Allocator,
    LayerSpec,
    NotImplementedMethodError,
    Plan,
    QcoreError,
    RunContext,
    cache_root_problem,
    layer_spec,
    mean_bits,
    module_device,
    to_device,
)
from qcore.knapsack import Allocation, lagrangian_for_budget, solve_dp
from qcore_rdoq.act_curves import activation_curves, second_order_activation_curves
from qcore_rdoq.cache import CurveCache, default_cache_root, fingerprints
from qcore_rdoq.curves import Curves, Engine, first_order_curves, make_engine
from qcore_rdoq.deployment import WEIGHT_CLIP, Clip, deployment
from qcore_rdoq.groups import group_entropy, weight_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RDOQOptions:
    """``-o`` options of the ``rdoq`` allocator (also the curve settings of :func:`layer_curves`)."""

    group: int = field(default=0, metadata={
        "help": "output channels per weight group; 0 = auto (8, or 128 when a layer has >= 512 channels)"})
    engine: Literal["fast", "reference", "replay", "second-order"] = field(default="fast", metadata={
        "help": "RD curves: fast (torch.fx: cached, downstream only, batched; models fx cannot trace, e.g. "
                "spconv detectors, use replay), reference (rerun the whole model), replay (forward hooks: "
                "recorded upstream outputs, downstream only; the reference's curves without tracing), "
                "second-order (Gauss-Newton estimate from per-sample Jacobians, no pass per candidate)"})
    projections: int = field(default=0, metadata={
        "help": "second-order engine: 0 = exact Gauss-Newton (one backward pass per output of the distortion "
                "target); K > 0 = K random output directions per sample, an unbiased estimate at K passes "
                "(for targets with many outputs, e.g. 1000 ImageNet logits)"})
    deadzones: int = field(default=0, metadata={
        "help": "dead-zone ratios searched per weight group and bit-width, as in the seed: N tries 0, 1/N, ..., "
                "(N-1)/N of the group's weights in the dead zone and keeps the best for each bit-width; 0 = auto "
                "(10 with --quantizer deadzone, else 1 = plain grid only)"})
    solver: Literal["dp", "lagrangian"] = field(default="dp", metadata={
        "help": "dp: exact dynamic programming; lagrangian: bisection on lambda over the curves"})
    min_bits: int = field(default=0, metadata={"help": "lowest bit-width a group may get (0 = pruned)"})
    max_bits: int = field(default=10, metadata={"help": "highest candidate bit-width"})
    curve_samples: int = field(default=64, metadata={"help": "calibration samples used for the RD curves"})
    chunk: int = field(default=0, metadata={
        "help": "candidates per batched pass (fast engine); 0 = auto (about 256 samples a pass on CPU, 16k on GPU)"})
    resolution: float = field(default=1e-3, metadata={"help": "budget (average bits) the DP may lose to grid "
                                                      "rounding when costs have no exact grid"})
    budget: Literal["weights", "joint", "separate"] = field(default="weights", metadata={
        "help": "weights: --target-bits averages the weights, activations uniform at --a-bits; joint: one "
                "average over weight and activation elements (per image), as the seed; separate: weights to "
                "--target-bits and activations to an average of --a-bits, each by its own RD allocation"})
    min_act_bits: int = field(default=2, metadata={"help": "lowest bit-width an activation may get"})
    rate: Literal["fixed", "entropy"] = field(default="fixed", metadata={
        "help": "rate of a weight group: 'fixed' = elements x bits; 'entropy' = elements x entropy of its integer "
                "codes (what an entropy coder would store; the budget then holds the entropy, and the fixed-length "
                "bits reported are higher)"})
    plots: bool = field(default=False, metadata={
        "help": "write plots/rd_curves.png and plots/bits_per_layer.png with the outputs (needs matplotlib: "
                "pip install qcore-rdoq[plots])"})
    cache: str = field(default="auto", metadata={
        "help": "RD curve cache: 'auto' ($QCORE_CACHE_DIR or ~/.cache/qcore/rdoq), 'off', or a folder"})

    def __post_init__(self) -> None:
        if not 0 <= self.min_bits <= self.max_bits <= 16:
            raise QcoreError(f"need 0 <= min_bits <= max_bits <= 16, got {self.min_bits}, {self.max_bits}")
        if not 1 <= self.min_act_bits <= self.max_bits:
            raise QcoreError(f"need 1 <= min_act_bits <= max_bits, got {self.min_act_bits}")
        if self.projections and self.engine != "second-order":
            raise QcoreError("-o projections applies to the second-order engine; add -o engine=second-order")
        for key, value, lowest in (("group", self.group, 0), ("chunk", self.chunk, 0),
                                   ("projections", self.projections, 0), ("deadzones", self.deadzones, 0),
                                   ("curve_samples", self.curve_samples, 1)):
            if value < lowest:
                raise QcoreError(f"-o {key}={value} is out of range; use {lowest} or more (group, chunk, projections "
                                 "and deadzones must be >= 0, curve_samples >= 1, resolution > 0)")
        if self.resolution <= 0:
            raise QcoreError(f"-o resolution={self.resolution} is out of range; resolution must be > 0")
        if self.cache not in ("auto", "off"):  # before any curve is measured, not when the first one is written
            problem = cache_root_problem(Path(self.cache)) if self.cache.strip() else "it is empty"
            if problem:
                raise QcoreError(f"-o cache={self.cache} cannot hold the RD curve cache: {problem}; pass a writable "
                                 "folder, cache=auto or cache=off")


def auto_group_size(out_channels: list[int]) -> int:
    """Channels per group when the user gave none: 128 (the seed's choice) for large models, else 8."""
    return 128 if max(out_channels) >= 512 else 8


def _curve_batches(batches: list[Any], samples: int) -> list[Any]:
    out, n = [], 0
    for b in batches:
        if n >= samples:
            break
        size = int(b.shape[0]) if hasattr(b, "shape") else int(b.get("batch_size", 1)) if isinstance(b, dict) else 1
        if hasattr(b, "shape") and n + size > samples:
            b = b[: samples - n]
            size = samples - n
        out.append(b)
        n += size
    return out


def _model_key(ctx: RunContext) -> dict[str, Any]:
    """What both curve caches' keys need beyond the weights and the data: the run's model arguments (another
    activation or pooling: the same weights, another model) and the task's ``forward_key`` (the detection task's
    target: the same model and data, another distortion); empty when neither is set."""
    key: dict[str, Any] = {}
    if ctx.config.model_args:
        key["model_args"] = ctx.config.model_args
    if ctx.task.forward_key:
        key["forward"] = dict(ctx.task.forward_key)
    return key


class RDOQAllocator(Allocator):
    """Rate-distortion optimal bits per output-channel group of every layer's weight."""

    name = "rdoq"
    description = "RD curves per weight channel group (first order) + DP or Lagrangian solver to --target-bits"
    Options = RDOQOptions

    @property
    def budget_convention(self) -> str | None:  # type: ignore[override]
        """``--target-bits`` is qcore's pins-included weight average for the ``weights`` budget on fixed-length
        codes, which core checks; the joint and separate budgets and entropy rates are checked here, against
        their own convention."""
        return "pins_included" if self.options.budget == "weights" and self.options.rate == "fixed" else None

    def curves(self, ctx: RunContext, free: list[str], group: int, batches: list[Any],
               engine: Engine | None, clip: Clip = WEIGHT_CLIP) -> tuple[Curves, np.ndarray | None]:
        """Weight curves of the ``free`` layers (``engine``: the first-order engine, None for second-order),
        the candidates clipped and gridded as ``clip`` (the deployed weight quantizer) says.

        With several dead-zone ratios, each curve entry is the best over the ratios, and the second value gives
        the ratio that achieved it (``[groups, bits]``); otherwise it is None.
        """
        o = self.options
        ratios = self._deadzone_ratios(ctx)
        bits = list(range(o.min_bits, o.max_bits + 1))
        corr = ctx.weight_correction  # curves see the weights exactly as deployment corrects them
        projected = engine is None and not all(isinstance(b, torch.Tensor) for b in batches)
        if projected and ctx.task.split is not None:
            # random directions per sample, not per batch: the cross terms between a batch's samples are noise
            # (relative standard deviation sqrt(2/K) per batch, about sqrt(2/(K N)) over N samples, same cost)
            device = module_device(ctx.model)
            batches = [to_device(s, device) for b in batches for s in ctx.task.split(b)]
        caches = self._caches(ctx, batches, group, bits, corr.name if corr else "none", ratios, clip)
        layers = {n: ctx.layers[n] for n in free}
        if projected:
            from qcore_rdoq.second_order import projected_curve_set

            if not o.projections:
                raise QcoreError("engine=second-order on batches that are not tensors (e.g. detection) estimates "
                                 "with random projections of the whole distortion target: add -o projections=K "
                                 "(e.g. 16; the exact expansion needs one backward pass per output)")
            per_ratio = projected_curve_set(ctx.model, ctx.task.forward, batches, layers, group, bits, ratios,
                                            o.projections, clip=clip, caches=caches, correction=corr,
                                            seed=ctx.config.seed, grad_context=ctx.task.grad_context)
        elif engine is None:
            from qcore_rdoq.second_order import second_order_curve_set

            per_ratio = second_order_curve_set(ctx.model, batches, layers, group, bits, ratios, clip=clip,
                                               caches=caches, correction=corr, projections=o.projections,
                                               seed=ctx.config.seed)
        else:
            per_ratio = [first_order_curves(ctx.model, ctx.task.forward, batches, layers, group, bits, engine,
                                            clip=clip, cache=c, correction=corr, deadzone=r)
                         for r, c in zip(ratios, caches, strict=True)]
        if len(per_ratio) == 1:
            return per_ratio[0], None
        stack = np.stack([c.dist for c in per_ratio])  # [ratios, groups, bits]
        best = stack.argmin(axis=0)  # ties: the smaller ratio (0 = the plain grid)
        first = per_ratio[0]
        layer_engines = {n: "cache" if all(c.layer_engines.get(n) == "cache" for c in per_ratio)
                         else first.layer_engines.get(n, first.engine) for n in free}
        curves = Curves(groups=first.groups, bits=first.bits, dist=stack.min(axis=0), engine=first.engine,
                        seconds=sum(c.seconds for c in per_ratio), layer_engines=layer_engines)
        log.info("rdoq: dead-zone search over %d ratios (%s) for %d groups", len(ratios), o.engine,
                 len(first.groups))
        return curves, np.asarray(ratios)[best]

    def _deadzone_ratios(self, ctx: RunContext) -> list[float]:
        n = self.options.deadzones or (10 if ctx.quantizer.name == "deadzone" else 1)
        if n > 1 and ctx.quantizer.name != "deadzone":
            raise QcoreError(f"-o deadzones={n} searches dead-zone grids, which need --quantizer deadzone "
                             "(or --method rdoq-deadzone)")
        return [i / n for i in range(n)]

    def _cache_settings(self, ctx: RunContext, group: int, bits: list[int], corr: str, clip: Clip = WEIGHT_CLIP
                       ) -> dict[str, Any]:
        """The settings in the weight curves' cache key besides the model and the data: whatever changes a
        candidate or its measurement, the deployed clip (estimator, percentile, symmetry) included."""
        o = self.options
        settings: dict[str, Any] = {"engine": o.engine, "group": group, "bits": bits, "weight_clip": clip.key(),
                                    "correction": corr, "version": 2}
        if o.engine == "second-order" and o.projections:
            settings |= {"projections": o.projections, "seed": ctx.config.seed}
            if ctx.task.split is not None:
                settings["directions"] = ctx.task.split_unit
        return settings | _model_key(ctx)

    def _caches(self, ctx: RunContext, batches: list[Any], group: int, bits: list[int], corr: str,
                deadzones: list[float], clip: Clip = WEIGHT_CLIP) -> list[CurveCache | None]:
        """The curve cache of each dead-zone ratio's setting (Nones with ``-o cache=off``)."""
        root = self._cache_root()
        if root is None:
            return [None] * len(deadzones)
        settings = self._cache_settings(ctx, group, bits, corr, clip)
        # bump deadzone_fit when fit_deadzone's result changes
        per_ratio = [settings | ({"deadzone": d, "deadzone_fit": 2} if d else {}) for d in deadzones]
        return [CurveCache(root, key) for key in fingerprints(ctx.model, batches, per_ratio)]

    def _cache_root(self, warn: bool = True) -> Path | None:
        """The curve cache's folder: ``-o cache``'s, None with ``-o cache=off`` or when the default location
        cannot hold one (said with a warning when ``warn``)."""
        o = self.options
        if o.cache == "off":
            return None
        root = default_cache_root() if o.cache == "auto" else Path(o.cache)
        problem = cache_root_problem(root) if o.cache == "auto" else None
        if problem:  # the default location is no choice of the user's: go on without a cache
            if warn:
                log.warning("rdoq: no RD curve cache in %s (%s); set QCORE_CACHE_DIR or -o cache=FOLDER to keep "
                            "curves between runs", root, problem)
            return None
        return root

    def _act_cache(self, ctx: RunContext, batches: list[Any], bits: list[int], clip: Clip) -> CurveCache | None:
        """The cache of the second-order activation curves (None as for :meth:`_caches`): keyed by the model, the
        data and whatever changes a candidate or its measurement (bits, the deployed activation clip, the seed
        of the observed samples and of the random directions, the projections)."""
        root = self._cache_root(warn=False)  # the weights' curves said it already
        if root is None:
            return None
        settings: dict[str, Any] = {"curves": "activations", "engine": "second-order", "bits": bits,
                                    "act_clip": clip.key(), "projections": self.options.projections,
                                    "seed": ctx.config.seed, "version": 1}
        return CurveCache(root, fingerprints(ctx.model, batches, [settings | _model_key(ctx)])[0])

    def _solve(self, sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget: float
               ) -> tuple[Allocation, float | None]:
        if self.options.solver == "dp":
            return solve_dp(sizes, dists, rates, budget, resolution=self.options.resolution), None
        return lagrangian_for_budget(sizes, dists, rates, budget)

    def allocate(self, ctx: RunContext) -> Plan:
        o = self.options
        target = ctx.budget.target_bits
        if target is None:
            raise QcoreError("rdoq needs an average bit budget: pass --target-bits (e.g. 4)")
        free = [n for n in ctx.layers if n not in ctx.pinned]
        if not free:
            raise QcoreError("every quantizable layer is pinned; nothing is left for rdoq to allocate")
        if ctx.quantizer.name not in ("uniform", "deadzone"):
            raise QcoreError(f"rdoq measures its curves on the uniform or the dead-zone grid; --quantizer "
                             f"{ctx.quantizer.name} is not supported with it")
        if ctx.quantizer.name == "deadzone" and o.rate == "entropy":
            raise NotImplementedMethodError("rate=entropy is not implemented for the dead-zone grid; use rate=fixed")
        self._deadzone_ratios(ctx)  # refuse a dead-zone search without its quantizer before any work
        acts = o.budget != "weights"
        if acts and ctx.pipeline.act_targets == "none":
            raise QcoreError(f"budget={o.budget} allocates activation bits, but -o act_targets=none quantizes no "
                             "activation; use budget=weights")
        if acts and ctx.budget.a_bits is None and o.budget == "separate":
            raise QcoreError("budget=separate needs --a-bits (the average activation budget)")
        # the quantizers the calibrator will deploy, which the curves price (or a refusal, before any work)
        dep = deployment(ctx, o.min_bits, acts, ctx.quantizer.name == "deadzone")
        info = ctx.layers
        pin_w = {n: p.w_bits for n, p in ctx.pinned.items() if n in info and p.w_bits is not None}
        pin_a = {n: p.a_bits for n, p in ctx.pinned.items() if n in info and p.a_bits is not None} if acts else {}
        w_total = sum(info[n].weight_numel for n in free) + sum(info[n].weight_numel for n in pin_w)
        a_total = sum(info[n].act_numel for n in free) + sum(info[n].act_numel for n in pin_a)
        w_pinned = sum(info[n].weight_numel * b for n, b in pin_w.items())
        a_pinned = sum(info[n].act_numel * b for n, b in pin_a.items())
        group = o.group or auto_group_size([info[n].out_channels for n in free])
        free_w = sum(info[n].weight_numel for n in free)
        free_a = sum(info[n].act_numel for n in free)
        if o.budget == "joint":
            budget = target * (w_total + a_total) - w_pinned - a_pinned
            floor = free_w * o.min_bits + free_a * o.min_act_bits
        else:
            budget = target * w_total - w_pinned
            floor = free_w * o.min_bits
        if budget < floor:
            per_act = "" if not acts else f", {o.min_act_bits} per activation"
            raise QcoreError(f"impossible bit budget: --target-bits {target} leaves too few bits for the unpinned "
                             f"layers (minimum {o.min_bits} per weight{per_act}); "
                             "raise the target, lower the minimum bits or pin fewer layers (-o first_last=same)")
        ceiling = (free_w + (free_a if o.budget == "joint" else 0)) * o.max_bits
        if budget > ceiling + 1e-6 * max(ceiling, 1.0):  # said before the curves, not found in result.json
            total = w_total + (a_total if o.budget == "joint" else 0)
            log.warning("rdoq: --target-bits %g cannot be used up: with -o max_bits=%d (the highest bit-width a group "
                        "may get) the %s average at most %.2f bits, pinned layers included; raise max_bits (up to 16) "
                        "or lower --target-bits", target, o.max_bits,
                        "weights and activations" if o.budget == "joint" else "weights",
                        (ceiling + target * total - budget) / total)
        device = module_device(ctx.model)  # the engines call the model's parts directly: batches go where it is
        batches = [to_device(b, device) for b in _curve_batches(list(ctx.calibration_batches()), o.curve_samples)]
        first_order = o.engine if o.engine in ("reference", "replay") else "fast"  # activations: first order
        tensors = all(isinstance(b, torch.Tensor) and b.is_floating_point() for b in batches)
        engine = (make_engine(first_order, ctx.model, ctx.task.forward, batches, o.chunk)
                  if o.engine != "second-order" or (acts and not tensors) else None)
        curves, dz_ratio = self.curves(ctx, free, group, batches, engine if o.engine != "second-order" else None,
                                       dep.weights)
        rates = np.array(curves.bits, dtype=np.float64)
        w_sizes = np.array([g.size for g in curves.groups], dtype=np.float64)
        w_rates = self._entropy_rates(ctx, free, group, curves, dep.weights) if o.rate == "entropy" else rates
        a_bits_list = list(range(o.min_act_bits, o.max_bits + 1))
        act_dist = np.zeros((0, len(rates)))
        act_seconds = 0.0
        if acts:
            if o.engine == "second-order" and tensors:
                a_d, act_seconds = second_order_activation_curves(
                    ctx.model, ctx.task.forward, batches, {n: info[n] for n in free}, a_bits_list,
                    dep.acts, seed=ctx.config.seed, projections=o.projections,
                    cache=self._act_cache(ctx, batches, a_bits_list, dep.acts))
                act_engine = "second-order"
            else:
                a_d, act_seconds = activation_curves(
                    ctx.model, ctx.task.forward, batches, {n: info[n] for n in free}, a_bits_list,
                    engine,  # type: ignore[arg-type]  # built above whenever activations are allocated
                    dep.acts, seed=ctx.config.seed)
                act_engine = engine.name if engine is not None else first_order
            act_dist = np.full((len(free), len(rates)), np.inf)
            for j, b in enumerate(a_bits_list):
                act_dist[:, curves.bits.index(b)] = a_d[:, j]
        a_sizes = np.array([info[n].act_numel for n in free], dtype=np.float64)
        lam = lam_a = None
        if o.budget == "joint":
            all_rates = rates if o.rate == "fixed" else np.concatenate(
                [w_rates, np.broadcast_to(rates, act_dist.shape)])
            sol, lam = self._solve(np.concatenate([w_sizes, a_sizes]), np.concatenate([curves.dist, act_dist]),
                                   all_rates, budget)
            w_bits, a_alloc = rates[sol.choice[: len(w_sizes)]], rates[sol.choice[len(w_sizes):]]
            used = sol.total_bits + w_pinned + a_pinned
            if used > target * (w_total + a_total) + 1e-6:
                raise AssertionError(f"allocation uses {used / (w_total + a_total):.4f} bits, above {target}")
        else:
            sol, lam = self._solve(w_sizes, curves.dist, w_rates, budget)
            w_bits = rates[sol.choice]
            used = sol.total_bits + w_pinned
            if used > target * w_total + 1e-6:  # the solvers guarantee this; check rather than trust
                raise AssertionError(f"allocation uses {used / w_total:.4f} bits per weight, above the target {target}")
            a_alloc = None
            if o.budget == "separate":
                a_budget = float(ctx.budget.a_bits) * a_total - a_pinned  # type: ignore[arg-type]
                a_sol, lam_a = self._solve(a_sizes, act_dist, rates, a_budget)
                a_alloc = a_sol.bits
        layers: dict[str, LayerSpec] = {}
        k = 0
        for i, name in enumerate(free):
            n_groups = math.ceil(info[name].out_channels / group)
            wb = [int(b) for b in w_bits[k:k + n_groups]]
            dz = None
            if ctx.quantizer.name == "deadzone":
                dz = ([0.0] * n_groups if dz_ratio is None else
                      [float(dz_ratio[k + j, curves.bits.index(b)]) for j, b in enumerate(wb)])
            k += n_groups
            ab = int(a_alloc[i]) if a_alloc is not None else ctx.budget.a_bits
            layers[name] = LayerSpec(weight=weight_spec(group, wb, info[name].out_channels, dz,
                                                        symmetric=dep.weights.symmetric),
                                     act=layer_spec(ctx.pipeline, None, ab, ctx.quantizer.name).act)
        w_avg = (float((w_sizes * w_bits).sum()) + w_pinned) / w_total
        log.info("rdoq: %d weight groups%s, weights %.3f bits (target %s, budget %s), curves %.1fs (%s)",
                 len(w_sizes), f" + {len(free)} activations" if acts else "", w_avg, target, o.budget,
                 curves.seconds + act_seconds, curves.engine)
        meta = {"allocator": self.name, "engine": curves.engine, "solver": o.solver, "budget": o.budget,
                "group": group, "groups": len(w_sizes), "target_bits": target, "w_bits_avg": w_avg,
                "predicted_distortion": sol.distortion, "solver_used": sol.solver,
                "solver_optimal": sol.optimal, "lower_bound": sol.lower_bound, "gap_to_lower_bound": sol.gap,
                "curve_seconds": round(curves.seconds + act_seconds, 3),
                "curve_samples": o.curve_samples, "candidate_bits": curves.bits,
                "weight_clip": dep.weights.describe(),
                "fallback_layers": sorted(n for n, e in curves.layer_engines.items()
                                          if e not in (curves.engine, "cache")),
                "cached_layers": sorted(n for n, e in curves.layer_engines.items() if e == "cache")}
        if o.engine == "second-order":
            meta["projections"] = o.projections
            if not tensors:  # projected curves: random directions per sample (task.split) or per batch
                meta["directions"] = ctx.task.split_unit if ctx.task.split is not None else "per batch"
        if dz_ratio is not None:
            chosen_dz = dz_ratio[np.arange(len(w_sizes)), sol.choice[: len(w_sizes)]]
            meta["deadzone_ratios"] = len(self._deadzone_ratios(ctx))
            meta["deadzone_groups"] = int((chosen_dz > 0).sum())
        if acts:
            meta["act_clip"] = dep.acts.describe()
            meta["act_engine"] = act_engine
            meta["act_candidate_bits"] = a_bits_list
        if lam is not None:
            meta["lambda"] = lam
        if lam_a is not None:
            meta["lambda_act"] = lam_a
        if o.rate == "entropy":
            chosen = w_rates[np.arange(len(w_sizes)), sol.choice[: len(w_sizes)]]
            rate_avg = (float((w_sizes * chosen).sum()) + w_pinned) / w_total
            meta["w_entropy_avg"] = rate_avg
            ctx.measured["rdoq_rate"] = {
                "weights_bits_per_value": rate_avg, "rate": "entropy",
                "means": "element-weighted entropy of each group's integer codes (an ideal entropy coder's size); "
                         "pinned layers at their fixed width; the fixed-length average is w_bits_avg"}
        if o.plots:
            self._plots(ctx, curves, w_bits, layers)
        return Plan(layers=layers, meta=meta)

    @staticmethod
    def _entropy_rates(ctx: RunContext, free: list[str], group: int, curves: Curves, clip: Clip = WEIGHT_CLIP
                       ) -> np.ndarray:
        """``[groups, bits]`` entropy rates, rows in the curves' group order, of the codes ``clip`` deploys."""
        by_group: dict[tuple[str, int], np.ndarray] = {}
        for n in free:
            ent = group_entropy(ctx.model.get_submodule(n).weight.detach(), ctx.layers[n], group, curves.bits,
                                clip)
            by_group.update({(n, i): row for i, row in enumerate(ent)})
        return np.stack([by_group[(g.layer, g.index)] for g in curves.groups])

    @staticmethod
    def _plots(ctx: RunContext, curves: Curves, w_bits: np.ndarray, layers: dict[str, LayerSpec]) -> None:
        from qcore_rdoq.plots import bits_per_layer_png, rd_curves_png

        per_layer = {n: mean_bits(s.weight, ctx.layers[n].out_channels) for n, s in layers.items()
                     if s.weight is not None}
        pinned = {n: float(p.w_bits) for n, p in ctx.pinned.items() if n in ctx.layers and p.w_bits is not None}
        ordered = {n: per_layer.get(n, pinned.get(n, 0.0)) for n in ctx.layers}
        ctx.artifacts["plots/rd_curves.png"] = rd_curves_png(curves.groups, curves.bits, curves.dist, w_bits)
        ctx.artifacts["plots/bits_per_layer.png"] = bits_per_layer_png(ordered, pinned)


def layer_curves(ctx: RunContext, names: list[str] | tuple[str, ...], bits: list[int] | tuple[int, ...], *,
                 options: RDOQOptions | None = None) -> np.ndarray:
    """RDOQ's distortion of each layer at each bit-width, for other allocators to price bits with.

    ``D[i, k] = sum_g D_g(bits[k])`` over the channel groups ``g`` of layer ``names[i]``: RDOQ's additive model of
    the output distortion (MSE of the task's distortion target against FP, on ``curve_samples`` calibration
    samples) when the whole layer's weight is at ``bits[k]`` and every other layer is FP. The curves are exactly
    those ``qcore run --plugin rdoq`` measures with the same ``options`` (group size, engine, curve samples,
    cache): candidates gridded as the run's calibrator deploys (:func:`qcore_rdoq.deployment.deployment`), one
    scale per group, and read from / written to the same curve cache, so a second caller with the same model,
    data and options measures nothing. ``options`` defaults to :class:`RDOQOptions` (auto group, fast engine,
    64 samples, bits ``min_bits..max_bits`` = 0..10 measured; ``bits`` must lie in that range).

    :param ctx: the run's context (model with BN folded, layers, calibration data, calibrator, quantizer).
    :returns: ``[len(names), len(bits)]`` float64.
    :raises QcoreError: a bit-width outside ``min_bits..max_bits``, a layer unknown to ``ctx``, or a quantizer /
        calibrator combination the curves cannot model (the message says what to use).
    """
    o = options if options is not None else RDOQOptions()
    bad = [b for b in bits if not o.min_bits <= int(b) <= o.max_bits]
    if bad:
        raise QcoreError(f"rdoq curves are measured at {o.min_bits}..{o.max_bits} bits; {bad} is outside (raise "
                         "-o max_bits or choose bit-widths in that range)")
    unknown = [n for n in names if n not in ctx.layers]
    if unknown:
        raise QcoreError(f"rdoq curves: unknown layer(s) {', '.join(unknown[:3])}; pass names of ctx.layers")
    if ctx.quantizer.name != "uniform":
        raise QcoreError(f"rdoq curves price the uniform grid; --quantizer {ctx.quantizer.name} is not modelled "
                         "(use --quantizer uniform)")
    if not names:
        return np.zeros((0, len(bits)))
    alloc = RDOQAllocator(o)
    dep = deployment(ctx, o.min_bits, False, False)
    group = o.group or auto_group_size([ctx.layers[n].out_channels for n in ctx.layers if n not in ctx.pinned])
    device = module_device(ctx.model)
    batches = [to_device(b, device) for b in _curve_batches(list(ctx.calibration_batches()), o.curve_samples)]
    engine = make_engine(o.engine if o.engine in ("reference", "replay") else "fast", ctx.model, ctx.task.forward,
                         batches, o.chunk) if o.engine != "second-order" else None
    curves, _ = alloc.curves(ctx, list(names), group, batches, engine, dep.weights)
    cols = [curves.bits.index(int(b)) for b in bits]
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(names), len(bits)))
    for g, row in zip(curves.groups, curves.dist, strict=True):
        out[index[g.layer]] += row[cols]
    log.info("rdoq: layer curves of %d layers (%d groups, %s engine) in %.1f s", len(names), len(curves.groups),
             curves.engine, curves.seconds)
    return out
