"""Model loaders: ``zoo:NAME`` (qcore's trained models), ``tv:NAME`` (torchvision), ``timm:NAME`` (timm) and
``py:FILE.py:FUNCTION`` (the user's own code).

Weights come from ``--weights PATH`` (safetensors, or a torch state dict read with ``weights_only=True``)
or, for torchvision/timm without ``--weights``, from the library's own pretrained download when the network
allows. A checkpoint's classifier sets the number of classes. ``--model-arg key=value`` (``model_args``) are
keyword arguments of the torchvision/timm builder or of the user's function.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
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

    def override(self, given: Mapping[str, Any]) -> InputSpec:
        """This spec with the user's overrides (``RunConfig.input``: size, mean, std, channels) applied.

        One mean/std value stands for every channel; otherwise there must be one per channel.
        """
        if not given:
            return self
        channels = int(given.get("channels", self.channels))
        if channels not in (1, 3):
            raise QcoreError(f"--channels {channels}: images can be fed to 1-channel (grey) or 3-channel (RGB) "
                             "models only")
        norm: dict[str, tuple[float, ...]] = {}
        for key in ("mean", "std"):
            values = tuple(float(v) for v in given.get(key, getattr(self, key)))
            if len(values) == 1:
                values = values * channels
            elif len(values) != channels:
                if key in given:
                    raise QcoreError(f"--{key} has {len(values)} values but the model takes {channels} channel(s); "
                                     f"give one value for all channels or {channels}")
                raise QcoreError(f"the model's {key} {values} has {len(values)} values but --channels is {channels}; "
                                 f"give --mean and --std for {channels} channel(s)")
            norm[key] = values
        return InputSpec(channels, int(given.get("size", self.size)), norm["mean"], norm["std"], self.crop_pct)


@dataclass
class LoadedModel:
    model: nn.Module
    input: InputSpec
    num_classes: int
    weights: str


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("(no message)" for one without: ``EOFError()``)."""
    return (str(exc).strip().splitlines() or ["(no message)"])[0][:200]


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
            with warnings.catch_warnings():  # a raw pickle is refused below; torch's note on its protocol is noise
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        problem = "the file is empty" if path.stat().st_size == 0 else f"{type(exc).__name__}: {_first_line(exc)[:120]}"
        raise QcoreError(f"cannot read weights file {path} ({problem}); pass a safetensors file or a torch state "
                         "dict saved with torch.save") from None
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


_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")


def construct(build: Callable[..., Any], args: Mapping[str, Any], what: str, user_code: bool = False) -> Any:
    """Call ``build(**args)``. A keyword the constructor does not take, or a failure caused by the arguments (or,
    with ``user_code``, by any code of the user's), becomes a one-line :class:`QcoreError` that names it."""
    try:
        return build(**args)
    except Exception as exc:
        match = _UNEXPECTED.search(str(exc)) if isinstance(exc, TypeError) else None
        if match and match.group(1) in args:
            key = match.group(1)
            raise QcoreError(f"{what} takes no constructor argument {key!r}; remove --model-arg {key}=... (or "
                             "model_args: in the recipe) or fix its spelling") from None
        if not args and not user_code:
            raise
        log.info("building %s failed", what, exc_info=True)
        given = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
        raise QcoreError(f"could not build {what} with {given} ({type(exc).__name__}: {_first_line(exc)}); "
                         "check --model-arg (-v shows the traceback)") from None


