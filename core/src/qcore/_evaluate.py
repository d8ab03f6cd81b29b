"""``qcore eval`` and ``qcore export``: a saved ``.qcore`` model, rebuilt from what the file records, evaluated on its
task's evaluation data or written as ONNX, at a bit-width setting of a multi-bit model (``--w-bits``/``--a-bits``,
or per-layer bits from ``--bit-plan``), without recalibration.

The file records the run that made it (task, model, weights, data, input settings: :func:`qcore._saved.run_record`),
so the FP model and its evaluation split are rebuilt as that run built them (the task is built with the run's own
settings, so that a task whose evaluation split depends on them gets the same one; ``qcore eval`` uses no
calibration batch, ``qcore export`` one, to trace the model).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from qcore._components import RunConfig, TaskInstance
from qcore._errors import QcoreError
from qcore._options import build_options
from qcore._outputs import read_text_file
from qcore._pipeline import _check_device, check_sizes
from qcore._plugins import Host
from qcore._saved import load_quantized, read_meta
from qcore._switch import bits_in_effect, switchable_bits


@dataclass
class Rebuilt:
    """A ``.qcore`` file re-applied to its run's FP model: the run's settings, task instance and quantized model."""

    config: RunConfig
    instance: TaskInstance
    model: Any


def rebuild_saved(path: Path, host: Host, w_bits: int | None = None, a_bits: int | None = None,
                  bit_plan: Path | None = None, eval_size: int | None = None, batch_size: int | None = None,
                  device: str | None = None, data: str | None = None, weights: str | None = None,
                  what: str = "qcore eval") -> Rebuilt:
    """The quantized model saved in ``path``, rebuilt as the run that made it built its FP model and data (the
    flags override the recorded settings), switched to ``w_bits``/``a_bits`` or ``bit_plan`` when given."""
    meta = read_meta(path)
    rec = meta.get("run")
    if not isinstance(rec, dict):
        raise QcoreError(f"{path} does not record the run that made it (written by an older qcore); load it with "
                         "qcore.load(path, model, bits=...) in Python")
    if rec.get("task") == "python":
        raise QcoreError(f"{path} was made by qcore.quantize() from your own model and data: {what} cannot "
                         "rebuild them; use qcore.load(path, model, bits=(w, a)) in Python")
    values = {k: v for k, v in rec.items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    for key, flag in (("eval_size", eval_size), ("batch_size", batch_size), ("data", data), ("weights", weights),
                      ("device", device)):
        if flag is not None:
            values[key] = flag
    if values.get("weights") is not None:
        values["weights"] = Path(values["weights"])
    task_cls = host.get("task", values.get("task", "classification"))
    if values.get("batch_size") is None:
        values["batch_size"] = task_cls.default_batch_size
    if values.get("calib_size") is None:
        values["calib_size"] = task_cls.default_calib_size
    config = RunConfig(**values)
    check_sizes(config)  # the checks qcore run makes before building anything
    if config.eval_size is not None and config.eval_size < 1:
        raise QcoreError(f"--eval-size {config.eval_size} is out of range; use 1 or more")
    _check_device(config.device)
    plan = None
    if bit_plan is not None:
        text = read_text_file(bit_plan, "bit plan", "--bit-plan takes a plan.json (e.g. from qcore run --plugin rdoq)")
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QcoreError(f"--bit-plan {bit_plan} is not valid JSON ({exc.msg}); pass a plan.json") from None
    bits = None if (w_bits is None and a_bits is None) else (w_bits, a_bits)
    task = task_cls(build_options(task_cls.Options, {}, f"task {config.task!r}"))
    inst = task.build(config, host)
    qmodel = load_quantized(path, inst.model, host=host, device=config.device, bits=bits, plan=plan)
    return Rebuilt(config, inst, qmodel)


def evaluate_saved(path: Path, host: Host, w_bits: int | None = None, a_bits: int | None = None,
                   bit_plan: Path | None = None, eval_size: int | None = None, batch_size: int | None = None,
                   device: str | None = None, data: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Evaluate the ``.qcore`` file ``path`` as ``qcore eval`` does; returns the JSON it prints."""
    t0 = time.perf_counter()
    r = rebuild_saved(path, host, w_bits, a_bits, bit_plan, eval_size, batch_size, device, data, weights)
    inst = r.instance
    if inst.evaluate is None:
        raise QcoreError(f"task {r.config.task!r} has no evaluation to run")
    metrics = inst.evaluate(r.model)
    return {"file": str(path), "task": r.config.task, "model": inst.model_name, "metric": inst.metric,
            "quant": metrics.get(inst.metric), "quant_metrics": metrics,
            "bits": {"weights": w_bits, "acts": a_bits, "plan": str(bit_plan) if bit_plan else None},
            "bits_in_effect": bits_in_effect(r.model), "switchable_bits": switchable_bits(r.model),
            "data": inst.data,
            "seconds": round(time.perf_counter() - t0, 2)}


def export_saved(path: Path, onnx_path: Path, host: Host, w_bits: int | None = None, a_bits: int | None = None,
                 bit_plan: Path | None = None, int4: bool = True, data: str | None = None,
                 weights: str | None = None) -> dict[str, Any]:
    """``qcore export``: the ``.qcore`` file ``path`` (at a bit-width setting of a multi-bit model) as an ONNX QDQ
    file; one calibration batch of the run's data is the example input. Returns the JSON it prints."""
    from qcore._api import _first_input
    from qcore._onnx import export_onnx

    t0 = time.perf_counter()
    r = rebuild_saved(path, host, w_bits, a_bits, bit_plan, eval_size=1, device="cpu", data=data,
                      weights=weights, what="qcore export")
    first = next(iter(r.instance.calibration), None)
    if first is None:
        raise QcoreError(f"the run's task gave no calibration batch to trace {path} with; pass --data")
    example = _first_input(first)
    if not isinstance(example, Tensor):
        raise QcoreError(f"task {r.config.task!r} feeds its model {type(example).__name__} inputs; ONNX export "
                         "supports models with one tensor input")
    report = export_onnx(r.model, example[:2], onnx_path, int4=int4)
    return {"file": str(path), "onnx": str(onnx_path), "model": r.instance.model_name, "layers": len(report.layers),
            "int4_weights": len(report.int4_weights), "int4_inputs": report.int4_inputs,
            "per_channel_inputs": report.per_channel_acts, "int32_biases": len(report.int32_biases),
            "max_abs_diff": report.max_abs_diff,
            "bits": {"weights": w_bits, "acts": a_bits, "plan": str(bit_plan) if bit_plan else None},
            "bits_in_effect": bits_in_effect(r.model), "seconds": round(time.perf_counter() - t0, 2)}
