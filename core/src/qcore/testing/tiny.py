"""Tiny models and a data-free task (``tiny``) for fast plugin tests."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from qcore import hookimpl
from qcore._components import RunConfig, Task, TaskInstance
from qcore._devices import module_device
from qcore._errors import QcoreError
from qcore._plugins import Host, load_host


def tiny_convnet(seed: int = 0, classes: int = 4) -> nn.Module:
    """Conv-BN-ReLU x2, Flatten, Linear, for ``[B, 1, 8, 8]`` inputs; deterministic random weights chosen so
    that predictions on random inputs spread over all classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, classes))
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model[-1].bias.zero_()
    return model.eval()


def tiny_mlp(seed: int = 0, classes: int = 4) -> nn.Module:
    """Flatten-Linear-ReLU-Linear-ReLU-Linear for ``[B, 1, 8, 8]`` inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, classes))
    with torch.no_grad():
        model[-1].bias.zero_()
    return model.eval()


_MODELS = {"convnet": tiny_convnet, "mlp": tiny_mlp}


class TinyTask(Task):
    """Random ``[B, 1, 8, 8]`` inputs; the metric ``top1`` is agreement (%) with the FP model's own predictions,
    so FP scores 100 and quantization damage shows as a drop. ``--model tiny:convnet`` or ``tiny:mlp``."""

    name = "tiny"
    description = "data-free test task: agreement with the FP model's predictions on random inputs"

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        spec = config.model or "tiny:convnet"
        name = spec.partition(":")[2]
        if name not in _MODELS:
            raise QcoreError(f"unknown tiny model {spec!r}; use tiny:convnet or tiny:mlp")
        model = _MODELS[name](config.seed)
        g = torch.Generator().manual_seed(config.seed)
        calib = torch.randn(config.calib_size, 1, 8, 8, generator=g)
        evalx = torch.randn(config.eval_size or 256, 1, 8, 8, generator=g)
        with torch.no_grad():
            labels = model(evalx).argmax(1)
        bs = config.batch_size

        def batches(x: Tensor) -> list[Tensor]:
            return [x[i:i + bs] for i in range(0, x.shape[0], bs)]

        def forward(m: nn.Module, b: Tensor) -> Tensor:
            return m(b.to(module_device(m)))

        def evaluate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                pred = torch.cat([forward(m, b).argmax(1).cpu() for b in batches(evalx)])
            return {"top1": 100.0 * float((pred == labels).float().mean())}

        return TaskInstance(model=model, model_name=spec, metric="top1", forward=forward,
                            evaluate=evaluate, calibration=batches(calib), example=calib[:2],
                            data={"calibration": f"{config.calib_size} random N(0,1) inputs (seed {config.seed})",
                                  "evaluation": f"{evalx.shape[0]} random inputs; top1 = agreement with FP"})


#: A plugin object registering :class:`TinyTask`; pass it to :func:`make_host`.
TINY_TASK_PLUGIN = SimpleNamespace(qcore_register_tasks=hookimpl(lambda register: register(TinyTask)))


def make_host(*plugins: tuple[str, Any], entrypoints: bool = False, tiny: bool = True) -> Host:
    """A plugin host with the built-ins, the tiny task (unless ``tiny=False``) and ``plugins``
    (``(name, module_or_object)`` pairs); installed entry points only when ``entrypoints=True``."""
    extra: Iterable[tuple[str, Any]] = ((("tiny", TINY_TASK_PLUGIN),) if tiny else ()) + tuple(plugins)
    return load_host(entrypoints=entrypoints, extra=extra)
