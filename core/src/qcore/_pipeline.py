"""The ``qcore run`` pipeline: task -> FP evaluation -> layers -> allocate -> apply -> calibrate -> evaluate.

Everything the user can get wrong is checked before the expensive stages, and nothing is written until the
run has succeeded: ``result.json`` and ``plan.json`` appear together, atomically, or not at all.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcore import __version__
from qcore import distributed as qdist
from qcore._allocation import PipelineOptions, apply_pins, last_layer_names, pinned_layers
from qcore._apply import apply_plan, check_finite, freeze
from qcore._components import (
    Budget,
    Correction,
    Method,
    OutputCorrection,
    RunConfig,
    RunContext,
    Task,
    TaskInstance,
    WeightCorrection,
)
from qcore._cost import Cost, mean_bits, plan_cost
from qcore._errors import ContractError, QcoreError, blame
from qcore._fake_quant import FakeQuantizer
from qcore._fold import fold_batchnorm
from qcore._layers import LayerInfo, discover_layers, measure_layers
from qcore._options import build_options, check_known, option_fields
from qcore._outputs import write_outputs
from qcore._plugins import Host, load_host
from qcore._progress import stage_log
from qcore._spec import MAX_BITS, Plan
from qcore._wrap import iter_quantizers

log = logging.getLogger(__name__)
BUDGET_KEYS = ("w_bits", "a_bits", "target_bits")
#: the largest seed every random generator in a run takes (torch's are 64-bit)
MAX_SEED = 2**63 - 1


@dataclass
class RunOutcome:
    """A finished run: the result written to result.json, the plan, and the quantized model."""

    result: dict[str, Any]
    plan: Plan
    model: torch.nn.Module
    out: Path | None
    stages: dict[str, float] = field(default_factory=dict)
    #: the FP model the quantized one was made from (BN folded as the quantized model's layers are)
    fp_model: torch.nn.Module | None = None
    #: what the components saw (layers, options, corrections)
    ctx: RunContext | None = None


class _Stages:
    def __init__(self, hooks: Any) -> None:
        self.seconds: dict[str, float] = {}
        self.hooks = hooks
        self.ctx: RunContext | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        except Exception as exc:
            if not hasattr(exc, "qcore_stage"):
                exc.qcore_stage = name  # type: ignore[attr-defined]  # the CLI names the stage that failed
            raise
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        stage_log.info("stage %s done in %.1f s", name, self.seconds[name])
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


def check_sizes(config: RunConfig) -> None:
    """Refuse a calibration or batch size below 1 (0 too: it is not "the default")."""
    for flag, value in (("--calib-size", config.calib_size), ("--batch-size", config.batch_size)):
        if value is not None and value < 1:
            raise QcoreError(f"{flag} {value} is out of range; use 1 or more (--calib-size and --batch-size must "
                             "be at least 1)")


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


def check_out(out: Path) -> None:
    """Refuse an output folder that cannot be written at the start of a run, not after all its work: a file in
    the way, a name the file system cannot hold, or no write permission. Creates nothing."""
    if not str(out).strip():
        raise QcoreError("--out is empty; name the output folder (or leave --out out for qcore-runs/...)")
    long = [part for part in out.parts if len(os.fsencode(part)) > 255]  # NAME_MAX of every common file system
    if long:
        raise QcoreError(f"--out has a name of {len(os.fsencode(long[0]))} bytes ({long[0][:30]}...); file systems "
                         "allow at most 255: choose a shorter --out")
    if out.exists() and not out.is_dir():
        raise QcoreError(f"--out {out} exists and is not a directory; choose another path")
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise QcoreError(f"--out {out}: {probe} is a file, so it cannot hold the output folder; choose another path")
    try:  # an anonymous file where the folder will be made (O_TMPFILE: nothing appears); access() trusts root
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise QcoreError(f"--out {out}: cannot write in {probe} ({exc.strerror or exc}); choose another --out"
                         ) from None


def _correction(host: Host, name: str, base: type[Correction]) -> type[Correction] | None:
    """The registered correction class ``name`` (None for ``none``), checked to be of the ``base`` stage."""
    if name == "none":
        return None
    cls = host.get("correction", name)
    if not issubclass(cls, base):
        key = "weight_correction" if base is WeightCorrection else "act_correction"
        raise QcoreError(f"correction {name!r} is not a {base.__name__}; -o {key} takes "
                         + ", ".join(sorted(n for n, e in host.tables["correction"].items()
                                            if issubclass(e.obj, base))) + " or none")
    return cls


def prepare(config: RunConfig, host: Host, task_cls: type[Task] | None) -> Prepared:
    """Resolve the method's components and check every setting before anything expensive runs (``task_cls``:
    the registered task, None for a model and data handed over by the Python API)."""
    method, plugin = resolve_method(host, config)
    calib_asked = config.calib_size
    classes = {kind: host.get(kind, getattr(config, kind) or getattr(method, kind))
               for kind in ("quantizer", "calibrator", "allocator")}
    if task_cls is not None:
        for key, flags in (("input", "--input-size/--mean/--std/--channels"), ("model_args", "--model-arg")):
            if getattr(config, key) and key not in task_cls.accepts:
                raise QcoreError(f"task {config.task!r} does not take {flags} (YAML {key}:); remove them, its "
                                 "models set their own input and construction")
        config = dataclasses.replace(
            config, calib_size=task_cls.default_calib_size if config.calib_size is None else config.calib_size,
            batch_size=task_cls.default_batch_size if config.batch_size is None else config.batch_size)
    values = {k: v for k, v in method.defaults.items() if k not in BUDGET_KEYS} | dict(config.options)
    if getattr(classes["allocator"], "saved_plan", False) and "first_last" not in values:
        values["first_last"] = "same"  # a saved plan already holds its first/last bits: do not pin over it
    pipeline = build_options(PipelineOptions, values, "pipeline")
    corrections = {"weight_correction": _correction(host, pipeline.weight_correction, WeightCorrection),
                   "output_correction": _correction(host, pipeline.act_correction, OutputCorrection)}
    option_classes = ([PipelineOptions] + ([task_cls.Options] if task_cls else [])
                      + [c.Options for c in classes.values()]
                      + [c.Options for c in corrections.values() if c is not None])
    # a method's option defaults are for its own components: one that a --quantizer/--calibrator/--allocator given
    # instead does not declare is dropped (what the user types with -o is still checked)
    declared = {k for c in option_classes for k in option_fields(c)}
    values = {k: v for k, v in values.items() if k in config.options or k in declared}
    check_known(values, option_classes)
    comps = {kind: cls(build_options(cls.Options, values, f"{kind} {cls.name!r}")) for kind, cls in classes.items()}
    correctors = {k: None if cls is None else cls(build_options(cls.Options, values, f"correction {cls.name!r}"))
                  for k, cls in corrections.items()}
    if pipeline.bias == "int32" and not getattr(comps["quantizer"], "integer_grid", True):
        raise QcoreError(f"-o bias=int32 needs a uniform integer grid, but quantizer {comps['quantizer'].name!r} "
                         "has none; use --quantizer uniform or -o bias=float")
    defaults = method.defaults
    budget = Budget(
        w_bits=config.w_bits if config.w_bits is not None else defaults.get("w_bits"),
        a_bits=config.a_bits if config.a_bits is not None else defaults.get("a_bits"),
        target_bits=config.target_bits if config.target_bits is not None else defaults.get("target_bits"))
    _check_bits("--w-bits", budget.w_bits, 0, MAX_BITS)
    _check_bits("--a-bits", budget.a_bits, 0, MAX_BITS)
    _check_bits("--target-bits", budget.target_bits, 0, MAX_BITS)
    check_sizes(config)
    if not 0 <= config.seed <= MAX_SEED:
        raise QcoreError(f"--seed {config.seed} is out of range; use 0..{MAX_SEED} (2**63 - 1)")
    if config.out is not None:
        check_out(config.out)
    device = _check_device(config.device)
    torch.manual_seed(config.seed)
    return Prepared(config=config, host=host, method=method, plugin=plugin, comps=comps, correctors=correctors,
                    pipeline=pipeline, values=values, budget=budget, device=device, calib_asked=calib_asked)


def run(config: RunConfig, host: Host | None = None) -> RunOutcome:
    """Run one quantization job as ``config`` says and return its outcome (writing ``config.out`` if set)."""
    host = host or load_host()
    task_cls = host.get("task", config.task)
    prep = prepare(config, host, task_cls)
    config, values = prep.config, prep.values

    stages = _Stages(host.hook)
    with stages("load"):
        task = task_cls(build_options(task_cls.Options, values, f"task {config.task!r}"))
        with blame("task", config.task, host.owner_of("task", config.task)):
            inst = task.build(config, host)
    return execute(prep, inst, stages)


@dataclass
class Prepared:
    """A run's resolved components and checked settings, ready to :func:`execute` on a task instance."""

    config: RunConfig
    host: Host
    method: Method
    plugin: str
    comps: dict[str, Any]
    correctors: dict[str, Any]
    pipeline: PipelineOptions
    values: dict[str, Any]
    budget: Budget
    device: torch.device
    #: the --calib-size the user gave (None: the task's default, which a small task may not reach silently)
    calib_asked: int | None = None

    def blame(self, kind: str, comp: Any) -> Any:
        """:func:`qcore._errors.blame` for this run's component ``comp`` of ``kind``."""
        return blame(kind, comp.name, self.host.owner_of("correction" if kind.endswith("correction") else kind,
                                                         comp.name))


