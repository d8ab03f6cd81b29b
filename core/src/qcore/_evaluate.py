"""``qcore eval``: evaluate a saved ``.qcore`` model on its task's evaluation data, at a bit-width setting of a
multi-bit model (``--w-bits``/``--a-bits``, or per-layer bits from ``--bit-plan``), without recalibration.

The file records the run that made it (task, model, weights, data, input settings: :func:`qcore._saved.run_record`),
so the FP model and its evaluation split are rebuilt as that run built them (the task is built with the run's own settings, so
that a task whose evaluation split depends on them gets the same one; its calibration batches are not used).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from qcore._components import RunConfig
from qcore._errors import QcoreError
from qcore._options import build_options
from qcore._outputs import read_text_file
from qcore._plugins import Host
from qcore._saved import load_quantized, read_meta
from qcore._switch import switchable_bits


def evaluate_saved(path: Path, host: Host, w_bits: int | None = None, a_bits: int | None = None,
                   bit_plan: Path | None = None, eval_size: int | None = None, batch_size: int | None = None,
                   device: str | None = None, data: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Evaluate the ``.qcore`` file ``path`` as ``qcore eval`` does; returns the JSON it prints."""
    meta = read_meta(path)
    rec = meta.get("run")
    if not isinstance(rec, dict):
        raise QcoreError(f"{path} does not record the run that made it (written by an older qcore); load it with "
                         "qcore.load(path, model, bits=...) and evaluate in Python")
    if rec.get("task") == "python":
        raise QcoreError(f"{path} was made by qcore.quantize() from your own model and data: qcore eval cannot "
                         "rebuild them; use qcore.load(path, model, bits=(w, a)) and your own evaluation")
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
    plan = None
    if bit_plan is not None:
        text = read_text_file(bit_plan, "bit plan", "--bit-plan takes a plan.json (e.g. from qcore run --plugin rdoq)")
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QcoreError(f"--bit-plan {bit_plan} is not valid JSON ({exc.msg}); pass a plan.json") from None
    bits = None if (w_bits is None and a_bits is None) else (w_bits, a_bits)
    task = task_cls(build_options(task_cls.Options, {}, f"task {config.task!r}"))
    t0 = time.perf_counter()
    inst = task.build(config, host)
    if inst.evaluate is None:
        raise QcoreError(f"task {config.task!r} has no evaluation to run")
    qmodel = load_quantized(path, inst.model, host=host, device=config.device, bits=bits, plan=plan)
    metrics = inst.evaluate(qmodel)
    return {"file": str(path), "task": config.task, "model": inst.model_name, "metric": inst.metric,
            "quant": metrics.get(inst.metric), "quant_metrics": metrics,
            "bits": {"weights": w_bits, "acts": a_bits, "plan": str(bit_plan) if bit_plan else None},
            "switchable_bits": switchable_bits(qmodel), "data": inst.data,
            "seconds": round(time.perf_counter() - t0, 2)}
