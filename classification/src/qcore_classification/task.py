"""The ``classification`` task: a model from a loader, calibration and evaluation data, top-1/top-5."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from qcore import QcoreError, RunConfig, Task, TaskInstance, module_device, track
from qcore_classification.data import ClassificationData, load_data
from qcore_classification.loaders import InputSpec

log = logging.getLogger(__name__)
DEFAULT_MODEL = "zoo:fmnist_resnet"


def forward(model: nn.Module, batch: Tensor) -> Tensor:
    """Logits of ``model`` on one batch of adapted inputs (the distortion target for allocators)."""
    return model(batch.to(module_device(model)))


@torch.no_grad()
def evaluate(model: nn.Module, data: ClassificationData) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in percent."""
    model.eval()
    dev = module_device(model)
    n = c1 = c5 = 0
    for x, y in track(data.evaluation(), desc="evaluate", unit="batch"):
        logits = model(x.to(dev))
        y = y.to(dev)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(dim=1).sum())
        n += y.numel()
    if n == 0:
        raise QcoreError("the evaluation set is empty; check --data and --eval-size")
    out = {"top1": 100.0 * c1 / n}
    if data.num_classes >= 5:
        out["top5"] = 100.0 * c5 / n
    return out


@torch.no_grad()
def _check_runs(model: nn.Module, example: Tensor, name: str, spec: InputSpec) -> None:
    """Run the FP model on two inputs so that an input it cannot take is a user error, not a traceback later."""
    try:
        out = model(example)
    except Exception as exc:
        log.info("%s fails on its input", name, exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise QcoreError(f"model {name} fails on {spec.channels}x{spec.size}x{spec.size} inputs "
                         f"({type(exc).__name__}: {first}); give the input it takes with --input-size/--channels "
                         "(and its --model-arg)") from None
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise QcoreError(f"model {name} returns {getattr(out, 'shape', type(out).__name__)}, not logits of shape "
                         "[batch, classes]; return the logits from forward")


class ClassificationTask(Task):
    """Image classification: ``--model PREFIX:NAME`` (zoo, tv, timm, py), ``--data``, metric top-1; takes
    ``--input-size``/``--mean``/``--std``/``--channels`` and ``--model-arg``."""

    name = "classification"
    accepts = frozenset({"input", "model_args"})
    description = ("image classification (torchvision, timm, qcore zoo, your own py: code); metric top-1; "
                   "default: embedded Fashion-MNIST")

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        spec = config.model or DEFAULT_MODEL
        prefix, sep, name = spec.partition(":")
        if not sep or not name:
            raise QcoreError(f"--model {spec!r} needs the form PREFIX:NAME, e.g. zoo:fmnist_resnet or tv:resnet18")
        loader = host.model_loader(self.name, prefix)
        loaded = loader.load(name, config.weights, config)
        spec_in = loaded.input.override(config.input)
        if config.eval_size is not None and config.eval_size < 1:
            raise QcoreError("--eval-size must be at least 1")
        data = load_data(config.data, spec_in, config.calib_size, config.eval_size, config.batch_size,
                         config.seed)
        if 0 < loaded.num_classes < data.num_classes:
            raise QcoreError(f"the data has {data.num_classes} classes but the model predicts {loaded.num_classes}; "
                             "pass --weights trained for this data")
        example = data.calibration[0][:2]
        _check_runs(loaded.model, example, spec, spec_in)
        data.description["weights"] = loaded.weights
        data.description["input"] = (f"{spec_in.channels}x{spec_in.size}x{spec_in.size}, normalised with mean "
                                     f"{spec_in.mean} std {spec_in.std}"
                                     + (f" (given: {', '.join(sorted(config.input))})" if config.input else ""))
        if config.model_args:
            data.description["model_args"] = ", ".join(f"{k}={v!r}" for k, v in config.model_args.items())
        return TaskInstance(model=loaded.model, model_name=spec, metric="top1", forward=forward,
                            evaluate=lambda m: evaluate(m, data), calibration=data.calibration,
                            example=example, data=data.description)