def execute(prep: Prepared, inst: TaskInstance, stages: _Stages | None = None) -> RunOutcome:
    """The pipeline after the task is built: FP evaluation, layers, allocate, apply, calibrate, correct,
    evaluate, result. ``inst.evaluate`` may be None (no metric: the Python API without ``evaluate``)."""
    config, host, comps, pipeline, budget = prep.config, prep.host, prep.comps, prep.pipeline, prep.budget
    # under torchrun, join the process group only now: every setting, the model and the data have been checked,
    # so a bad input fails on each rank alike before any rank waits on another
    qdist.init_from_env(config.device)
    stages = stages or _Stages(host.hook)
    registered_task = config.task in host.tables["task"]

    def task_blame() -> Any:  # the Python API's model and forward are the caller's own: their errors pass unchanged
        if not registered_task:
            return contextlib.nullcontext()
        return blame("task", config.task, host.owner_of("task", config.task))

    used = calibration_samples(inst.calibration)
    if used is not None and used != config.calib_size:
        if prep.calib_asked is not None and used < prep.calib_asked:
            log.warning("--calib-size %d asked for, but the task's calibration data has %d samples: calibrating on "
                        "(and recording) %d", prep.calib_asked, used, used)
        config = prep.config = dataclasses.replace(config, calib_size=used)  # result.json records what was used
    fp_model = inst.model.eval().to(prep.device)
    check_finite(fp_model)
    with stages("fp_eval"), task_blame():
        fp_metrics = inst.evaluate(fp_model) if qdist.is_main() and inst.evaluate is not None else {}

    work = copy.deepcopy(fp_model)
    folded = fold_batchnorm(work, inst.untraceable) if pipeline.fold_bn else []
    layers = discover_layers(work, lambda m, n: host.hook.qcore_layer_info(module=m, name=n),
                             pipeline.include, pipeline.exclude)
    if not layers:
        raise QcoreError(f"model {inst.model_name!r} has no quantizable layer (Conv1d, Conv2d, Linear, or a type a "
                         "plugin knows) matching include/exclude; check --model and -o include/exclude")
    with task_blame():
        measure_layers(work, layers, lambda m: inst.forward(m, inst.example))
    pins = pinned_layers(list(layers), pipeline, config.layers, budget.w_bits, budget.a_bits,
                         last=inst.last_layers)
    ctx = RunContext(config=config, task=inst, model=work, layers=layers, budget=budget, pinned=dict(pins),
                     options=prep.values, quantizer=comps["quantizer"], pipeline=pipeline, hooks=host.hook,
                     cache_dir=(config.out / "cache") if config.out else None, calibrator=comps["calibrator"],
                     **prep.correctors)
    stages.ctx = ctx
    host.hook.qcore_run_start(ctx=ctx)

    with stages("allocate"):
        with prep.blame("allocator", comps["allocator"]):
            plan = comps["allocator"].allocate(ctx)
        check_plan(plan, ctx, comps["allocator"], host)
        plan = apply_pins(plan, pins, pipeline, layers, comps["quantizer"].name)
        check_budget(plan, ctx, comps["allocator"], host)
    with stages("apply"), prep.blame("quantizer", comps["quantizer"]):
        qmodel = apply_plan(work, plan, ctx)
    with stages("calibrate"):
        equalized = _equalize(qmodel, work, inst, ctx, pipeline)
        with prep.blame("calibrator", comps["calibrator"]):
            comps["calibrator"].calibrate(qmodel, ctx)
        check_calibrated(qmodel, comps["calibrator"], host)
        freeze(qmodel)
        if ctx.output_correction is not None:
            with prep.blame("correction", ctx.output_correction):
                ctx.output_correction.correct(qmodel, work, ctx)
    with stages("quant_eval"), task_blame():
        quant_metrics = inst.evaluate(qmodel) if qdist.is_main() and inst.evaluate is not None else {}

    cost = plan_cost(work, layers, plan, getattr(comps["quantizer"], "extra_bits", None))
    result = build_result(config, prep.plugin, prep.method, comps, inst.model_name, inst.metric, fp_metrics,
                          quant_metrics, cost, plan, layers, pipeline, folded, stages.seconds, prep.values, inst.data,
                          budget, prep.correctors, last_layers=inst.last_layers)
    if equalized:
        _describe_equalized(result["quantized"], equalized, pipeline, comps["allocator"].name)
    if ctx.measured:
        bad = {k: type(v).__name__ for k, v in ctx.measured.items() if not isinstance(v, dict)}
        if bad:
            raise ContractError(f"ctx.measured values must be dicts of facts; got {bad} (a component of this run "
                                "wrote them: fix it to store {'what': value, ...})")
        result["measured"] = dict(ctx.measured)
    plan = dataclasses.replace(plan, meta={**plan.meta, "method": prep.method.name, "model": inst.model_name,
                                           "task": config.task, "qcore_version": __version__})
    host.hook.qcore_run_finish(ctx=ctx, result=result)
    out = config.out if qdist.is_main() else None
    if out is not None:
        from qcore._saved import saved_bytes, unsaved_reason

        files: dict[str, Any] = {"result.json": result, "plan.json": plan, **ctx.artifacts}
        why = unsaved_reason(qmodel)
        if why is None:
            files["model.qcore"] = saved_bytes(qmodel, plan, ctx)
        else:
            log.warning("model.qcore not written: %s", why)
        write_outputs(out, files)
    return RunOutcome(result=result, plan=plan, model=qmodel, out=out, stages=stages.seconds, fp_model=work,
                      ctx=ctx)