def _reserved(args: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key in args:
            raise QcoreError(f"--model-arg {key} is set by qcore for {what}; use --weights PATH for your weights")


def load_zoo(name: str, weights: Path | None, model_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """One of qcore's own models, with its shipped weights unless ``weights`` is given."""
    from qcore_classification.zoo.models import ARCHITECTURES, INPUTS

    if name not in ARCHITECTURES:
        raise QcoreError(f"unknown zoo model {name!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    if model_args:
        raise QcoreError(f"zoo models are built as trained and take no --model-arg (got {', '.join(model_args)}); "
                         "use tv:, timm: or py: for a model with your own constructor arguments")
    build = ARCHITECTURES[name]
    if weights is None:
        ref = resources.files("qcore_classification") / "zoo" / "weights" / f"{name}.safetensors"
        if not ref.is_file():
            raise QcoreError(f"zoo model {name!r} has no shipped weights yet; train them with python -m "
                             f"qcore_classification.zoo.train --arch {name} ... and pass --weights PATH")
        with resources.as_file(ref) as path:
            model, classes = _from_weights(build, Path(path), 10)
        source = f"shipped zoo weights ({name}.safetensors)"
    else:
        model, classes = _from_weights(build, weights, 10)
        source = str(weights)
    channels, size = INPUTS[name]
    spec = InputSpec(channels, size, (FMNIST_MEAN,) * channels, (FMNIST_STD,) * channels, crop_pct=1.0)
    return LoadedModel(model.eval(), spec, classes, source)


def load_torchvision(name: str, weights: Path | None, model_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """A torchvision classification model built with ``model_args``; pretrained weights are downloaded only
    without ``--weights``. A ``num_classes`` model argument is the class count when no checkpoint says it."""
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        raise QcoreError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from None
    args = dict(model_args or {})
    _reserved(args, ("weights",), f"tv:{name}")
    default_classes = int(args.pop("num_classes", 1000))
    spec = InputSpec(3, 224, IMAGENET_MEAN, IMAGENET_STD)
    what = f"tv:{name}"
    if weights is not None:
        model, classes = _from_weights(lambda n: construct(
            lambda **kw: torchvision.models.get_model(name, weights=None, num_classes=n, **kw), args, what),
            weights, default_classes)
        return LoadedModel(model.eval(), spec, classes, str(weights))
    if "num_classes" in (model_args or {}):
        args["num_classes"] = default_classes
    # an argument the builder refuses is the user's mistake: say so before downloading anything
    construct(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), args, what)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT", **args)
    except Exception as exc:
        raise QcoreError(f"could not get pretrained weights for tv:{name} ({type(exc).__name__}; offline?); "
                         "pass --weights PATH to a state dict") from None
    return LoadedModel(model.eval(), spec, _num_classes(model), "torchvision DEFAULT weights")


def load_timm(name: str, weights: Path | None, model_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """A timm model built with ``model_args`` (e.g. ``img_size``, ``patch_size``); pretrained weights are
    downloaded only without ``--weights``."""
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        raise MissingDependencyError("timm", "pip install timm", "timm: models") from None
    if not timm.is_model(name):
        raise QcoreError(f"unknown timm model {name!r}; see timm.list_models()")
    args = dict(model_args or {})
    _reserved(args, ("pretrained", "pretrained_cfg"), f"timm:{name}")
    default_classes = int(args.pop("num_classes", 1000))
    what = f"timm:{name}"
    if weights is not None:
        model, classes = _from_weights(lambda n: construct(
            lambda **kw: timm.create_model(name, pretrained=False, num_classes=n, **kw), args, what),
            weights, default_classes)
        source = str(weights)
    else:
        if "num_classes" in (model_args or {}):
            args["num_classes"] = default_classes
        construct(lambda **kw: timm.create_model(name, pretrained=False, **kw), args, what)  # before downloading
        try:
            model = timm.create_model(name, pretrained=True, **args)
        except Exception as exc:
            raise QcoreError(f"could not get pretrained weights for timm:{name} ({type(exc).__name__}; offline?); "
                             "pass --weights PATH to a state dict") from None
        classes, source = model.num_classes, "timm pretrained weights"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, _ = cfg.get("input_size", (3, 224, 224))
    spec = InputSpec(c, h, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                     float(cfg.get("crop_pct", 0.875)))
    return LoadedModel(model.eval(), spec, classes, source)


@contextlib.contextmanager
def _importable_from(folder: Path) -> Iterator[None]:
    """Let the user's file import its neighbours while it runs."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _run_user_file(path: Path) -> ModuleType:
    """Execute the user's Python file as a fresh module (this runs their code) and return it."""
    module_name = "qcore_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise QcoreError(f"{path} is not a Python file; --model py: needs py:path/to/file.py:function")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        with _importable_from(path.resolve().parent):
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        log.info("running %s failed", path, exc_info=True)
        raise QcoreError(f"running {path} failed ({type(exc).__name__}: {_first_line(exc)}); fix that file "
                         "(-v shows the traceback)") from None
    return module


def _num_classes(model: nn.Module) -> int:
    """The class count a model predicts: its ``num_classes`` or its classifier's outputs (0 when unknown)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    head = _classifier_name(model)
    return int(getattr(model.get_submodule(head), "out_features", 0)) if head else 0


def load_python(name: str, weights: Path | None, model_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """The user's own model: ``name`` is ``path/to/file.py:function``. Runs that file, calls
    ``function(**model_args)`` and expects a ``torch.nn.Module``; ``weights`` (if given) are loaded strictly.

    The input defaults to 3x224 with ImageNet mean/std; ``--input-size``/``--mean``/``--std``/``--channels`` say
    otherwise.
    """
    file, sep, func = name.rpartition(":")
    if not sep or not file or not func:
        raise QcoreError(f"--model py:{name} needs the form py:path/to/file.py:function")
    path = Path(file).expanduser()
    if not path.is_file():
        raise QcoreError(f"model file {path} does not exist; --model py: needs py:path/to/file.py:function")
    module = _run_user_file(path)
    fn = getattr(module, func, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        problem = "defines no function" if fn is None else "has a non-callable"
        raise QcoreError(f"{path} {problem} {func!r}; functions defined there: {', '.join(found) or 'none'}")
    what = f"py:{name}"
    model = construct(fn, dict(model_args or {}), what, user_code=True)
    if not isinstance(model, nn.Module):
        raise QcoreError(f"{func}() in {path} returned {type(model).__name__}, not a torch.nn.Module; return the "
                         "model it builds")
    classes = _num_classes(model)
    source = f"{what} as built (no --weights)"
    if weights is not None:
        model, _ = _from_weights(lambda n: model, weights, classes)
        source = str(weights)
    return LoadedModel(model.eval(), InputSpec(3, 224, IMAGENET_MEAN, IMAGENET_STD), classes, source)


LOADERS: dict[str, tuple[Callable[[str, Path | None, Mapping[str, Any] | None], LoadedModel], str]] = {
    "zoo": (load_zoo, "qcore's models trained on Fashion-MNIST (fmnist_resnet, fmnist_vit, fmnist_tv_resnet18, "
                       "fmnist_tv_mobilenetv2), weights shipped"),
    "tv": (load_torchvision, "torchvision classification models (tv:resnet18, tv:mobilenet_v2, ...)"),
    "timm": (load_timm, "timm models (timm:deit_tiny_patch16_224, timm:resnet50, ...)"),
    "py": (load_python, "your own model: py:path/to/file.py:function runs that file and calls "
                        "function(**model_args), which returns a torch.nn.Module"),
}
