"""Model loaders: ``zoo:NAME`` (qcore's trained models), ``tv:NAME`` (torchvision), ``timm:NAME`` (timm).

Weights come from ``--weights PATH`` (safetensors, or a torch state dict read with ``weights_only=True``)
or, for torchvision/timm without ``--weights``, from the library's own pretrained download when the network
allows. A checkpoint's classifier sets the number of classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore import MissingDependencyError, QcoreError
from qcore_classification.fashion_mnist import MEAN as FMNIST_MEAN
from qcore_classification.fashion_mnist import STD as FMNIST_STD

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: channels, square size, per-channel normalisation of [0, 1] pixels."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875


@dataclass
class LoadedModel:
    model: nn.Module
    input: InputSpec
    num_classes: int
    weights: str


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or a torch checkpoint with ``weights_only=True``.

    Checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a
    ``module.`` prefix (DataParallel) is removed.
    """
    if not path.is_file():
        raise QcoreError(f"weights file {path} does not exist; check --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise QcoreError(f"cannot read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                         "pass a safetensors file or a torch state dict saved with torch.save") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QcoreError(f"weights file {path} holds no state dict of tensors; save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in model.named_modules():
            if m is head:
                return name
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def _classes_in(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    head = _classifier_name(model)
    w = state.get(f"{head}.weight") if head else None
    return int(w.shape[0]) if w is not None else None


def load_with_state(build: Callable[[int], nn.Module], state: dict[str, torch.Tensor], default_classes: int,
                    source: str) -> tuple[nn.Module, int]:
    """Build a model whose class count matches ``state`` and load ``state`` into it strictly."""
    model = build(default_classes)
    classes = _classes_in(state, model) or default_classes
    if classes != default_classes:
        model = build(classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise QcoreError(f"weights {source} do not fit the model ({' '.join(first[:2])[:200]}); check --model "
                         "and --weights belong together") from None
    return model, classes


def _non_finite(state: dict[str, torch.Tensor]) -> str | None:
    for k, v in state.items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            return k
    return None


def _from_weights(build: Callable[[int], nn.Module], weights: Path, default_classes: int) -> tuple[nn.Module, int]:
    state = read_state_dict(weights)
    bad = _non_finite(state)
    if bad:
        raise QcoreError(f"weights file {weights} has NaN or infinite values in {bad!r}; the file is corrupt")
    return load_with_state(build, state, default_classes, str(weights))


def load_zoo(name: str, weights: Path | None) -> LoadedModel:
    """One of qcore's own models, with its shipped weights unless ``weights`` is given."""
    from qcore_classification.zoo.models import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise QcoreError(f"unknown zoo model {name!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    build = ARCHITECTURES[name]
    if weights is None:
        ref = resources.files("qcore_classification") / "zoo" / "weights" / f"{name}.safetensors"
        with resources.as_file(ref) as path:
            model, classes = _from_weights(build, Path(path), 10)
        source = f"shipped zoo weights ({name}.safetensors)"
    else:
        model, classes = _from_weights(build, weights, 10)
        source = str(weights)
    return LoadedModel(model.eval(), InputSpec(1, 28, (FMNIST_MEAN,), (FMNIST_STD,), crop_pct=1.0), classes, source)


def load_torchvision(name: str, weights: Path | None) -> LoadedModel:
    """A torchvision classification model; pretrained weights are downloaded only without ``--weights``."""
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        raise QcoreError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from None
    spec = InputSpec(3, 224, IMAGENET_MEAN, IMAGENET_STD)
    if weights is not None:
        model, classes = _from_weights(lambda n: torchvision.models.get_model(name, weights=None, num_classes=n),
                                       weights, 1000)
        return LoadedModel(model.eval(), spec, classes, str(weights))
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as exc:
        raise QcoreError(f"could not get pretrained weights for tv:{name} ({type(exc).__name__}; offline?); "
                         "pass --weights PATH to a state dict") from None
    return LoadedModel(model.eval(), spec, 1000, "torchvision DEFAULT weights")


def load_timm(name: str, weights: Path | None) -> LoadedModel:
    """A timm model; pretrained weights are downloaded only without ``--weights``."""
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        raise MissingDependencyError("timm", "pip install timm", "timm: models") from None
    if not timm.is_model(name):
        raise QcoreError(f"unknown timm model {name!r}; see timm.list_models()")
    if weights is not None:
        model, classes = _from_weights(lambda n: timm.create_model(name, pretrained=False, num_classes=n),
                                       weights, 1000)
        source = str(weights)
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:
            raise QcoreError(f"could not get pretrained weights for timm:{name} ({type(exc).__name__}; offline?); "
                             "pass --weights PATH to a state dict") from None
        classes, source = model.num_classes, "timm pretrained weights"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, _ = cfg.get("input_size", (3, 224, 224))
    spec = InputSpec(c, h, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                     float(cfg.get("crop_pct", 0.875)))
    return LoadedModel(model.eval(), spec, classes, source)


LOADERS: dict[str, tuple[Callable[[str, Path | None], LoadedModel], str]] = {
    "zoo": (load_zoo, "qcore's models trained on Fashion-MNIST (fmnist_resnet, fmnist_vit), weights shipped"),
    "tv": (load_torchvision, "torchvision classification models (tv:resnet18, tv:mobilenet_v2, ...)"),
    "timm": (load_timm, "timm models (timm:deit_tiny_patch16_224, timm:resnet50, ...)"),
}