def _equalize(qmodel: torch.nn.Module, work: torch.nn.Module, inst: TaskInstance, ctx: RunContext,
              pipeline: PipelineOptions) -> dict[str, torch.Tensor]:
    """``-o equalize``: equalize the chosen layers' inputs of ``qmodel`` on the calibration data (before the
    calibrator sets any range); the scales by layer name (empty when off or no layer qualifies)."""
    if pipeline.equalize == "off":
        return {}
    from qcore._equalize import equalize_inputs

    scales = equalize_inputs(qmodel, work, inst.forward, ctx.calibration_batches(), pipeline.equalize,
                             pipeline.equalize_alpha)
    if not scales:
        log.info("-o equalize=%s: no layer of this model qualifies; the model is unchanged", pipeline.equalize)
    return scales


def _describe_equalized(quantized: dict[str, Any], scales: dict[str, torch.Tensor],
                        pipeline: PipelineOptions, allocator: str) -> None:
    """Add the equalized layers to result.json's ``quantized`` entry (what was done and what it costs to deploy).
    Equalization runs after allocation, so a searching allocator chose its bits on the unequalized layers: said
    there and logged."""
    quantized["equalized"] = {"mode": pipeline.equalize, "alpha": pipeline.equalize_alpha, "layers": list(scales),
                              "scale_range": [min(float(s.min()) for s in scales.values()),
                                              max(float(s.max()) for s in scales.values())]}
    if allocator != "fixed":
        quantized["equalized"]["plan_chosen_before_equalization"] = True
        log.warning("allocator %r chose the bits of the %d equalized layer(s) on their unequalized weights and "
                    "inputs (equalization runs after allocation); -o equalize=off gives a plan for exactly the "
                    "tensors it measured", allocator, len(scales))
    quantized["summary"] += (
        f"; inputs of {len(scales)} layers equalized (-o equalize={pipeline.equalize}, alpha "
        f"{pipeline.equalize_alpha:g}: per-input-channel scales s moved into the weight columns, the input x/s "
        "quantized per tensor; at run time one float multiply per input element before the quantizer, fusable "
        "with a preceding GELU, foldable into a preceding LayerNorm's affine; a Mul in the ONNX export)")


