"""qcore hook implementations of the detection plugin: the ``detection`` task, its model loaders (``zoo:``,
``pcdet:``) and spconv's sparse convolutions as quantizable layers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn

from qcore import LayerInfo, LayerSpec, MissingDependencyError, ModelLoader, RunConfig, RunContext, hookimpl


@hookimpl
def qcore_register_tasks(register: Any) -> None:
    from qcore_detection.task import DetectionTask

    register(DetectionTask)


def _pcdet(name: str, weights: Path | None, config: RunConfig) -> Any:
    from qcore_detection import pcdet_adapter

    return pcdet_adapter.load(name, weights, config)


def _zoo(name: str, weights: Path | None, config: RunConfig) -> Any:
    from qcore_detection.zoo import load_zoo

    return load_zoo(name, weights, config)


@hookimpl
def qcore_register_model_loaders(register: Any) -> None:
    register(ModelLoader("zoo", "detection", _zoo, "qcore's embedded VoxelNeXt-style detectors "
                         "(zoo:voxelnext_lite, zoo:voxelnext_nuscenes_like)"))
    register(ModelLoader("pcdet", "detection", _pcdet,
                         "an OpenPCDet config (pcdet:CFG.yaml) with --weights CKPT --data DIR; needs OpenPCDet"))


@functools.cache
def _spconv_layers() -> Any:
    """``qcore_detection.spconv_layers``, or None when no spconv build is installed (qcore-detection without its
    ``[cpu]``/``[cu1xx]`` extra): a model then has no spconv layer, and other tasks run as without this plugin."""
    try:
        from qcore_detection import spconv_layers
    except MissingDependencyError:
        return None
    return spconv_layers


@hookimpl
def qcore_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    layers = _spconv_layers()
    return layers.spconv_layer_info(module, name) if layers is not None else None


@hookimpl
def qcore_wrap_module(module: nn.Module, info: LayerInfo, spec: LayerSpec, ctx: RunContext) -> nn.Module | None:
    layers = _spconv_layers()
    return layers.spconv_wrap_module(module, info, spec, ctx) if layers is not None else None
