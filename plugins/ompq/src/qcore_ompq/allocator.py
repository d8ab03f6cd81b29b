"""The ``ompq`` allocator: weight bits per layer from layer orthogonality (or a baseline criterion), solved exactly
as an integer program under a size budget and an optional BOPs budget.

Budgets (all may be combined; the solve satisfies every one given):

* ``--target-bits T``: qcore's convention, the element-weighted mean weight bits over all quantized layers,
  pinned layers included (pins are paid first; ``budget_convention = "pins_included"``);
* ``-o size_mb=X``: the model size in MiB as result.json reports it (:func:`qcore.plan_cost`: weights at their
  bits, scales and zero points, biases and everything else at 32 bits);
* ``-o bops_g=Y``: giga bit-operations per sample as result.json reports them (``sum MACs x w_bits x a_bits``).

``-o act_bits=search`` also chooses one per-tensor input bit-width per free layer from ``-o act_choices``, in the
same exact program (:func:`qcore_ompq.solve_joint`), under the BOPs budget: ``-o bops_g`` when given, else the BOPs
of the uniform plan at ``--target-bits`` weight bits and ``--a-bits`` input bits on every free layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

import qcore
from qcore_ompq.activations import InputErrors, input_errors
from qcore_ompq.orthogonality import (
    Orthogonality,
    downstream_mean,
    flat_features,
    importance,
    layer_features,
    orthogonality,
)
from qcore_ompq.seed import seed_report
from qcore_ompq.sensitivity import hessian_traces, objective_matrix, plan_distortion, plan_of, weight_errors
from qcore_ompq.solve import Solution, solve_ilp, solve_joint, solve_seed

log = logging.getLogger(__name__)

MIB = 2**20


@dataclass(frozen=True)
class OMPQOptions:
    """``-o`` options of the ``ompq`` allocator."""

    criterion: Literal["orm", "size", "hawq", "rdoq", "uniform"] = field(default="orm", metadata={
        "help": "what decides the bits: orm (OMPQ's orthogonality importance), size (every layer equally "
                "important: the size structure alone), hawq (Hessian trace x weight error), rdoq (RDOQ's RD curves "
                "summed per layer; needs qcore-rdoq), uniform (one bit-width for all free layers, the largest that "
                "fits)"})
    objective: Literal["error", "linear"] = field(default="error", metadata={
        "help": "orm/size: error = minimise sum importance x relative weight error at the chosen bits; linear = "
                "the seed's maximise sum importance x bits (optimum at the extreme bit-widths)"})
    ompq_beta: float | None = field(default=None, metadata={
        "help": "beta of theta = exp(-beta gamma), the seed's --beta (its CLI default is 1); unset: chosen on "
                "calibration data from -o beta_grid"})
    beta_grid: tuple[float, ...] = field(default=(0.0, 0.1, 0.3, 1.0, 3.0), metadata={
        "help": "orm, ompq_beta unset: the betas tried; each one's plan is solved, then scored by the output KL of "
                "the simulated model (nearest rounding, no reconstruction) on held-out calibration samples, and "
                "the best is kept (0 = every layer equally important, the seed's MobileNetV2 setting)"})
    score_samples: int = field(default=128, metadata={
        "help": "orm, beta search: calibration samples that score the plans (batches after the ORM batch)"})
    score_acts: Literal["fp", "run"] = field(default="fp", metadata={
        "help": "orm, beta search: the plans' inputs while scoring: fp = floating point (weights-only KL: the "
                "activation noise, the same for every plan, cannot mask the weight error), run = quantized at "
                "their activation bits"})
    bit_choices: tuple[int, ...] = field(default=(2, 3, 4, 5, 6, 7, 8), metadata={
        "help": "weight bit-widths a free layer may take (comma list)"})
    size_mb: float | None = field(default=None, metadata={
        "help": "model-size budget in MiB as result.json's size_mb counts it (with --target-bits if given)"})
    bops_g: float | None = field(default=None, metadata={
        "help": "BOPs budget in G per sample as result.json's bops counts it"})
    solver: Literal["milp", "seed"] = field(default="milp", metadata={
        "help": "milp: exact integer program (scipy HiGHS); seed: the seed's SLSQP + floor/ceil DFS on the "
                "linear objective (for comparison; size budget only)"})
    orm_samples: int = field(default=32, metadata={"help": "samples of the one calibration batch used (seed: 32)"})
    orm_features: Literal["layer", "block"] = field(default="layer", metadata={
        "help": "layer: each layer's own output; block: the seed's convention, a block's last layer and its "
                "downsample represented by the block output (after the residual add)"})
    rdoq_samples: int = field(default=64, metadata={
        "help": "rdoq: calibration samples of the RD curves (qcore-rdoq's curve_samples)"})
    rdoq_cache: str = field(default="auto", metadata={
        "help": "rdoq: RD curve cache, shared with qcore run --plugin rdoq: 'auto', 'off', or a folder"})
    hawq_probes: int = field(default=4, metadata={"help": "hawq: Hutchinson probes per batch"})
    hawq_batches: int = field(default=2, metadata={"help": "hawq: calibration batches for the Hessian traces"})
    convention: Literal["qcore", "seed"] = field(default="qcore", metadata={
        "help": "seed: also report the plan's size and BOPs in the seed's conventions (measured.ompq.seed)"})
    plots: bool = field(default=False, metadata={"help": "write plots/ompq_orm.png (needs matplotlib)"})
    act_bits: Literal["uniform", "search"] = field(default="uniform", metadata={
        "help": "uniform: every free layer's input at --a-bits; search: one per-tensor input bit-width per free "
                "layer from -o act_choices, chosen jointly with the weight bits under the BOPs budget (-o bops_g, "
                "else the BOPs of uniform --target-bits weights and --a-bits inputs)"})
    act_choices: tuple[int, ...] = field(default=(4, 5, 6, 7, 8), metadata={
        "help": "act_bits=search: input bit-widths a free layer may take (comma list)"})

    def __post_init__(self) -> None:
        if not self.bit_choices or any(not 1 <= b <= qcore.MAX_BITS for b in self.bit_choices):
            raise qcore.QcoreError(f"bit_choices={self.bit_choices} must be bit-widths in 1..{qcore.MAX_BITS}, "
                                   "e.g. -o bit_choices=2,3,4,5,6,7,8")
        if self.ompq_beta is not None and (self.ompq_beta < 0 or not math.isfinite(self.ompq_beta)):
            raise qcore.QcoreError(f"ompq_beta={self.ompq_beta} must be a finite number >= 0")
        if not self.beta_grid or any(b < 0 or not math.isfinite(b) for b in self.beta_grid):
            raise qcore.QcoreError(f"beta_grid={self.beta_grid} must list finite betas >= 0, e.g. "
                                   "-o beta_grid=0,0.1,0.3,1,3")
        if self.score_samples < 1:
            raise qcore.QcoreError(f"score_samples={self.score_samples} must be at least 1")
        for key in ("size_mb", "bops_g"):
            v = getattr(self, key)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise qcore.QcoreError(f"{key}={v} must be a positive number")
        if self.orm_samples < 2:
            raise qcore.QcoreError(f"orm_samples={self.orm_samples} must be at least 2")
        if self.rdoq_samples < 1:
            raise qcore.QcoreError(f"rdoq_samples={self.rdoq_samples} must be at least 1")
        if self.hawq_probes < 1 or self.hawq_batches < 1:
            raise qcore.QcoreError("hawq_probes and hawq_batches must be at least 1")
        if not self.act_choices or any(not 1 <= b <= qcore.MAX_BITS for b in self.act_choices):
            raise qcore.QcoreError(f"act_choices={self.act_choices} must be bit-widths in 1..{qcore.MAX_BITS}, "
                                   "e.g. -o act_choices=4,5,6,7,8")
        if self.act_bits == "search":
            why = ("-o criterion=uniform" if self.criterion == "uniform" else "-o solver=seed" if self.solver == "seed"
                   else "-o objective=linear" if self.objective == "linear" and self.criterion in ("orm", "size")
                   else None)
            if why is not None:
                raise qcore.QcoreError(f"-o act_bits=search is not implemented with {why} (it prices activation "
                                       "bits against the weight error terms of the exact ILP): drop one of them")


def rdoq_curve_sums(ctx: qcore.RunContext, names: list[str], choices: list[int], samples: int = 64,
                    cache: str = "auto") -> np.ndarray:
    """``[layers, choices]`` RDOQ curve sums (:func:`qcore_rdoq.layer_curves`: the output distortion of each layer
    at each bit-width, summed over its channel groups), the curves and cache of ``qcore run --plugin rdoq``."""
    try:
        from qcore_rdoq import RDOQOptions, layer_curves
    except ImportError as exc:
        raise qcore.QcoreError("-o criterion=rdoq needs the qcore-rdoq plugin: pip install qcore-rdoq (or "
                               "pip install 'qcore-ompq[rdoq]')") from exc
    return layer_curves(ctx, names, choices, options=RDOQOptions(curve_samples=samples, cache=cache,
                                                                 max_bits=max(10, max(choices))))


def block_outputs(model: Any, names: list[str]) -> dict[str, str]:
    """The seed's block-output convention: within each recognised block (qcore_recon's block types), the last
    quantized layer in module order and any downsample/shortcut layer are represented by the block's output."""
    from qcore_recon import is_block

    out: dict[str, str] = {}
    modules = dict(model.named_modules())
    for block_name, module in modules.items():
        if not block_name or not is_block(module):
            continue
        inside = [n for n in names if n.startswith(block_name + ".")]
        if not inside:
            continue
        own = [n for n in inside if ".downsample" not in n[len(block_name):] and ".shortcut" not in n[len(block_name):]]
        for n in inside:
            if n not in own or (own and n == own[-1]):
                out[n] = block_name
    return out


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1