def calibration_samples(batches: Any) -> int | None:
    """How many samples the calibration batches hold: tensors (or tuples/lists starting with one) by their first
    dimension, dicts by an integer ``batch_size`` entry (detection's batch_dict); None when that is not known."""
    total = 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) and b else b
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            total += int(x.shape[0])
        elif isinstance(x, dict) and isinstance(x.get("batch_size"), int):
            total += x["batch_size"]
        else:
            return None
    return total


def _owner(host: Host, kind: str, comp: Any) -> str:
    return host.owner_of(kind, comp.name) if comp.name in host.tables[kind] else "?"


def check_plan(plan: Any, ctx: RunContext, allocator: Any, host: Host) -> None:
    """What every allocator owes (before core applies the pins): a :class:`Plan` naming only the run's layers,
    with an entry for every layer that is not pinned (an entry with no weight and no activation spec keeps a
    layer in FP). A saved plan is checked against the model when it is applied."""
    who = f"allocator {allocator.name!r} (plugin {_owner(host, 'allocator', allocator)!r})"
    if not isinstance(plan, Plan):
        raise ContractError(f"{who} returned {type(plan).__name__}, not a qcore.Plan")
    if getattr(allocator, "saved_plan", False):
        return
    foreign = [n for n in plan.layers if n not in ctx.layers]
    if foreign:
        raise ContractError(f"{who} planned layer(s) this run does not quantize: {', '.join(foreign[:5])}; a plan "
                            "may name only layers of ctx.layers (include/exclude already applied)")
    missing = [n for n in ctx.layers if n not in ctx.pinned and n not in plan.layers]
    if missing:
        raise ContractError(f"{who} left {len(missing)} layer(s) out of its plan: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}; a plan must give every unpinned layer a spec "
                            "(LayerSpec(None, None) keeps it in floating point)")


