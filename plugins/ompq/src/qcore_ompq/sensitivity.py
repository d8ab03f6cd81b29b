"""Per-layer quantities the allocator's objectives are built from.

* :func:`weight_errors`: ``||Q_b(W) - W||^2`` of each layer at each bit-width on the run's own quantizer, its
  ranges set by the run's calibrator's weight estimator (through the :class:`qcore.FakeQuantizer` protocol).
* :func:`hessian_traces`: HAWQ-style ``Tr(H_i)`` per layer by Hutchinson's estimator (Rademacher probes,
  Hessian-vector products by double back-propagation) of the distortion loss against the FP model's own output:
  KL(FP softmax || softmax) for 2-D outputs (logits), half the squared error otherwise. At the FP point this
  Hessian is the Gauss-Newton / Fisher matrix, so it is positive semi-definite and needs no labels.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import qcore
from qcore.ranges import RangeFn

log = logging.getLogger(__name__)


def range_calibrator(ctx: qcore.RunContext) -> qcore.RangeCalibrator:
    """The range calibrator whose estimators model the run's deployment: the run's calibrator when it is a
    :class:`qcore.RangeCalibrator` (its weight/activation estimators and options, e.g. QDrop's MSE weight ranges,
    without its reconstruction), else core's min/max one."""
    cal = ctx.calibrator
    return cal if isinstance(cal, qcore.RangeCalibrator) else qcore.RangeCalibrator()


def weight_estimator(ctx: qcore.RunContext) -> RangeFn:
    """The weight clip-range estimator the run's calibrator will start from (:func:`range_calibrator`'s)."""
    return range_calibrator(ctx).weight_estimator()


def quantized_weight(ctx: qcore.RunContext, name: str, bits: int, estimator: RangeFn | None = None) -> Tensor:
    """Layer ``name``'s weight fake-quantized at ``bits`` with nearest rounding on the run's quantizer, its ranges
    from the run's calibrator's weight estimator (through the :class:`qcore.FakeQuantizer` protocol)."""
    est = estimator if estimator is not None else weight_estimator(ctx)
    weight = ctx.model.get_submodule(name).weight.detach()
    spec = qcore.layer_spec(ctx.pipeline, int(bits), None, ctx.quantizer.name).weight
    assert spec is not None
    q = ctx.quantizer.make(spec, "weight", ctx.layers[name])
    if not isinstance(q, qcore.FakeQuantizer):
        raise qcore.QcoreError(f"ompq measures weight errors through the FakeQuantizer protocol; quantizer "
                               f"{ctx.quantizer.name!r} made a {type(q).__name__}")
    q = q.to(weight.device)
    with torch.no_grad():
        qcore.calibrate_rows(q, q.rows_of(weight), est)
        return q(weight)


def weight_errors(ctx: qcore.RunContext, names: Sequence[str], bits: Sequence[int]) -> np.ndarray:
    """``[layers, bits]`` summed squared weight error on the run's quantizer and weight ranges (fp64)."""
    est = weight_estimator(ctx)
    out = np.zeros((len(names), len(bits)))
    for i, name in enumerate(qcore.track(list(names), desc="ompq weight errors", unit="layer")):
        weight = ctx.model.get_submodule(name).weight.detach()
        for k, b in enumerate(bits):
            out[i, k] = float((quantized_weight(ctx, name, int(b), est) - weight).double().pow(2).sum())
    return out


def _distortion(out: Tensor, ref: Tensor) -> Tensor:
    if out.dim() == 2 and out.is_floating_point():
        return F.kl_div(F.log_softmax(out.float(), dim=1), F.log_softmax(ref.float(), dim=1), log_target=True,
                        reduction="batchmean")
    return 0.5 * (out.float() - ref.float()).pow(2).sum() / max(out.shape[0], 1)


def plan_of(ctx: qcore.RunContext, bits: Mapping[str, int], a_bits: int | Mapping[str, int] | None) -> qcore.Plan:
    """The plan core will apply for free-layer weight ``bits``: those layers at ``a_bits`` inputs (one bit-width,
    or one per layer: per-tensor activation quantizers with their own bits), every pinned layer at its pin
    (``ctx.pinned``, as core's pins apply over any plan)."""
    name = ctx.quantizer.name

    def act(n: str) -> int | None:
        return int(a_bits[n]) if isinstance(a_bits, Mapping) else a_bits

    layers = {n: qcore.layer_spec(ctx.pipeline, int(b), act(n), name) for n, b in bits.items()}
    for n, p in ctx.pinned.items():
        if n in ctx.layers:
            spec = qcore.layer_spec(ctx.pipeline, p.w_bits, p.a_bits, name)
            if spec.weight is not None or spec.act is not None:
                layers[n] = spec
    return qcore.Plan(layers=layers)