def _take_samples(batches: list[Any], samples: int) -> list[Any]:
    """Whole batches from the front until at least ``samples`` samples are taken."""
    out: list[Any] = []
    n = 0
    for b in batches:
        if n >= samples:
            break
        out.append(b)
        n += _batch_len(b)
    return out


class OMPQAllocator(qcore.Allocator):
    """OMPQ: linear CKA between the layers' outputs on one calibration batch gives each layer an importance
    ``theta = exp(-beta gamma)`` (``gamma``: its summed similarity to the other layers, normalised so the largest
    theta is 1); one bit-width per free layer is then chosen exactly (``scipy.optimize.milp``) under the size
    budget (``--target-bits`` or ``-o size_mb``) and optionally ``-o bops_g``. Activations get ``--a-bits``.
    Unless ``-o ompq_beta`` fixes it, beta is chosen on calibration data: each ``-o beta_grid`` beta's plan is
    scored by :func:`qcore_ompq.plan_distortion` on the batches after the ORM batch and the lowest is kept.
    ``-o criterion`` swaps the importance for a baseline through the same solve."""

    name = "ompq"
    description = ("OMPQ: layer orthogonality (linear CKA) importance, exact ILP bits per layer under size/BOPs "
                   "budgets (-o criterion=size|hawq|uniform for baselines)")
    Options = OMPQOptions
    budget_convention = "pins_included"

    def allocate(self, ctx: qcore.RunContext) -> qcore.Plan:
        o = self.options
        budget = ctx.budget
        target = budget.target_bits if budget.target_bits is not None else (
            float(budget.w_bits) if budget.w_bits is not None and o.size_mb is None and o.bops_g is None else None)
        if target is None and o.size_mb is None and o.bops_g is None:
            raise qcore.QcoreError("ompq needs a budget: pass --target-bits (e.g. 4), -o size_mb=X or -o bops_g=Y")
        a_bits = budget.a_bits
        choices = sorted(set(int(b) for b in o.bit_choices))
        t0 = time.perf_counter()

        free = [n for n in ctx.layers if n not in ctx.pinned]
        pins = {n: p for n, p in ctx.pinned.items() if n in ctx.layers}
        sizes = [ctx.layers[n].weight_numel for n in free]

        # budgets, as weight bits (and BOPs) the free layers may spend. --target-bits counts elements only (core's
        # check_budget); -o size_mb counts what result.json's size_mb counts, the quantizer's extra storage
        # (Quantizer.extra_bits: a lattice basis, a codebook) included, per layer and bit-width.
        extra_fn = getattr(ctx.quantizer, "extra_bits", None)
        cap: float = math.inf
        if target is not None:
            pinned_q = {n: p.w_bits for n, p in pins.items() if p.w_bits is not None}
            total = sum(sizes) + sum(ctx.layers[n].weight_numel for n in pinned_q)
            cap = math.floor(target * total - sum(ctx.layers[n].weight_numel * b for n, b in pinned_q.items())
                             + 1e-6)
        low = min(choices)
        base = qcore.plan_cost(ctx.model, ctx.layers, plan_of(ctx, {n: low for n in free}, a_bits), extra_fn)
        extra: np.ndarray | None = None
        storage_cap: float | None = None
        if o.size_mb is not None:
            extra = self._extra_bits(ctx, free, choices, extra_fn)
            storage_cap = math.floor((o.size_mb - base.size_mb) * 8 * MIB + low * sum(sizes)
                                     + float(extra[:, 0].sum()) + 1e-6)
        search = o.act_bits == "search"
        a_choices = sorted(set(int(b) for b in o.act_choices))
        raw_macs = [float(ctx.layers[n].macs) for n in free]
        bops_cap = None
        bops_total: float | None = None  # the BOPs budget of the whole model (G x 1e9), when there is one
        if search:
            amin = min(a_choices)
            fixed_bops = qcore.plan_cost(ctx.model, ctx.layers, plan_of(ctx, {n: low for n in free}, amin),
                                         extra_fn).bops - sum(m * low * amin for m in raw_macs)
            if o.bops_g is not None:
                bops_total = o.bops_g * 1e9
            elif target is not None and a_bits is not None:  # uniform --target-bits weights, --a-bits inputs
                bops_total = fixed_bops + sum(m * target * a_bits for m in raw_macs)
            else:
                raise qcore.QcoreError("-o act_bits=search needs a BOPs budget: pass -o bops_g=Y, or --target-bits "
                                       "and --a-bits (the budget is then their uniform plan's BOPs)")
            bops_cap = bops_total - fixed_bops
        macs = None
        if o.bops_g is not None and not search:
            bops_total = o.bops_g * 1e9
            act = float(a_bits) if a_bits is not None else 32.0
            macs = [ctx.layers[n].macs * act for n in free]
            fixed_bops = base.bops - sum(m * low for m in macs)
            bops_cap = o.bops_g * 1e9 - fixed_bops
        if cap is math.inf:  # size_mb and/or BOPs only: the element count does not bind
            cap = max(choices) * sum(sizes)

        orm: Orthogonality | None = None
        orm_in: Orthogonality | None = None
        act_err: InputErrors | None = None
        info: dict[str, Any] = {"criterion": o.criterion, "bit_choices": choices, "free_layers": len(free)}
        sol: Solution

        def solve_dist(dist: np.ndarray, act_scale: np.ndarray | None = None) -> Solution:
            """The exact solve of weight distortions ``dist``; with the activation search, jointly with each
            layer's input bits at ``act_scale_i x`` (output error at each input bit-width / output error at the
            fewest weight bits); ``act_scale`` defaults to the weight term at the fewest bits, ``dist[:, 0]``."""
            if not search:
                return solve_ilp(sizes, dist, choices, cap, macs=macs, bops_budget=bops_cap, extra=extra,
                                 storage_budget=storage_cap)
            assert act_err is not None and bops_cap is not None
            scale = np.asarray(dist[:, 0] if act_scale is None else act_scale, dtype=np.float64)
            return solve_joint(sizes, dist, scale[:, None] * act_err.ratio(), choices, a_choices, cap, raw_macs,
                               bops_cap, extra=extra, storage_budget=storage_cap)

        raw_inputs: dict[str, torch.Tensor] | None = None
        if search and free:  # each layer's input, captured once: its errors here, its orthogonality below
            batch = next(iter(ctx.calibration_batches()))
            raw_inputs = layer_features(ctx.model, free, batch, ctx.task.forward, layers=ctx.layers,
                                        samples=o.orm_samples, inputs=True, flatten=False)
            act_err = input_errors(ctx, free, a_choices, low, batch, inputs=raw_inputs)
        if o.criterion == "uniform":
            sol = self._uniform(free, sizes, choices, cap, macs, bops_cap, extra, storage_cap)
        else:
            weight = np.ones(len(free))
            betas = [o.ompq_beta] if o.ompq_beta is not None else sorted(set(float(b) for b in o.beta_grid))
            if o.criterion == "orm" and free:
                batch = next(iter(ctx.calibration_batches()))
                outputs = block_outputs(ctx.model, free) if o.orm_features == "block" else None
                orm = orthogonality(ctx.model, free, batch, ctx.task.forward, betas[0], layers=ctx.layers,
                                    samples=o.orm_samples, outputs=outputs)
                if raw_inputs is not None:  # the inputs' own orthogonality prices the activation bits
                    orm_in = orthogonality(ctx.model, free, batch, ctx.task.forward, betas[0],
                                           features={n: flat_features(t) for n, t in raw_inputs.items()})
            errors = None
            if o.solver != "seed" and (o.criterion == "hawq" or (o.objective == "error" and o.criterion != "rdoq")):
                errors = weight_errors(ctx, free, choices)

            def solve_with(weight: np.ndarray, act_weight: np.ndarray | None = None) -> Solution:
                if o.solver == "seed":
                    if o.bops_g is not None:
                        raise qcore.QcoreError("-o solver=seed handles the size budget only; drop -o bops_g or use "
                                               "-o solver=milp")
                    seed_cap = cap
                    if storage_cap is not None and extra is not None:  # the seed's solve knows elements only:
                        seed_cap = min(cap, storage_cap - float(extra.max(axis=1).sum()))  # reserve the most extra
                    return solve_seed(sizes, weight, min(choices), max(choices), seed_cap)
                if o.objective == "error":
                    assert errors is not None
                    dist = objective_matrix("error", errors, sizes, choices, weight=weight)
                else:
                    dist = objective_matrix("linear", np.zeros((len(free), len(choices))), sizes, choices,
                                            weight=weight)
                return solve_dist(dist, act_weight)

            if o.solver == "seed" and orm is None:  # the seed's solve on the criterion's weights (all ones)
                sol = solve_with(weight)
            elif o.criterion == "rdoq":
                dist = rdoq_curve_sums(ctx, free, choices, o.rdoq_samples, o.rdoq_cache)
                info["rdoq_curve_sums"] = {n: dict(zip(map(str, choices), map(float, row), strict=True))
                                           for n, row in zip(free, dist, strict=True)}
                sol = solve_dist(dist)
            elif o.criterion == "hawq":
                assert errors is not None
                batches = list(ctx.calibration_batches())[:o.hawq_batches]
                traces = hessian_traces(ctx.model, free, batches, ctx.task.forward, o.hawq_probes,
                                        seed=ctx.config.seed)
                info["hessian_trace"] = traces
                dist = objective_matrix("hawq", errors, sizes, choices, traces=traces, names=free)
                sol = solve_dist(dist)
            elif orm is not None:
                sols = []
                for beta in betas:
                    _, theta = importance(orm.matrix, beta)
                    act_weight = downstream_mean(importance(orm_in.matrix, beta)[1]) if orm_in is not None else None
                    sols.append((beta, theta, solve_with(downstream_mean(theta), act_weight)))
                k = 0
                if len(sols) > 1:
                    acts = o.score_acts
                    if search and acts == "fp":
                        log.info("ompq: act_bits=search: the beta search scores plans with their inputs quantized "
                                 "(score_acts=run), since the plans differ in activation bits")
                        acts = "run"
                    k, info["beta_search"] = self._choose_beta(ctx, free, sols, o.score_samples, acts)
                beta, theta, sol = sols[k]
                orm = dataclasses.replace(orm, theta=theta, beta=beta)
                weight = downstream_mean(theta)
                log.info("ompq: %d layers, gamma %.3f..%.3f, theta %.3g..1 (beta %g%s)", len(free),
                         orm.gamma.min(), orm.gamma.max(), orm.theta.min(), beta,
                         "" if len(sols) == 1 else ", chosen on calibration data")
                info["beta"] = beta
                info["orthogonality"] = orm.to_dict()
                info["omega"] = {n: float(w) for n, w in zip(free, weight, strict=True)}
                if orm_in is not None:
                    _, theta_in = importance(orm_in.matrix, beta)
                    info["input_orthogonality"] = dataclasses.replace(orm_in, theta=theta_in, beta=beta).to_dict()
            else:
                sol = solve_with(weight)
        seconds = time.perf_counter() - t0
        bits = dict(zip(free, sol.bits, strict=True))
        act_plan = dict(zip(free, sol.a_bits, strict=True)) if search and sol.a_bits is not None else None
        plan = plan_of(ctx, bits, act_plan if act_plan is not None else a_bits)
        cost = qcore.plan_cost(ctx.model, ctx.layers, plan, extra_fn)
        if o.size_mb is not None and cost.size_mb > o.size_mb * (1 + 1e-12):
            raise qcore.QcoreError(f"ompq: internal error, plan size {cost.size_mb:.6f} MiB over -o size_mb="
                                   f"{o.size_mb}; please report the command")
        if bops_total is not None and cost.bops > bops_total * (1 + 1e-9):
            raise qcore.QcoreError(f"ompq: internal error, plan BOPs {cost.bops / 1e9:.6f} G over the budget "
                                   f"{bops_total / 1e9:.6f} G; please report the command")
        if search:
            assert act_err is not None or not free
            info["act_search"] = {
                "choices": a_choices, "bits": act_plan or {}, "a_bits_avg": cost.a_bits_avg,
                "bops_g_budget": (bops_total or 0.0) / 1e9,
                "budget_from": "-o bops_g" if o.bops_g is not None else
                f"uniform plan: free layers at --target-bits {target} weight and --a-bits {a_bits} input bits",
                "error_ratio": {n: dict(zip(map(str, a_choices), map(float, row), strict=True))
                                for n, row in zip(free, act_err.ratio(), strict=True)} if act_err else {},
                "ratio": "layer output squared error with the input at b bits (weights FP) / with the weights at "
                         f"{low} bits (input FP), on {act_err.samples if act_err else 0} calibration samples"}
        info.update(bits=bits, solver=sol.solver, objective=o.objective if o.criterion in ("orm", "size") else
                    o.criterion, objective_value=sol.objective, search_seconds=round(seconds, 3),
                    target_bits=target, size_mb_budget=o.size_mb, bops_g_budget=o.bops_g,
                    size_mb=cost.size_mb, bops_g=cost.bops / 1e9, w_bits_avg=cost.w_bits_avg,
                    conventions="size_mb and bops_g as result.json counts them (qcore.plan_cost); pinned layers "
                                "at their pins, activations at --a-bits" + (" (free layers: measured.ompq."
                                                                           "act_search.bits)" if search else ""),
                    act_bits=o.act_bits)
        if o.convention == "seed":
            all_bits = {**{n: p.w_bits for n, p in pins.items() if p.w_bits is not None}, **bits}
            info["seed"] = seed_report(ctx.layers, all_bits, a_bits)
        ctx.measured["ompq"] = info
        if o.plots and orm is not None:
            from qcore_ompq.plots import orm_png
            ctx.artifacts["plots/ompq_orm.png"] = orm_png(orm, bits)
        log.info("ompq (%s, %s): %.3f mean weight bits, %.4f MiB, %.3f G BOPs, solved in %.2f s", o.criterion,
                 sol.solver, cost.w_bits_avg or 0.0, cost.size_mb, cost.bops / 1e9, seconds)
        meta = {"allocator": self.name, "criterion": o.criterion, "bits": bits, "solver": sol.solver,
                "target_bits": target}
        if act_plan is not None:
            meta["a_bits"] = act_plan
        return dataclasses.replace(plan, meta=meta)

    @staticmethod
    def _choose_beta(ctx: qcore.RunContext, free: list[str], sols: list[tuple[float, np.ndarray, Solution]],
                     samples: int, acts: str = "run") -> tuple[int, dict[str, Any]]:
        """Score each beta's plan by :func:`plan_distortion` on calibration batches after the first (the ORM
        batch), up to ``samples`` samples; return the index of the lowest score (the smaller beta on a tie) and
        the record for ``measured.ompq.beta_search``."""
        batches = list(ctx.calibration_batches())
        held = _take_samples(batches[1:], samples)
        held_out = bool(held)
        if not held:  # one calibration batch only: score on the ORM batch itself
            held = _take_samples(batches[:1], samples)
        plans: list[dict[str, int]] = []
        act_plans: list[dict[str, int]] = []
        index: list[int] = []
        joint = any(sol.a_bits is not None for _, _, sol in sols)
        keys: list[tuple[dict[str, int], dict[str, int]]] = []
        for _, _, sol in sols:
            bits = dict(zip(free, (int(b) for b in sol.bits), strict=True))
            abits = dict(zip(free, (int(b) for b in sol.a_bits or []), strict=True)) if joint else {}
            if (bits, abits) not in keys:
                keys.append((bits, abits))
                plans.append(bits)
                act_plans.append(abits)
            index.append(keys.index((bits, abits)))
        scores = plan_distortion(ctx, plans, held, activations=acts, act_plans=act_plans if joint else None)
        per_beta = [scores[i] for i in index]
        best = min(range(len(sols)), key=lambda j: (per_beta[j], sols[j][0]))
        n = sum(_batch_len(b) for b in held)
        log.info("ompq: beta %s scored %s (output KL, %d %s calibration samples); chosen beta %g",
                 [s[0] for s in sols], [f"{v:.4g}" for v in per_beta], n, "held-out" if held_out else "ORM-batch",
                 sols[best][0])
        return best, {
            "grid": [float(s[0]) for s in sols], "scores": per_beta, "chosen": float(sols[best][0]),
            "distinct_plans": len(plans), "samples": n, "held_out": held_out,
            "bits": {str(s[0]): plans[i] for s, i in zip(sols, index, strict=True)},
            "activations": acts,
            **({"a_bits": {str(s[0]): act_plans[i] for s, i in zip(sols, index, strict=True)}} if joint else {}),
            "score": "KL(FP || simulated) of the outputs (batch mean; half squared error for non-logit outputs): "
                     "the plan applied and calibrated as qcore run does (qcore.apply_plan, -o equalize, the run's "
                     "range estimators on the scored samples) with nearest rounding and no reconstruction; "
                     + ("inputs at their activation bits" if acts == "run" else
                        "inputs in floating point (weights-only)")}

    @staticmethod
    def _extra_bits(ctx: qcore.RunContext, free: list[str], choices: list[int], extra_fn: Any) -> np.ndarray:
        """``[free layers, choices]`` bits the quantizer stores beyond elements and scales (rounded up to whole
        bits, so budgets checked on them are never exceeded); zeros when the quantizer declares none."""
        out = np.zeros((len(free), len(choices)), dtype=np.int64)
        if extra_fn is None:
            return out
        for i, n in enumerate(free):
            info = ctx.layers[n]
            if not info.weight_numel:
                continue
            for k, b in enumerate(choices):
                spec = qcore.layer_spec(ctx.pipeline, b, None, ctx.quantizer.name).weight
                if spec is not None:
                    out[i, k] = math.ceil(float(extra_fn(spec, "weight", info)))
        return out

    @staticmethod
    def _uniform(free: list[str], sizes: list[int], choices: list[int], cap: float, macs: list[float] | None,
                 bops_cap: float | None, extra: np.ndarray | None = None,
                 storage_cap: float | None = None) -> Solution:
        for k in sorted(range(len(choices)), key=lambda j: -choices[j]):
            b = choices[k]
            size = b * sum(sizes)
            bops = b * sum(macs) if macs is not None else 0.0
            stored = size + (int(extra[:, k].sum()) if extra is not None else 0)
            if size <= cap and (bops_cap is None or bops <= bops_cap * (1 + 1e-12)) and (
                    storage_cap is None or stored <= storage_cap):
                return Solution([b] * len(free), 0.0, size, bops, "uniform (largest bit-width that fits)")
        raise qcore.QcoreError(f"ompq: no single bit-width in {choices} fits the budget for every free layer; raise "
                               "the budget or add lower -o bit_choices")