def check_budget(plan: Plan, ctx: RunContext, allocator: Any, host: Host) -> None:
    """The final plan (pins applied) within ``--target-bits`` as the allocator's ``budget_convention`` says
    (nothing to check without ``--target-bits`` or a convention)."""
    convention = getattr(allocator, "budget_convention", None)
    target = ctx.budget.target_bits
    if target is None or convention is None or getattr(allocator, "saved_plan", False):
        return
    names = [n for n in plan.layers if plan.layers[n].weight is not None and n in ctx.layers
             and (convention == "pins_included" or n not in ctx.pinned)]
    sizes = {n: ctx.layers[n].weight_numel for n in names}
    total = sum(sizes.values())
    if not total:
        return
    avg = sum(mean_bits(plan.layers[n].weight, ctx.layers[n].out_channels) * sizes[n] for n in names) / total
    if avg > target + 1e-6:
        what = "its layers, pinned ones included," if convention == "pins_included" else "its unpinned layers"
        raise ContractError(f"allocator {allocator.name!r} (plugin {_owner(host, 'allocator', allocator)!r}) went "
                            f"over the budget: {what} average {avg:.3f} weight bits, more than --target-bits "
                            f"{target:g}")


def uncalibrated(qmodel: torch.nn.Module, strict: bool = False) -> list[str]:
    """``layer.role`` of every quantizer of ``qmodel`` not calibrated; ``strict``: every quantizer must also be a
    :class:`FakeQuantizer` (without it, a wrapper a calibrator installed -- ACIQ's test-time ranges -- passes)."""
    return [f"{layer}.{role}" for layer, role, q in iter_quantizers(qmodel)
            if (strict and not isinstance(q, FakeQuantizer)) or not getattr(q, "calibrated", True)]


def check_calibrated(qmodel: torch.nn.Module, calibrator: Any, host: Host) -> None:
    """Every fake quantizer must be calibrated after ``calibrate``: name the ones that are not."""
    left = uncalibrated(qmodel)
    if left:
        raise ContractError(f"calibrator {calibrator.name!r} (plugin {_owner(host, 'calibrator', calibrator)!r}) left "
                            f"{len(left)} quantizer(s) uncalibrated: {', '.join(left[:5])}; it does not support this "
                            "quantizer (choose the calibrator its plugin recommends)")


