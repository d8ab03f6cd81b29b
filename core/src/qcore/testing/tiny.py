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


class BasicBlock(nn.Module):
    """A residual block (conv-BN-ReLU-conv-BN, add, ReLU); its class name makes it a reconstruction unit."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem conv, two :class:`BasicBlock` of 8 channels, global average pooling, Linear to 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A :class:`TinyResNet` for ``[B, 1, 8, 8]`` inputs with deterministic weights and non-trivial BN
    statistics: the smallest model with residual blocks (for block reconstruction tests)."""
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_mlp(seed: int = 0, classes: int = 4) -> nn.Module:
    """Flatten-Linear-ReLU-Linear-ReLU-Linear for ``[B, 1, 8, 8]`` inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, classes))
    with torch.no_grad():
        model[-1].bias.zero_()
    return model.eval()


def tiny_gelu_mlp(seed: int = 0, classes: int = 6) -> nn.Module:
    """Flatten-Linear(64, 32)-GELU-Dropout-Linear(32, 24)-ReLU-Linear for ``[B, 1, 8, 8]`` inputs; three hidden
    channels of the GELU output are 30x larger than the rest (a transformer MLP's fc2 input in small: what input
    equalization, ``-o equalize=gelu``, is for). Layer names: ``1``, ``4`` (fed by the GELU), ``6``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 24),
                          nn.ReLU(), nn.Linear(24, classes))
    with torch.no_grad():
        model[1].weight[:3] *= 30.0
    return model.eval()


def tiny_gauss(seed: int = 0, classes: int = 128) -> nn.Module:
    """Flatten-Linear(64, ``classes``) without bias whose weight is drawn from N(0, 1): one layer with a
    Gaussian weight ``[classes, 64]``, for measuring a quantizer's SQNR through the pipeline
    (:func:`qcore.testing.check_quantizer`)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, 64, generator=g))
    return model.eval()


_MODELS = {"convnet": tiny_convnet, "mlp": tiny_mlp, "gauss": tiny_gauss}


class TinyTask(Task):
    """Random ``[B, 1, 8, 8]`` inputs; the metric ``top1`` is agreement (%) with the FP model's own predictions,
    so FP scores 100 and quantization damage shows as a drop. ``--model tiny:convnet``, ``tiny:mlp`` or
    ``tiny:gauss`` (one Linear layer with an N(0, 1) weight)."""

    name = "tiny"
    description = "data-free test task: agreement with the FP model's predictions on random inputs"

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        spec = config.model or "tiny:convnet"
        name = spec.partition(":")[2]
        if name not in _MODELS:
            raise QcoreError(f"unknown tiny model {spec!r}; use {', '.join('tiny:' + m for m in _MODELS)}")
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


def make_host(*plugins: tuple[str, Any], entrypoints: bool = False, tiny: bool = True,
              allow_broken: bool = False) -> Host:
    """A plugin host with the built-ins, the tiny task (unless ``tiny=False``) and ``plugins``
    (``(name, module_or_object)`` pairs); installed entry points only when ``entrypoints=True``.

    A plugin that is broken (fails to import, implements an unknown hook, registers something wrong or raises
    while registering) is an error here, naming the plugin and its error: a test of a plugin must not pass
    while the plugin is broken. ``allow_broken=True`` keeps broken plugins listed with their error instead,
    as ``qcore`` does at run time (for tests of how a broken plugin is reported).

    :raises QcoreError: a plugin is broken and ``allow_broken`` is False.
    """
    extra: Iterable[tuple[str, Any]] = ((("tiny", TINY_TASK_PLUGIN),) if tiny else ()) + tuple(plugins)
    host = load_host(entrypoints=entrypoints, extra=extra)
    broken = {name: record.error for name, record in host.plugins.items() if record.error}
    if broken and not allow_broken:
        raise QcoreError("broken plugin(s): " + "; ".join(f"{n!r}: {e}" for n, e in broken.items())
                         + "; fix them, or pass make_host(..., allow_broken=True) to test how they are reported")
    return host
