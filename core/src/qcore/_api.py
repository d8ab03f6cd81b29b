"""The Python API: quantize your own ``nn.Module`` with your own data, save it, load it again.

    import qcore
    q = qcore.quantize(model, loader, method="rdoq", target_bits=4, a_bits=4)
    q.save("model.qcore")
    m = qcore.load("model.qcore", build_model())

:func:`quantize` runs the same pipeline as ``qcore run`` (:func:`qcore._pipeline.execute`): the CLI's tasks
only build the model and data that you hand over here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore._components import RunConfig, TaskInstance
from qcore._devices import module_device, to_device
from qcore._errors import QcoreError
from qcore._pipeline import RunOutcome, calibration_samples, execute, prepare
from qcore._plugins import Host, load_host
from qcore._saved import load_quantized, saved_bytes
from qcore._spec import Plan

#: result.json keys that need an evaluation (left out of :attr:`Quantized.report` when none was given)
_EVAL_KEYS = ("metric", "fp", "quant", "fp_metrics", "quant_metrics")


@dataclass
class Quantized:
    """What :func:`quantize` returns.

    :param model: the quantized model (fake quantization, eval mode).
    :param plan: the plan it was made from (what ``qcore run --plan`` re-applies).
    :param report: result.json's keys: bits, size, BOPs, what was quantized, seconds per stage (and the FP and
        quantized metrics when ``evaluate`` was given).
    """

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    outcome: RunOutcome

    def save(self, path: str | Path, packed: bool = False) -> Path:
        """Write one ``.qcore`` file (plan, quantizer parameters, weights; safetensors, no pickle) to ``path``.

        With ``packed=True`` the weights of uniformly quantized layers are stored as packed integer codes
        (:mod:`qcore.packing`: int2/3/4... in their real bits, plus the per-row ranges already in the file)
        instead of float32; :func:`load` decodes them and the model's outputs are the same, bit for bit.
        Layers with another weight format or a weight correction keep float weights.
        """
        path = Path(path)
        assert self.outcome.ctx is not None
        data = saved_bytes(self.model, self.plan, self.outcome.ctx, packed=packed)
        try:
            path.write_bytes(data)
        except OSError as exc:
            raise QcoreError(f"cannot write {path}: {exc.strerror or exc}; choose another path") from None
        return path


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        raise QcoreError("calibration batches are dicts: pass forward=lambda model, batch: model(...) to say which "
                         "entries the model takes")
    return batch


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """Run ``model`` on a batch: a tensor, or a tuple/list whose first item is the input (``(x, y)`` from a
    DataLoader), moved to the model's device."""
    return model(to_device(_first_input(batch), module_device(model)))


def _batches(data: Any, batch_size: int) -> list[Any]:
    if isinstance(data, Tensor):  # one tensor of samples: split along the first dimension
        if data.dim() == 0 or data.shape[0] == 0:
            raise QcoreError("calib_data is an empty tensor; pass samples along its first dimension")
        return list(data.split(batch_size))
    if not isinstance(data, Iterable):
        raise QcoreError(f"calib_data must be a tensor or an iterable of batches (a DataLoader), got "
                         f"{type(data).__name__}")
    batches = list(data)
    if not batches:
        raise QcoreError("calib_data yielded no batch; pass at least one calibration batch")
    return batches


