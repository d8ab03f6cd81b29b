"""What a detection model loader hands the ``detection`` task: :class:`DetectionSetup`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

#: Distortion targets allocators can compare against FP: the dense BEV features after the backbone (the
#: RDOQ seed's choice) or the head outputs.
TARGETS: tuple[str, ...] = ("bev", "head")


@dataclass
class DetectionSetup:
    """A detector ready to be quantized: model, calibration batches, evaluation and distortion target.

    :param model: the FP detector in eval mode; ``model(batch_dict)`` returns ``(pred_dicts, ret_dict)``
        (OpenPCDet's convention).
    :param calibration: batch_dicts (OpenPCDet keys, torch tensors on the CPU) from a training split.
    :param evaluate: metrics of a model on the evaluation split (``{"mAP": ..., "AP/car": ...}``, percent).
    :param target: ``target(model, batch_dict) -> Tensor``: runs the model and returns the distortion target
        (see :data:`TARGETS`), on the model's device.
    :param metric: the headline metric key of ``evaluate``.
    :param data: what the calibration and evaluation data are, in words (for result.json).
    :param last_layers: the layers ``-o first_last`` treats as last (every head output of a multi-head detector);
        empty: the last quantizable layer.
    :param split: ``split(batch_dict, tiles=1) -> [batch_dict, ...]``, one batch per scene of a calibration batch,
        or per non-empty tile of each scene with ``tiles`` 2 or 4 (``-o curve_tiles``; the embedded detectors);
        None when the loader cannot split its batches.
    """

    model: nn.Module
    name: str
    class_names: tuple[str, ...]
    calibration: Sequence[dict[str, Any]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    target: Callable[[nn.Module, dict[str, Any]], Tensor]
    metric: str = "mAP"
    data: dict[str, str] = field(default_factory=dict)
    last_layers: tuple[str, ...] = ()
    split: Callable[[dict[str, Any]], Sequence[dict[str, Any]]] | None = None
