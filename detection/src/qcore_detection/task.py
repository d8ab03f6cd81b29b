"""The ``detection`` task: a LiDAR detector from a model loader (``zoo:`` embedded, ``pcdet:`` OpenPCDet),
calibration scenes from a training split, nuScenes-style mean AP on an evaluation split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qcore import QcoreError, RunConfig, Task, TaskInstance

DEFAULT_MODEL = "zoo:voxelnext_lite"
#: tiles per calibration scene that ``-o curve_tiles`` accepts (:func:`qcore_detection.zoo.scene_tiles`)
CURVE_TILES = (1, 2, 4)


@dataclass(frozen=True)
class DetectionOptions:
    target: Literal["bev", "head"] = field(default="bev", metadata={
        "help": "distortion target allocators compare with FP: the dense BEV features after the backbone "
                "(the RDOQ seed's choice) or the head outputs"})
    workers: int = field(default=4, metadata={"help": "data-loader worker processes (OpenPCDet datasets)"})
    curve_tiles: int = field(default=1, metadata={
        "help": "samples per calibration scene for estimators that draw random directions per sample (RDOQ's "
                "engine=second-order): 1 the scene, 2 its halves x<0 / x>=0, 4 its quadrants around the sensor, "
                "each a separate sample (zoo: models); the cross terms between tiles, noise in that estimator, "
                "drop out at about the same backward cost"})

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise QcoreError(f"workers={self.workers} must be 0 or more")
        if self.curve_tiles not in CURVE_TILES:
            raise QcoreError(f"curve_tiles={self.curve_tiles} is not supported; use one of "
                             f"{', '.join(map(str, CURVE_TILES))}")  # also checked in build: curve_tiles()


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
        if curve_tiles(config) != 1 and prefix != "zoo":
            raise QcoreError(f"-o curve_tiles applies to the embedded detectors (--model zoo:NAME), not {prefix}:; "
                             "drop it")
        loader = host.model_loader(self.name, prefix)
        setup = loader.load(name, config.weights, config)
        if not setup.calibration:
            raise QcoreError("the calibration set is empty; raise --calib-size")
        return TaskInstance(model=setup.model, model_name=spec, metric=setup.metric, forward=setup.target,
                            evaluate=setup.evaluate, calibration=setup.calibration, example=setup.calibration[0],
                            data=setup.data, untraceable="sparse-convolution detectors: spconv tensors do not trace",
                            last_layers=setup.last_layers, grad_context=lambda: _grad_guard(setup.model),
                            split=setup.split)


def curve_tiles(config: RunConfig) -> int:
    """``-o curve_tiles`` of ``config`` (1 when not given), checked against :data:`CURVE_TILES`."""
    raw = config.options.get("curve_tiles", 1)
    try:
        tiles = int(raw)
    except (TypeError, ValueError):
        tiles = -1
    if tiles not in CURVE_TILES or str(raw).strip() != str(tiles):
        raise QcoreError(f"curve_tiles={raw} is not supported; use one of {', '.join(map(str, CURVE_TILES))}")
    return tiles


def _grad_guard(model: Any) -> Any:
    """spconv's CPU kernels need :func:`~qcore_detection.spconv_layers.spconv_cpu_guard` around backward passes
    too (one thread; no CUDA stream lookup without CUDA); imported here so the task loads without spconv."""
    from qcore import module_device
    from qcore_detection.spconv_layers import spconv_cpu_guard

    return spconv_cpu_guard(module_device(model))
