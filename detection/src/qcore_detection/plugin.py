"""qcore hook implementations of the detection plugin: the ``detection`` task, its model loaders (``zoo:``,
``pcdet:``) and spconv's sparse convolutions as quantizable layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qcore import LayerInfo, LayerSpec, ModelLoader, RunConfig, RunContext, hookimpl


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
    register(ModelLoader("zoo", "detection", _zoo, "qcore's embedded VoxelNeXt-style detector (zoo:voxelnext_lite)"))
    register(ModelLoader("pcdet", "detection", _pcdet,
                         "an OpenPCDet config (pcdet:CFG.yaml) with --weights CKPT --data DIR; needs OpenPCDet"))


@hookimpl
def qcore_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    from qcore_detection.spconv_layers import spconv_layer_info

    return spconv_layer_info(module, name)


@hookimpl
def qcore_wrap_module(module: nn.Module, info: LayerInfo, spec: LayerSpec, ctx: RunContext) -> nn.Module | None:
    from qcore_detection.spconv_layers import spconv_wrap_module

    return spconv_wrap_module(module, info, spec, ctx)