def plan_distortion(ctx: qcore.RunContext, plans: Sequence[Mapping[str, int]], batches: Sequence[Any],
                    activations: str = "run", act_plans: Sequence[Mapping[str, int]] | None = None) -> list[float]:
    """How far each weight plan's simulated model is from the FP model on ``batches``, no reconstruction.

    Each plan maps free layers to weight bits; it is applied as ``qcore run`` applies a plan
    (:func:`plan_of`: pinned layers at their pins, the others' inputs at ``ctx.budget.a_bits``; then
    :func:`qcore.apply_plan`, ``-o equalize`` through :func:`qcore.equalize_inputs`) and calibrated by core's
    :meth:`qcore.RangeCalibrator.calibrate` with the run's estimators (:func:`range_calibrator`) on ``batches``:
    nearest rounding, no reconstruction. ``activations="run"``: inputs quantized at their bits (ranges observed on
    ``batches`` with the plan's weights upstream); ``"fp"``: every input left in floating point (weights-only: the
    activation noise, the same in every plan, does not mask the weight error). The distortion is
    ``KL(FP || simulated)`` of the softmax of 2-D outputs (logits; batch mean), half the squared error per sample
    otherwise, averaged over ``batches``. ``act_plans`` (one per plan): the free layers' activation bits per layer
    instead of ``ctx.budget.a_bits`` (the activation-bit search's plans)."""
    if act_plans is not None and len(act_plans) != len(plans):
        raise ValueError(f"act_plans must have one entry per plan ({len(plans)}), got {len(act_plans)}")
    if activations not in ("run", "fp"):
        raise qcore.QcoreError(f"activations={activations!r} must be 'run' or 'fp'")
    forward = ctx.task.forward
    batches = list(batches)
    cal = range_calibrator(ctx)
    sub = dataclasses.replace(ctx, task=dataclasses.replace(ctx.task, calibration=batches), measured={},
                              artifacts={})
    equalize = getattr(ctx.pipeline, "equalize", "off")
    with torch.no_grad():
        refs = [forward(ctx.model, b) for b in batches]
    scores = []
    for j, bits in enumerate(plans):
        a_bits = act_plans[j] if act_plans is not None else ctx.budget.a_bits
        qmodel = qcore.apply_plan(ctx.model, plan_of(ctx, bits, a_bits), sub)
        if equalize != "off":
            qcore.equalize_inputs(qmodel, ctx.model, forward, batches, equalize, ctx.pipeline.equalize_alpha)
        if activations == "fp":
            for layer in qcore.quant_layers(qmodel).values():
                layer.act_quantizer = None
        qcore.RangeCalibrator.calibrate(cal, qmodel, sub)
        qmodel.eval()
        total = 0.0
        with torch.no_grad():
            for b, ref in zip(batches, refs, strict=True):
                total += float(_distortion(forward(qmodel, b), ref))
        scores.append(total / max(len(batches), 1))
    return scores


def hessian_traces(model: nn.Module, names: Sequence[str], batches: Sequence[Any],
                   forward: Callable[[nn.Module, Any], Any], probes: int = 4, seed: int = 0) -> dict[str, float]:
    """Hutchinson estimate of ``Tr(H)`` of each layer's weight block, averaged over ``batches`` and ``probes``
    Rademacher vectors. ``model`` is copied (its weights' gradients are not touched)."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    params = [work.get_submodule(n).weight for n in names]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    totals = np.zeros(len(names))
    count = 0
    # the fused attention kernels (flash / memory-efficient) have no double backward: Hessian-vector products
    # through a transformer's scaled_dot_product_attention need its math implementation
    with sdpa_kernel([SDPBackend.MATH]):
        for batch in qcore.track(list(batches), desc="ompq hessian traces", unit="batch"):
            with torch.no_grad():
                ref = forward(model, batch)
            if not isinstance(ref, Tensor):
                raise qcore.QcoreError("ompq's hawq sensitivity needs the task's forward to return one tensor")
            loss = _distortion(forward(work, batch), ref.detach())
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(probes):
                vs = [torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=k < probes - 1)
                totals += np.array([float((h * v).sum()) for h, v in zip(hv, vs, strict=True)])
                count += 1
    traces = totals / max(count, 1)
    return {n: max(float(t), 0.0) for n, t in zip(names, traces, strict=True)}


def objective_matrix(kind: str, errors: np.ndarray, sizes: Sequence[int], bits: Sequence[int],
                     weight: Sequence[float] | None = None, traces: Mapping[str, float] | None = None,
                     names: Sequence[str] | None = None) -> np.ndarray:
    """``D[i, k]`` to minimise for layer i at ``bits[k]``:

    * ``linear``: the seed's objective, ``-weight_i * bits_k`` (maximise importance-weighted bits);
    * ``error``: ``weight_i * errors[i, k] / errors[i, 0]`` (importance times the weight error relative to the
      layer's error at the fewest bits, so every layer's scale is its own);
    * ``hawq``: ``Tr(H_i) / n_i * errors[i, k]`` (HAWQ-V2's trace-weighted perturbation).
    """
    b = np.asarray(bits, dtype=np.float64)
    if kind == "linear":
        return -np.asarray(weight, dtype=np.float64)[:, None] * b[None, :]
    if kind == "error":
        base = np.maximum(errors[:, :1], 1e-300)
        return np.asarray(weight, dtype=np.float64)[:, None] * errors / base
    if kind == "hawq":
        assert traces is not None and names is not None
        t = np.array([traces[n] / max(int(s), 1) for n, s in zip(names, sizes, strict=True)])
        return t[:, None] * errors
    raise ValueError(f"unknown objective {kind!r}")