def _describe_specs(specs: list[Any]) -> str:
    gran = sorted({s.granularity + (f" of {s.group_size}" if s.granularity == "group" else "") for s in specs})
    grids = sorted({"symmetric" if s.symmetric else "affine" for s in specs})
    mixed = [s for s in specs if s.mixed]
    unit = "channel" if all(s.group_size == 1 for s in mixed) else "channel group"
    bits = (f"mixed precision per {unit} ({min(min(s.group_bits) for s in mixed)}-"
            f"{max(max(s.group_bits) for s in mixed)} bits) in {len(mixed)} layers; " if mixed else "")
    return f"{bits}{', '.join(gran)} scales, {'/'.join(grids)}"


def describe_quantized(plan: Plan, layers: dict[str, LayerInfo], pipeline: PipelineOptions,
                       folded: list[tuple[str, str]], integer_grid: bool,
                       corrections: dict[str, Correction | None] | None = None,
                       last_layers: Sequence[str] = ()) -> dict[str, Any]:
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
    wc, oc = (corrections or {}).get("weight_correction"), (corrections or {}).get("output_correction")
    lasts = last_layer_names(names, last_layers)
    last = lasts[0] if len(lasts) == 1 else (f"{len(lasts)} layers: {', '.join(lasts[:3])}"
                                             + (", ..." if len(lasts) > 3 else ""))
    first_last = {"same": "quantized like the other layers", "fp": "kept in floating point"}.get(
        pipeline.first_last, f"weights and inputs at {pipeline.first_last} bits")
    summary = (f"weights of {len(wl)} of {len(names)} quantizable layers ({', '.join(kinds)}; "
               f"{_describe_specs(wspecs) if wspecs else 'none'}); "
               + (f"input activations of {len(al)} layers ({_describe_specs(aspecs)})" if al else "no activations")
               + f"; first ({names[0]}) and last ({last}) layer: {first_last}"
               + f"; {len(folded)} BatchNorm layers folded"
               + (f"; weight bias correction: {wc.summary}" if wc is not None else "")
               + (f"; {oc.name} output correction: {oc.summary}" if oc is not None else "")
               + ("; biases of layers with quantized inputs rounded to int32 at input x weight scale (-o bias=int32)"
                  if pipeline.bias == "int32" else "")
               + f"; not quantized: {'' if pipeline.bias == 'int32' else 'biases, '}norms, residual sums, pooling, "
               "attention matmuls, softmax")
    return {"summary": summary, "weight_layers": wl, "act_layers": al, "fp_layers": fp,
            "activations": "inputs of quantized layers" if al else "none",
            "first_last": pipeline.first_last,
            "weight_granularity": sorted({s.granularity for s in wspecs}),  # type: ignore[union-attr]
            "act_granularity": act_gran, "bn_folded": [list(p) for p in folded],
            "weight_correction": pipeline.weight_correction,
            "act_correction": pipeline.act_correction,
            "bias": pipeline.bias,
            "deployable": deployable,
            "deployable_means": "per-tensor activation scales and an integer grid (no simulated-only features)"}


def build_result(config: RunConfig, plugin: str, method: Method, comps: dict[str, Any], model_name: str,
                 metric: str, fp_metrics: dict[str, float], quant_metrics: dict[str, float], cost: Cost,
                 plan: Plan, layers: dict[str, LayerInfo], pipeline: PipelineOptions,
                 folded: list[tuple[str, str]], seconds: dict[str, float], options: dict[str, Any],
                 data: dict[str, str], budget: Budget,
                 corrections: dict[str, Correction | None] | None = None,
                 last_layers: Sequence[str] = ()) -> dict[str, Any]:
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
        "quantized": describe_quantized(plan, layers, pipeline, folded, integer_grid, corrections, last_layers),
        "data": data, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "conventions": {"size_mb": "MiB; quantized weights at their bits, scales/zero points and all other "
                                   "parameters at 32 bits; after BN folding",
                        "bops": "per sample; conv/linear MACs (sparse convs: rule-book neighbour pairs x C_in x "
                                "C_out, on the example batch) x weight bits x activation bits (32 when FP)",
                        "bits_avg": "element-weighted over quantized tensors"},
        "seconds": seconds, "qcore_version": __version__, "seed": config.seed, "device": config.device,
        "calib_size": config.calib_size, "processes": qdist.world(),
    }
