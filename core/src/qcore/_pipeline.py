"""The ``qcore run`` pipeline: task -> FP evaluation -> layers -> allocate -> apply -> calibrate -> evaluate.

Everything the user can get wrong is checked before the expensive stages, and nothing is written until the
run has succeeded: ``result.json`` and ``plan.json`` appear together, atomically, or not at all.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcore import __version__
from qcore import distributed as qdist
from qcore._act_correction import correct_outputs
from qcore._allocation import PipelineOptions, apply_pins, pinned_layers
from qcore._apply import apply_plan, check_finite, freeze
from qcore._components import Budget, Method, RunConfig, RunContext
from qcore._cost import Cost, plan_cost
from qcore._errors import QcoreError
from qcore._fold import fold_batchnorm
from qcore._layers import LayerInfo, discover_layers, measure_layers
from qcore._options import build_options, check_known
from qcore._outputs import write_outputs
from qcore._plugins import Host, load_host
from qcore._spec import MAX_BITS, Plan

log = logging.getLogger(__name__)
BUDGET_KEYS = ("w_bits", "a_bits", "target_bits")


@dataclass
class RunOutcome:
    """A finished run: the result written to result.json, the plan, and the quantized model."""

    result: dict[str, Any]
    plan: Plan
    model: torch.nn.Module
    out: Path | None
    stages: dict[str, float] = field(default_factory=dict)


class _Stages:
    def __init__(self, hooks: Any) -> None:
        self.seconds: dict[str, float] = {}
        self.hooks = hooks
        self.ctx: RunContext | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        if self.ctx is not None:
            self.hooks.qcore_stage_done(ctx=self.ctx, stage=name, seconds=self.seconds[name])


def _check_bits(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise QcoreError(f"{name} {value} is out of range; use {lo:g}..{hi:g}")


def resolve_method(host: Host, config: RunConfig) -> tuple[Method, str]:
    """The method to run and the plugin that owns it."""
    if config.method:
        method = host.get("method", config.method)
        return method, host.owner_of("method", config.method)
    plugin = config.plugin or "uniform"
    return host.default_method(plugin), plugin


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QcoreError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise QcoreError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QcoreError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QcoreError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def run(config: RunConfig, host: Host | None = None) -> RunOutcome:
    """Run one quantization job as ``config`` says and return its outcome (writing ``config.out`` if set)."""
    host = host or load_host()
    method, plugin = resolve_method(host, config)
    classes = {kind: host.get(kind, getattr(config, kind) or getattr(method, kind))
               for kind in ("quantizer", "calibrator", "allocator")}
    task_cls = host.get("task", config.task)
    for key, flags in (("input", "--input-size/--mean/--std/--channels"), ("model_args", "--model-arg")):
        if getattr(config, key) and key not in task_cls.accepts:
            raise QcoreError(f"task {config.task!r} does not take {flags} (YAML {key}:); remove them, its models "
                             "set their own input and construction")
    config = dataclasses.replace(
        config, calib_size=task_cls.default_calib_size if config.calib_size is None else config.calib_size,
        batch_size=task_cls.default_batch_size if config.batch_size is None else config.batch_size)
    values = {k: v for k, v in method.defaults.items() if k not in BUDGET_KEYS} | dict(config.options)
    check_known(values, [PipelineOptions, task_cls.Options] + [c.Options for c in classes.values()])
    if getattr(classes["allocator"], "saved_plan", False) and "first_last" not in values:
        values["first_last"] = "same"  # a saved plan already holds its first/last bits: do not pin over it
    pipeline = build_options(PipelineOptions, values, "pipeline")
    comps = {kind: cls(build_options(cls.Options, values, f"{kind} {cls.name!r}")) for kind, cls in classes.items()}
    defaults = method.defaults
    budget = Budget(
        w_bits=config.w_bits if config.w_bits is not None else defaults.get("w_bits"),
        a_bits=config.a_bits if config.a_bits is not None else defaults.get("a_bits"),
        target_bits=config.target_bits if config.target_bits is not None else defaults.get("target_bits"))
    _check_bits("--w-bits", budget.w_bits, 0, MAX_BITS)
    _check_bits("--a-bits", budget.a_bits, 0, MAX_BITS)
    _check_bits("--target-bits", budget.target_bits, 0, MAX_BITS)
    if config.calib_size < 1 or config.batch_size < 1:
        raise QcoreError("--calib-size and --batch-size must be at least 1")
    if config.seed < 0:
        raise QcoreError(f"--seed {config.seed} must be 0 or more")
    if config.out is not None and config.out.exists() and not config.out.is_dir():
        raise QcoreError(f"--out {config.out} exists and is not a directory; choose another path")
    device = _check_device(config.device)
    torch.manual_seed(config.seed)
    qdist.init_from_env(config.device)

    stages = _Stages(host.hook)
    with stages("load"):
        task = task_cls(build_options(task_cls.Options, values, f"task {config.task!r}"))
        inst = task.build(config, host)
        fp_model = inst.model.eval().to(device)
        check_finite(fp_model)
    with stages("fp_eval"):
        fp_metrics = inst.evaluate(fp_model) if qdist.is_main() else {}  # other ranks only help allocate

    work = copy.deepcopy(fp_model)
    folded = fold_batchnorm(work) if pipeline.fold_bn else []
    layers = discover_layers(work, lambda m, n: host.hook.qcore_layer_info(module=m, name=n),
                      pipeline.include, pipeline.exclude)
    if not layers:
        raise QcoreError(f"model {inst.model_name!r} has no quantizable layer (Conv1d, Conv2d, Linear, or a type a "
                         "plugin knows) matching include/exclude; check --model and -o include/exclude")
    measure_layers(work, layers, lambda m: inst.forward(m, inst.example))
    pins = pinned_layers(list(layers), pipeline, config.layers, budget.w_bits, budget.a_bits)
    ctx = RunContext(config=config, task=inst, model=work, layers=layers, budget=budget, pinned=dict(pins),
                     options=values, quantizer=comps["quantizer"], pipeline=pipeline, hooks=host.hook,
                     cache_dir=(config.out / "cache") if config.out else None)
    stages.ctx = ctx
    host.hook.qcore_run_start(ctx=ctx)

    with stages("allocate"):
        plan = comps["allocator"].allocate(ctx)
        plan = apply_pins(plan, pins, pipeline, layers, comps["quantizer"].name)
    with stages("apply"):
        qmodel = apply_plan(work, plan, ctx)
    with stages("calibrate"):
        comps["calibrator"].calibrate(qmodel, ctx)
        freeze(qmodel)
        if pipeline.act_correction != "none":
            correct_outputs(qmodel, work, inst.forward, list(ctx.calibration_batches()), mode=pipeline.act_correction)
    with stages("quant_eval"):
        quant_metrics = inst.evaluate(qmodel) if qdist.is_main() else {}

    cost = plan_cost(work, layers, plan)
    result = build_result(config, plugin, method, comps, inst.model_name, inst.metric, fp_metrics, quant_metrics,
                          cost, plan, layers, pipeline, folded, stages.seconds, values, inst.data, budget)
    if ctx.measured:
        result["measured"] = dict(ctx.measured)
    plan = dataclasses.replace(plan, meta={**plan.meta, "method": method.name, "model": inst.model_name,
                                           "task": config.task, "qcore_version": __version__})
    host.hook.qcore_run_finish(ctx=ctx, result=result)
    out = config.out if qdist.is_main() else None
    if out is not None:
        write_outputs(out, {"result.json": result, "plan.json": plan, **ctx.artifacts})
    return RunOutcome(result=result, plan=plan, model=qmodel, out=out, stages=stages.seconds)


def _describe_specs(specs: list[Any]) -> str:
    gran = sorted({s.granularity + (f" of {s.group_size}" if s.granularity == "group" else "") for s in specs})
    grids = sorted({"symmetric" if s.symmetric else "affine" for s in specs})
    mixed = [s for s in specs if s.mixed]
    unit = "channel" if all(s.group_size == 1 for s in mixed) else "channel group"
    bits = (f"mixed precision per {unit} ({min(min(s.group_bits) for s in mixed)}-"
            f"{max(max(s.group_bits) for s in mixed)} bits) in {len(mixed)} layers; " if mixed else "")
    return f"{bits}{', '.join(gran)} scales, {'/'.join(grids)}"


def describe_quantized(plan: Plan, layers: dict[str, LayerInfo], pipeline: PipelineOptions,
                       folded: list[tuple[str, str]], integer_grid: bool) -> dict[str, Any]:
    """What was quantized, in words and lists (the ``quantized`` entry of result.json), read off the plan."""
    names = list(layers)
    wl = [n for n in names if n in plan.layers and plan.layers[n].weight is not None]
    al = [n for n in names if n in plan.layers and plan.layers[n].act is not None]
    fp = [n for n in names if n not in wl]
    kinds = sorted({layers[n].kind for n in names})
    wspecs = [plan.layers[n].weight for n in wl]
    aspecs = [plan.layers[n].act for n in al]
    act_gran = sorted({s.granularity for s in aspecs})  # type: ignore[union-attr]
    deployable = integer_grid and set(act_gran) <= {"tensor"}
    first_last = {"same": "quantized like the other layers", "fp": "kept in floating point"}.get(
        pipeline.first_last, f"weights and inputs at {pipeline.first_last} bits")
    summary = (f"weights of {len(wl)} of {len(names)} quantizable layers ({', '.join(kinds)}; "
               f"{_describe_specs(wspecs) if wspecs else 'none'}); "
               + (f"input activations of {len(al)} layers ({_describe_specs(aspecs)})" if al else "no activations")
               + f"; first ({names[0]}) and last ({names[-1]}) layer: {first_last}"
               + f"; {len(folded)} BatchNorm layers folded"
               + (f"; weight bias correction: {pipeline.weight_correction} per output channel (a fractional "
                  "weight zero point)" if pipeline.weight_correction != "none" else "")
               + (f"; {pipeline.act_correction} output correction: a per-output-channel "
                  + ("gain and constant" if pipeline.act_correction == "affine" else "constant")
                  + " from the calibration data" if pipeline.act_correction != "none" else "")
               + "; not quantized: biases, norms, residual sums, pooling, attention matmuls, softmax")
    return {"summary": summary, "weight_layers": wl, "act_layers": al, "fp_layers": fp,
            "activations": "inputs of quantized layers" if al else "none",
            "first_last": pipeline.first_last,
            "weight_granularity": sorted({s.granularity for s in wspecs}),  # type: ignore[union-attr]
            "act_granularity": act_gran, "bn_folded": [list(p) for p in folded],
            "weight_correction": pipeline.weight_correction,
            "act_correction": pipeline.act_correction,
            "deployable": deployable,
            "deployable_means": "per-tensor activation scales and an integer grid (no simulated-only features)"}


def build_result(config: RunConfig, plugin: str, method: Method, comps: dict[str, Any], model_name: str,
                 metric: str, fp_metrics: dict[str, float], quant_metrics: dict[str, float], cost: Cost,
                 plan: Plan, layers: dict[str, LayerInfo], pipeline: PipelineOptions,
                 folded: list[tuple[str, str]], seconds: dict[str, float], options: dict[str, Any],
                 data: dict[str, str], budget: Budget) -> dict[str, Any]:
    """The result.json document."""
    integer_grid = bool(getattr(comps["quantizer"], "integer_grid", True))
    return {
        "plugin": plugin, "method": method.name, "task": config.task, "model": model_name,
        "components": {k: v.name for k, v in comps.items()},
        "metric": metric, "fp": fp_metrics.get(metric), "quant": quant_metrics.get(metric),
        "fp_metrics": fp_metrics, "quant_metrics": quant_metrics,
        "w_bits_avg": cost.w_bits_avg, "a_bits_avg": cost.a_bits_avg,
        "size_mb": cost.size_mb, "fp_size_mb": cost.fp_size_mb, "bops": cost.bops, "fp_bops": cost.fp_bops,
        "budget": dataclasses.asdict(budget),
        "quantized": describe_quantized(plan, layers, pipeline, folded, integer_grid),
        "data": data, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "conventions": {"size_mb": "MiB; quantized weights at their bits, scales/zero points and all other "
                                   "parameters at 32 bits; after BN folding",
                        "bops": "per sample; conv/linear MACs x weight bits x activation bits (32 when FP)",
                        "bits_avg": "element-weighted over quantized tensors"},
        "seconds": seconds, "qcore_version": __version__, "seed": config.seed, "device": config.device,
        "calib_size": config.calib_size, "processes": qdist.world(),
    }
