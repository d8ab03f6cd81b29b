"""The embedded default: qcore's own VoxelNeXt-style detector (``--model zoo:voxelnext_lite``), trained on the
synthetic LiDAR train split and evaluated on a fixed synthetic validation split."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from qcore import QcoreError, RunConfig, module_device, to_device
from qcore_detection.model import VoxelNeXtLite, bev_dense, head_outputs, model_from_record
from qcore_detection.setup import TARGETS, DetectionSetup
from qcore_detection.synthetic import Scene, SyntheticSplit
from qcore_detection.train import evaluate
from qcore_detection.voxelize import VoxelConfig, collate

log = logging.getLogger(__name__)
WEIGHTS = Path(__file__).parent / "zoo" / "weights"
MODELS = {"voxelnext_lite": WEIGHTS / "voxelnext_lite.safetensors",
          "voxelnext_nuscenes_like": WEIGHTS / "voxelnext_nuscenes_like.safetensors"}
#: the fixed validation split of the embedded default: the synthetic "val" stream, seed 0
VAL_SEED = 0
DEFAULT_EVAL_SCENES = 100


def load_detector(weights: Path) -> tuple[VoxelNeXtLite, dict[str, Any]]:
    """The detector in ``weights`` (safetensors) rebuilt from its JSON record, and the record with its
    ``voxel_config`` as a :class:`VoxelConfig` and ``class_names``; errors name the fix."""
    record_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise QcoreError(f"--weights {weights} does not exist; pass a model.safetensors written by "
                         "python -m qcore_detection.train")
    if not record_path.is_file():
        raise QcoreError(f"{record_path.name} (the model record written next to {weights.name} by training) is "
                         "missing; keep the .json beside the .safetensors")
    try:
        record = json.loads(record_path.read_text())
        model = model_from_record(weights, record)
        record["voxel_config"] = VoxelConfig(**record["voxel_config"])
        record["class_names"] = tuple(record["model_config"]["class_names"])
    except (SafetensorError, OSError, EOFError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or ["(no message)"])[0][:120]  # EOFError() has none
        raise QcoreError(f"cannot load detector weights {weights} ({type(exc).__name__}: {first}); the file is "
                         "corrupt or not from qcore_detection.train: re-export it") from None
    return model, record


def make_target(kind: str):  # type: ignore[no-untyped-def]
    """``target(model, batch_dict) -> Tensor``: the dense BEV features (``bev``) or the head outputs (``head``)
    of one forward pass, on the model's device.

    A tile of a scene (a batch_dict with ``curve_tiles`` T, the number of non-empty tiles its scene was cut into
    by the zoo loader's ``split``) has the whole scene's
    BEV grid, mostly empty: its BEV target is scaled by ``sqrt(T)``, so that a distortion averaged over all the
    outputs of the T tiles is on the scale of the scene's (the head target has one row per active position, which
    the tiles share out: unscaled)."""
    if kind not in TARGETS:
        raise QcoreError(f"unknown distortion target {kind!r}; use one of {', '.join(TARGETS)}")

    def target(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        bd = to_device(dict(batch), module_device(model))
        model(bd)
        if kind != "bev":
            return head_outputs(bd)
        tiles = int(batch.get("curve_tiles", 1))
        return bev_dense(bd) * tiles ** 0.5 if tiles != 1 else bev_dense(bd)

    return target


def scene_tiles(scene: Scene, tiles: int) -> list[Scene]:
    """``scene`` cut into ``tiles`` scenes around the sensor by the points' x and y (1: the scene itself, 2: x < 0
    and x >= 0, 4: the four quadrants), each keeping all the labels; every point lands in exactly one tile. Tiles
    without points are left out (a detector whose range starts at x = 0 sees no x < 0 points; spconv cannot run an
    empty scene), so fewer than ``tiles`` may come back; a scene without any point is refused."""
    if len(scene.points) == 0:
        raise QcoreError(f"calibration scene {scene.frame_id} has no points in the detector's range; "
                         "use another --seed or --calib-size")
    if tiles == 1:
        return [scene]
    x, y = scene.points[:, 0], scene.points[:, 1]
    if tiles == 2:
        masks = [x < 0, x >= 0]
    elif tiles == 4:
        masks = [(x < 0) & (y < 0), (x < 0) & (y >= 0), (x >= 0) & (y < 0), (x >= 0) & (y >= 0)]
    else:
        raise QcoreError(f"curve_tiles={tiles} is not supported; use 1, 2 or 4")
    return [dataclasses.replace(scene, points=scene.points[m], frame_id=f"{scene.frame_id}/tile{i}")
            for i, m in enumerate(masks) if m.any()]


def load_zoo(name: str, weights: Path | None, config: RunConfig) -> DetectionSetup:
    """``--model zoo:voxelnext_lite`` (classic synthetic world) or ``zoo:voxelnext_nuscenes_like``
    (nuScenes-like world, :mod:`qcore_detection.nuscenes_like`): the shipped detector (or ``--weights``),
    synthetic calibration scenes from the train split, the fixed synthetic validation split for evaluation, both
    from the world the detector's training record names."""
    if name not in MODELS:
        raise QcoreError(f"unknown detection zoo model {name!r}; available: {', '.join(MODELS)}")
    if config.data not in (None, "synthetic"):
        raise QcoreError("the embedded detector runs on synthetic LiDAR (--data synthetic or nothing); real "
                         "datasets go through OpenPCDet: --model pcdet:CFG.yaml --weights CKPT --data DIR")
    model, record = load_detector(Path(weights) if weights else MODELS[name])
    vcfg = record["voxel_config"]
    world = str(record.get("world", "classic"))
    bs, calib_n = int(config.batch_size or 4), int(config.calib_size or 16)
    eval_n = config.eval_size if config.eval_size is not None else DEFAULT_EVAL_SCENES
    if eval_n < 1:
        raise QcoreError("--eval-size must be at least 1")
    calib_scenes = SyntheticSplit("train", calib_n, seed=config.seed, world=world)
    scenes = [calib_scenes[j] for j in range(calib_n)]
    calibration = [collate(scenes[i:i + bs], vcfg) for i in range(0, calib_n, bs)]
    by_frame = {s.frame_id: s for s in scenes}

    def split(batch: dict[str, Any], tiles: int = 1) -> list[dict[str, Any]]:
        """One batch_dict per scene of a calibration batch (collated again from its scene), or per non-empty tile
        of each scene with ``tiles`` > 1 (``-o curve_tiles``, :func:`scene_tiles`), each tile marked with the
        number of tiles its scene kept (its target's scale, :func:`make_target`)."""
        if tiles == 1:
            return [collate([by_frame[f]], vcfg) for f in batch["frame_id"]]
        pieces = []
        for f in batch["frame_id"]:
            parts = scene_tiles(by_frame[f], tiles)
            if len(parts) < tiles:
                log.debug("calibration scene %s: %d of %d tiles hold points", f, len(parts), tiles)
            pieces += [{**collate([t], vcfg), "curve_tiles": len(parts)} for t in parts]
        return pieces

    val = [s for s in SyntheticSplit("val", eval_n, seed=VAL_SEED, world=world)]

    def evaluate_model(m: torch.nn.Module) -> dict[str, float]:
        metrics, rate = evaluate(m, val, vcfg, bs, module_device(m))
        log.info("evaluated %d scenes at %.1f scenes/s", len(val), rate)
        return metrics

    target = str(config.options.get("target", "bev"))
    return DetectionSetup(
        model=model, name=f"zoo:{name}", class_names=record["class_names"],
        calibration=calibration, evaluate=evaluate_model, target=make_target(target), split=split,
        data={"calibration": f"synthetic LiDAR ({world} world) train split: {calib_n} scenes (seed {config.seed})",
              "evaluation": f"fixed synthetic LiDAR ({world} world) val split: {eval_n} scenes (seed {VAL_SEED}); "
                            "nuScenes-style "
                            "AP, BEV centre distance 0.5/1/2/4 m",
              "weights": str(weights) if weights else f"shipped zoo weights ({MODELS[name].name})",
              "target": f"distortion target for allocators: {target}"})
