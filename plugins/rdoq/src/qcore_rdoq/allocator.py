"""The ``rdoq`` allocator: measure RD curves of every weight group, then solve for the target average bits.

Budget convention: ``--target-bits`` is the average weight bit-width over *all* quantized weights, pinned
layers (first/last at 8 bits by default) included, so pins are paid for out of the same budget. Activations
are quantized at ``--a-bits`` (uniform) in this version.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from qcore import Allocator, LayerSpec, Plan, RunContext, layer_spec
from qcore.errors import NotImplementedMethodError, QcoreError
from qcore.knapsack import lagrangian_for_budget, solve_dp
from qcore_rdoq.cache import CurveCache, default_cache_root, fingerprint
from qcore_rdoq.curves import Curves, first_order_curves
from qcore_rdoq.groups import weight_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RDOQOptions:
    group: int = field(default=0, metadata={
        "help": "output channels per weight group; 0 = auto (8, or 128 when a layer has >= 512 channels)"})
    engine: Literal["fast", "reference", "second-order"] = field(default="fast", metadata={
        "help": "RD curves: fast (cached, downstream only, batched), reference (rerun the whole model), "
                "second-order (Gauss-Newton estimate from per-sample Jacobians, no pass per candidate)"})
    solver: Literal["dp", "lagrangian"] = field(default="dp", metadata={
        "help": "dp: exact dynamic programming; lagrangian: bisection on lambda over the curves"})
    min_bits: int = field(default=0, metadata={"help": "lowest bit-width a group may get (0 = pruned)"})
    max_bits: int = field(default=10, metadata={"help": "highest candidate bit-width"})
    curve_samples: int = field(default=64, metadata={"help": "calibration samples used for the RD curves"})
    chunk: int = field(default=0, metadata={
        "help": "candidates per batched pass (fast engine); 0 = auto (about 256 samples a pass on CPU, 16k on GPU)"})
    resolution: float = field(default=1e-3, metadata={"help": "DP budget grid, in bits of average bit-width"})
    cache: str = field(default="auto", metadata={
        "help": "RD curve cache: 'auto' ($QCORE_CACHE_DIR or ~/.cache/qcore/rdoq), 'off', or a folder"})

    def __post_init__(self) -> None:
        if not 0 <= self.min_bits <= self.max_bits <= 16:
            raise QcoreError(f"need 0 <= min_bits <= max_bits <= 16, got {self.min_bits}, {self.max_bits}")
        if self.group < 0 or self.curve_samples < 1 or self.chunk < 0 or self.resolution <= 0:
            raise QcoreError("group and chunk must be >= 0, curve_samples >= 1, resolution > 0")


def auto_group_size(out_channels: list[int]) -> int:
    """Channels per group when the user gave none: 128 (the seed's choice) for large models, else 8."""
    return 128 if max(out_channels) >= 512 else 8


def _curve_batches(batches: list[Any], samples: int) -> list[Any]:
    out, n = [], 0
    for b in batches:
        if n >= samples:
            break
        size = int(b.shape[0]) if hasattr(b, "shape") else 1
        if hasattr(b, "shape") and n + size > samples:
            b = b[: samples - n]
            size = samples - n
        out.append(b)
        n += size
    return out


class RDOQAllocator(Allocator):
    """Rate-distortion optimal bits per output-channel group of every layer's weight."""

    name = "rdoq"
    description = "RD curves per weight channel group (first order) + DP or Lagrangian solver to --target-bits"
    Options = RDOQOptions

    def curves(self, ctx: RunContext, free: list[str], group: int) -> Curves:
        o = self.options
        batches = _curve_batches(list(ctx.calibration_batches()), o.curve_samples)
        bits = list(range(o.min_bits, o.max_bits + 1))
        corr = ctx.pipeline.weight_correction  # curves see the weights exactly as deployment corrects them
        cache = None
        if o.cache != "off":
            root = default_cache_root() if o.cache == "auto" else Path(o.cache)
            key = fingerprint(ctx.model, batches, {"engine": o.engine, "group": group, "bits": bits,
                                                   "weight_range": "mse", "correction": corr, "version": 1})
            cache = CurveCache(root, key)
        if o.engine == "second-order":
            from qcore_rdoq.second_order import second_order_curves

            if not all(isinstance(b, torch.Tensor) for b in batches):
                raise NotImplementedMethodError("rdoq engine 'second-order' needs tensor batches (classification-"
                                                "style tasks); use engine=fast or engine=reference")
            return second_order_curves(ctx.model, batches, {n: ctx.layers[n] for n in free}, group, bits,
                                       cache=cache, correction=corr)
        return first_order_curves(ctx.model, ctx.task.forward, batches, {n: ctx.layers[n] for n in free}, group,
                                  bits, o.engine, o.chunk, cache=cache, correction=corr)

    def allocate(self, ctx: RunContext) -> Plan:
        o = self.options
        target = ctx.budget.target_bits
        if target is None:
            raise QcoreError("rdoq needs an average bit budget: pass --target-bits (e.g. 4)")
        free = [n for n in ctx.layers if n not in ctx.pinned]
        pinned_w = {n: p.w_bits for n, p in ctx.pinned.items() if n in ctx.layers and p.w_bits is not None}
        if not free:
            raise QcoreError("every quantizable layer is pinned; nothing is left for rdoq to allocate")
        total = sum(ctx.layers[n].weight_numel for n in free) + sum(ctx.layers[n].weight_numel for n in pinned_w)
        budget = target * total - sum(ctx.layers[n].weight_numel * b for n, b in pinned_w.items())
        group = o.group or auto_group_size([ctx.layers[n].out_channels for n in free])
        free_weights = sum(ctx.layers[n].weight_numel for n in free)
        if budget < free_weights * o.min_bits:
            raise QcoreError(f"impossible bit budget: --target-bits {target} leaves {budget / free_weights:.2f} bits "
                             f"per weight for the unpinned layers, below min_bits={o.min_bits}; raise the target, "
                             "lower min_bits or pin fewer layers (-o first_last=same)")
        curves = self.curves(ctx, free, group)
        sizes = np.array([g.size for g in curves.groups], dtype=np.float64)
        rates = np.array(curves.bits, dtype=np.float64)
        lam = None
        if o.solver == "dp":
            sol = solve_dp(sizes, curves.dist, rates, budget, resolution=o.resolution)
        else:
            sol, lam = lagrangian_for_budget(sizes, curves.dist, rates, budget)
        used = sol.total_bits + sum(ctx.layers[n].weight_numel * b for n, b in pinned_w.items())
        if used > target * total + 1e-6:  # the solvers guarantee this; check rather than trust
            raise AssertionError(f"allocation uses {used / total:.4f} bits per weight, above the target {target}")
        layers: dict[str, LayerSpec] = {}
        a_bits = ctx.budget.a_bits
        k = 0
        for name in free:
            n_groups = math.ceil(ctx.layers[name].out_channels / group)
            bits = [int(b) for b in sol.bits[k:k + n_groups]]
            k += n_groups
            act = layer_spec(ctx.pipeline, None, a_bits).act
            layers[name] = LayerSpec(weight=weight_spec(group, bits, ctx.layers[name].out_channels), act=act)
        log.info("rdoq: %d groups, %.3f bits per weight (target %s), predicted distortion %.3g, curves %.1fs (%s)",
                 len(sizes), used / total, target, sol.distortion, curves.seconds, curves.engine)
        meta = {"allocator": self.name, "engine": curves.engine, "solver": o.solver, "group": group,
                "groups": len(sizes), "target_bits": target, "w_bits_avg": used / total,
                "predicted_distortion": sol.distortion, "curve_seconds": round(curves.seconds, 3),
                "curve_samples": o.curve_samples, "candidate_bits": curves.bits,
                "fallback_layers": sorted(n for n, e in curves.layer_engines.items() if e not in (curves.engine, "cache")),
                "cached_layers": sorted(n for n, e in curves.layer_engines.items() if e == "cache")}
        if lam is not None:
            meta["lambda"] = lam
        return Plan(layers=layers, meta=meta)