def quantize(model: nn.Module, calib_data: Any, method: str | None = None, *, plugin: str | None = None,
             w_bits: int | None = None, a_bits: int | None = None, target_bits: float | None = None,
             forward: Callable[[nn.Module, Any], Tensor] | None = None,
             evaluate: Callable[[nn.Module], dict[str, float]] | None = None, metric: str | None = None,
             options: Mapping[str, Any] | None = None, layers: Mapping[str, Any] | None = None,
             quantizer: str | None = None, calibrator: str | None = None, allocator: str | None = None,
             device: str = "cpu", seed: int = 0, batch_size: int = 64, host: Host | None = None) -> Quantized:
    """Quantize ``model`` with a registered method, calibrated on ``calib_data``.

    :param model: an FP model; it is not changed (the pipeline works on copies: its mode and device stay).
    :param calib_data: an iterable of batches (a DataLoader; each batch a tensor, a tuple/list whose first item is
        the input, or a dict when ``forward`` is given), or one tensor of samples (split into ``batch_size``).
        Read once; the batches are kept in memory for the run.
    :param method: a method name (``qcore list methods``), or ``plugin`` for a plugin's default; default
        ``uniform``.
    :param w_bits, a_bits, target_bits: the budget, as ``--w-bits``, ``--a-bits``, ``--target-bits``.
    :param forward: ``forward(model, batch) -> output`` (the tensor allocators compare with FP, e.g. logits);
        default: the model on the batch's input.
    :param evaluate: ``evaluate(model) -> {"metric": value, ...}`` for methods or reports that need a metric;
        ``metric`` names the headline key (default: the first).
    :param options: method options, as ``-o key=value``; ``layers``: per-layer overrides as in a YAML recipe.
    :param seed: seeds calibration sampling and the methods.
    """
    host = host or load_host()
    config = RunConfig(plugin=plugin, method=method or (None if plugin else "uniform"), task="python",
                       model=type(model).__name__, w_bits=w_bits, a_bits=a_bits, target_bits=target_bits,
                       batch_size=batch_size, device=device, seed=seed, quantizer=quantizer, calibrator=calibrator,
                       allocator=allocator, options=dict(options or {}), layers=dict(layers or {}))
    prep = prepare(config, host, None)  # every setting is checked before the data is read
    batches = _batches(calib_data, batch_size)
    n = calibration_samples(batches)
    if forward is None:  # the default forward reads only the input: keep just that (labels are not needed);
        batches = [_first_input(b) for b in batches]  # engines that batch candidates need plain tensors
    inst = TaskInstance(model=copy.deepcopy(model), model_name=type(model).__name__, metric=metric or "",
                        forward=forward or default_forward, evaluate=None,  # type: ignore[arg-type]
                        calibration=batches, example=batches[0],
                        data={"calibration": f"{n if n is not None else 'unknown number of'} samples in "
                                             f"{len(batches)} batches handed to qcore.quantize",
                              "evaluation": "the evaluate() given" if evaluate else "none (no evaluate given)"})
    if evaluate is not None:
        inst.evaluate = _Headline(evaluate, inst)
    outcome = execute(prep, inst)
    report = {k: v for k, v in outcome.result.items() if evaluate is not None or k not in _EVAL_KEYS}
    if evaluate is not None:
        report["metric"] = inst.metric
        report["fp"] = outcome.result["fp_metrics"].get(inst.metric)
        report["quant"] = outcome.result["quant_metrics"].get(inst.metric)
    model_out = outcome.model.eval()
    return Quantized(model=model_out, plan=outcome.plan, report=report, outcome=outcome)


class _Headline:
    """Wraps ``evaluate`` to check what it returns and to set the task's headline metric (the first key unless
    one was named)."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]], inst: TaskInstance) -> None:
        self.evaluate = evaluate
        self.inst = inst

    def __call__(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = self.evaluate(model)
        if not isinstance(out, Mapping) or not out:
            raise QcoreError(f"evaluate() must return a non-empty dict of metrics, got {out!r}")
        if self.inst.metric and self.inst.metric not in out:
            raise QcoreError(f"metric {self.inst.metric!r} is not among evaluate()'s keys: {', '.join(out)}")
        self.inst.metric = self.inst.metric or str(next(iter(out)))
        return {str(k): float(v) for k, v in out.items()}


def load(path: str | Path, model: nn.Module, device: str = "cpu", host: Host | None = None,
         bits: tuple[int | None, int | None] | None = None, plan: Plan | dict[str, Any] | None = None,
         packed: bool = False) -> nn.Module:
    """The quantized model saved in ``path`` (by :meth:`Quantized.save` or ``qcore run``'s ``model.qcore``),
    re-applied to ``model``, a freshly built FP model of the same architecture (copied, not changed). Its
    outputs equal the saved model's exactly. Safe: safetensors and JSON, nothing unpickled.

    A multi-bit model (one calibrated for several bit-widths, e.g. ``--plugin ptmq``) serves any setting it
    holds without data or recalibration: ``bits=(w_bits, a_bits)`` selects one everywhere (None keeps a role as
    saved), ``plan`` selects per-layer bits (a :class:`Plan` or a ``plan.json`` dict; see :func:`select_bits`).

    With ``packed=True`` the layers whose weights a packed file stores as codes hold only those packed codes and
    their per-channel parameters in memory, not float weights (:func:`qcore.packing.pack_layers`; for inference).

    .. versionchanged:: 0.1 ``bits`` and ``plan``; ``packed`` (plugin API 1, additions)
    """
    return load_quantized(path, model, host=host, device=device, bits=bits, plan=plan, packed=packed)
