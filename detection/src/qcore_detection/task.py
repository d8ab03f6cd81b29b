"""The ``detection`` task: a LiDAR detector from a model loader (``zoo:`` embedded, ``pcdet:`` OpenPCDet),
calibration scenes from a training split, nuScenes-style mean AP on an evaluation split."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from qcore import QcoreError, RunConfig, Task, TaskInstance

log = logging.getLogger(__name__)

DEFAULT_MODEL = "zoo:voxelnext_lite"
#: tiles per calibration scene that ``-o curve_tiles`` accepts (:func:`qcore_detection.zoo.scene_tiles`)
CURVE_TILES = (1, 2, 4)


@dataclass(frozen=True)
class DetectionOptions:
    target: Literal["bev", "head"] = field(default="bev", metadata={
        "help": "distortion target allocators compare with FP: the dense BEV features after the backbone "
                "(the RDOQ seed's choice) or the head outputs"})
    workers: int = field(default=4, metadata={"help": "data-loader worker processes (OpenPCDet datasets)"})
    curve_tiles: Literal[1, 2, 4] = field(default=1, metadata={
        "help": "samples per calibration scene for estimators that draw random directions per sample (RDOQ's "
                "engine=second-order): 1 the scene, 2 its halves x<0 / x>=0, 4 its quadrants around the sensor, "
                "each a separate sample (zoo: models); the cross terms between tiles, noise in that estimator, "
                "drop out at about the same backward cost"})

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise QcoreError(f"workers={self.workers} must be 0 or more")
        object.__setattr__(self, "curve_tiles", parse_curve_tiles(self.curve_tiles))  # the Python API's 4.0: 4


class DetectionTask(Task):
    """LiDAR 3D detection: ``--model zoo:voxelnext_lite`` (default, synthetic LiDAR) or
    ``--model pcdet:CFG.yaml --weights CKPT --data DIR`` (OpenPCDet, when installed); metric mean AP."""

    name = "detection"
    description = ("LiDAR 3D detection (spconv); metric nuScenes-style mAP; default: embedded VoxelNeXt-style "
                   "detector on synthetic LiDAR; OpenPCDet configs via pcdet:")
    Options = DetectionOptions
    default_calib_size = 16
    default_batch_size = 4

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        spec = config.model or DEFAULT_MODEL
        prefix, sep, name = spec.partition(":")
        if not sep or not name:
            raise QcoreError(f"--model {spec!r} needs the form PREFIX:NAME, e.g. zoo:voxelnext_lite or "
                             "pcdet:cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml")
        tiles = curve_tiles(config)
        if tiles != 1 and prefix != "zoo":
            raise QcoreError(f"-o curve_tiles applies to the embedded detectors (--model zoo:NAME), not {prefix}:; "
                             "drop it")
        if tiles != 1:
            unused = _tiles_unused(config, host)
            if unused:
                log.warning("-o curve_tiles=%d has no effect: %s; only RDOQ's projected second-order curves "
                            "(--method rdoq -o engine=second-order -o projections=K) draw directions per tile",
                            tiles, unused)
        loader = host.model_loader(self.name, prefix)
        setup = loader.load(name, config.weights, config)
        if not setup.calibration:
            raise QcoreError("the calibration set is empty; raise --calib-size")
        split = setup.split
        if split is not None and tiles != 1:
            split = functools.partial(split, tiles=tiles)
        return TaskInstance(model=setup.model, model_name=spec, metric=setup.metric, forward=setup.target,
                            evaluate=setup.evaluate, calibration=setup.calibration, example=setup.calibration[0],
                            data=setup.data, untraceable="sparse-convolution detectors: spconv tensors do not trace",
                            last_layers=setup.last_layers, grad_context=lambda: _grad_guard(setup.model),
                            split=split, split_unit="per sample" if tiles == 1 else f"per tile ({tiles} per scene)",
                            forward_key={"target": str(config.options.get("target", "bev"))})


def parse_curve_tiles(raw: Any) -> int:
    """The ``-o curve_tiles`` value ``raw`` (a ``-o`` string, a YAML or Python number) as one of
    :data:`CURVE_TILES`, converted as core converts the option's ``Literal`` type (``"4"``, ``4`` and ``4.0`` are
    4; ``"04"``, ``"abc"`` and ``3`` are refused with a :class:`QcoreError`)."""
    for tiles in CURVE_TILES:
        if raw == tiles or str(raw) == str(tiles):
            return tiles
    raise QcoreError(f"curve_tiles={raw} is not supported; use one of {', '.join(map(str, CURVE_TILES))}")


def curve_tiles(config: RunConfig) -> int:
    """``-o curve_tiles`` of ``config`` (1 when not given): :func:`parse_curve_tiles`."""
    return parse_curve_tiles(config.options.get("curve_tiles", 1))


def _tiles_unused(config: RunConfig, host: Any) -> str | None:
    """Why ``-o curve_tiles`` changes nothing in the run ``config`` asks for (None: it is used): only RDOQ's
    second-order engine calls the task's ``split`` (its projected curves; the exact expansion refuses batches
    that are not tensors)."""
    try:
        method = host.get("method", config.method) if config.method else \
            host.default_method(config.plugin or "uniform")
    except QcoreError:  # an unknown method or plugin: the run's own check says so
        return None
    allocator = config.allocator or method.allocator
    engine = {**method.defaults, **config.options}.get("engine")
    if allocator != "rdoq":
        return f"allocator {allocator!r} does not use it"
    if engine != "second-order":
        return f"RDOQ's engine is {engine or 'the default'!s}, not second-order"
    return None


def _grad_guard(model: Any) -> Any:
    """spconv's CPU kernels need :func:`~qcore_detection.spconv_layers.spconv_cpu_guard` around backward passes
    too (one thread; no CUDA stream lookup without CUDA); imported here so the task loads without spconv."""
    from qcore import module_device
    from qcore_detection.spconv_layers import spconv_cpu_guard

    return spconv_cpu_guard(module_device(model))
