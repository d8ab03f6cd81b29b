"""Train the embedded VoxelNeXt-style detector on synthetic LiDAR; write ``model.safetensors`` and ``model.json``.

Usage::

    python -m qcore_detection.train --out DIR --scenes 1000 --epochs 2 --device cpu --batch-size 2 --seed 0
    python -m qcore_detection.train --out DIR --scenes 3000 --epochs 4 --device cuda --batch-size 8 --workers 8
    python -m qcore_detection.train --out DIR --world nuscenes --scenes 500 --epochs 2 --val-scenes 50 \
        --batch-size 2 --channels 16,16,32,32,32,32 --blocks 1 --device cpu --workers 1   # zoo:voxelnext_nuscenes_like

``--init DIR`` continues a saved model (its config kept) with a new schedule, e.g. on scenes it has not seen
(``--first-scene``), evaluating every ``--eval-every`` steps and stopping at ``--target-map``; the new record keeps
the earlier ones under ``previous_stages`` and sums every stage under ``total`` (epochs, scenes, CPU-bound
training seconds, wall seconds)::

    python -m qcore_detection.train --out DIR2 --init DIR --world nuscenes --first-scene 500 --scenes 900 \
        --epochs 1 --lr 2e-3 --pct-start 0.05 --eval-every 113 --target-map 57 --time-budget 60 ...

``--reg-radius R`` trains the head's regression branches at every active BEV voxel within R cells of a box centre,
not only at the nearest one (:func:`qcore_detection.head.assign_targets`): decoding takes the heatmap's top voxel,
which for long objects is usually another one. It only changes the loss, so a continued model may set it.

``--world nuscenes`` trains on the nuScenes-like world (:mod:`qcore_detection.nuscenes_like`: 7 classes, 5 point
features with the sweep time, boxes with velocities) on its grid (:data:`NUSCENES_VOXELS`), with a velocity head.

Data: the synthetic ``train`` split (``--scenes`` scenes, generated and voxelized on the fly every epoch, ~50 ms
a scene, in ``--workers`` processes), each scene flipped at random in x and/or y; mAP (nuScenes-style, BEV
centre distance) on the first ``--val-scenes`` scenes of the ``val`` split after every epoch. Optimiser: AdamW
with a one-cycle schedule, gradient norm clipped at 10.

Measured with the default model (2.58 M parameters): on 2 CPU cores a step of 2 scenes takes ~1.7 s, and 300
scenes (one epoch, ~4.5 min) reach ~70 val mAP; on an H100 a step of 8 scenes takes ~0.24 s, and 2000 scenes
(one epoch, ~1 min) reach ~93, 3000 scenes x 4 epochs ~98.

The JSON sidecar holds the model config (``build_model(record["model_config"])`` rebuilds the model, or use
:func:`qcore_detection.model.load_model`), the voxel config, the command, seed, device, per-epoch loss and val
mAP, the final per-class AP and timings. Both files are written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import spconv
import torch

from qcore_detection.metric import detection_ap
from qcore_detection.model import ModelConfig, VoxelNeXtLite, build_model, load_model
from qcore_detection.spconv_layers import spconv_cpu_guard
from qcore_detection.synthetic import CLASS_NAMES, WORLDS, Scene, SyntheticSplit
from qcore_detection.voxelize import VoxelConfig, collate

log = logging.getLogger("qcore_detection.train")
#: the nuScenes-like world's grid: 0.16 x 0.16 x 0.2 m voxels over +-48 m and 3.4 m below to 3.0 m above the
#: sensor (its ground is tilted and uneven), 600 x 600 x 32 voxels (75 x 75 BEV cells of 1.28 m at stride 8)
NUSCENES_VOXELS = VoxelConfig(point_cloud_range=(-48.0, -48.0, -3.4, 48.0, 48.0, 3.0), voxel_size=(0.16, 0.16, 0.2))


def batch_to_device(batch_dict: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch_dict`` with every tensor moved to ``device`` (other values kept)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch_dict.items()}


def flip_scene(scene: Scene, flip_x: bool, flip_y: bool) -> Scene:
    """``scene`` mirrored across the x axis (y -> -y) and/or the y axis (x -> -x), boxes included."""
    points, boxes = scene.points.copy(), scene.gt_boxes.copy()
    velocity = boxes.shape[1] >= 9  # (vx, vy) in columns 7, 8
    if flip_y:
        points[:, 1] *= -1
        boxes[:, 1] *= -1
        boxes[:, 6] = -boxes[:, 6]
        if velocity:
            boxes[:, 8] *= -1
    if flip_x:
        points[:, 0] *= -1
        boxes[:, 0] *= -1
        boxes[:, 6] = np.pi - boxes[:, 6]
        if velocity:
            boxes[:, 7] *= -1
    boxes[:, 6] = (boxes[:, 6] + np.pi) % (2 * np.pi) - np.pi
    origins = scene.sensor_origins
    if origins is not None:
        origins = origins * np.array([-1 if flip_x else 1, -1 if flip_y else 1, 1], dtype=origins.dtype)
    return dataclasses.replace(scene, points=points, gt_boxes=boxes, sensor_origins=origins)


def world_preset(world: str) -> tuple[VoxelConfig, dict[str, Any]]:
    """The voxel grid and the :class:`ModelConfig` fields (classes, point features, velocity, NMS radii) of
    the detector for a synthetic world (``classic`` or ``nuscenes``)."""
    if world == "classic":
        return VoxelConfig(), {"class_names": CLASS_NAMES}
    if world == "nuscenes":
        from qcore_detection.nuscenes_like import NUSCENES_CLASS_NAMES

        return NUSCENES_VOXELS, {"class_names": NUSCENES_CLASS_NAMES, "num_point_features": 5, "velocity": True,
                                 "nms_radius": (2.0, 3.0, 4.0, 0.4, 1.0, 0.4, 1.0)}
    raise ValueError(f"unknown synthetic world {world!r}; expected one of {WORLDS}")


class FlippedScenes(torch.utils.data.Dataset):
    """The scenes of ``split``, each flipped in x and/or y at random (a fixed choice per seed, epoch and index,
    so data-loader workers give the same batches as the main process)."""

    def __init__(self, split: SyntheticSplit, seed: int, epoch: int, first: int = 0) -> None:
        self.split, self.seed, self.epoch, self.first = split, seed, epoch, first

    def __len__(self) -> int:
        return len(self.split) - self.first

    def __getitem__(self, index: int) -> Scene:
        index += self.first
        flip_x, flip_y = np.random.default_rng((self.seed, self.epoch, index)).random(2) < 0.5
        return flip_scene(self.split[index], bool(flip_x), bool(flip_y))


@torch.no_grad()
def predict(model: torch.nn.Module, scenes: Sequence[Scene], vcfg: VoxelConfig, batch_size: int, device: torch.device
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``model``'s predictions per scene (CPU tensors) and the scenes' ground truth, in the formats of
    :func:`~qcore_detection.metric.detection_ap` and :func:`~qcore_detection.metric.paired_bootstrap`."""
    model.eval()
    preds, gts = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            chunk = scenes[i:i + batch_size]
            pred_dicts, _ = model(batch_to_device(collate(chunk, vcfg), device))
            preds += [{k: v.cpu() for k, v in p.items()} for p in pred_dicts]
            gts += [{"gt_boxes": s.gt_boxes, "gt_labels": s.gt_labels} for s in chunk]
    return preds, gts


def evaluate(model: VoxelNeXtLite, scenes: Sequence[Scene], vcfg: VoxelConfig, batch_size: int,
             device: torch.device) -> tuple[dict[str, float], float]:
    """nuScenes-style AP of ``model`` on ``scenes`` and the throughput in scenes/s (voxelization included)."""
    t0 = time.perf_counter()
    preds, gts = predict(model, scenes, vcfg, batch_size, device)
    seconds = time.perf_counter() - t0
    return detection_ap(preds, gts, model.cfg.class_names), len(scenes) / max(seconds, 1e-9)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file (in the same folder) to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(model: VoxelNeXtLite, record: dict[str, Any], out: Path) -> None:
    """Write ``out/model.safetensors`` (float32, CPU) and ``out/model.json`` (``record``) atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "qcore-detection", "model_config": json.dumps(model.cfg.to_dict())}
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
    _atomic_write(out / "model.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))


def load_init(init: Path, world: str) -> tuple[VoxelNeXtLite, dict[str, Any]]:
    """The model saved in ``init`` (``model.safetensors`` or a folder holding it) and its training record, for
    continuing its training; the record must name the same synthetic ``world``."""
    weights = init / "model.safetensors" if init.is_dir() else init
    sidecar = weights.with_suffix(".json")
    if not weights.is_file() or not sidecar.is_file():
        raise ValueError(f"--init {init}: need {weights.name} and {sidecar.name} written by qcore_detection.train")
    record = json.loads(sidecar.read_text())
    if record.get("world", "classic") != world:
        raise ValueError(f"--init {init} was trained on the {record.get('world', 'classic')!r} world; pass "
                         f"--world {record.get('world', 'classic')}")
    return load_model(weights, sidecar), record


def _stages(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The earlier training stages of a continued model: the previous record's own stages, then its run."""
    if previous is None:
        return []
    run = {k: previous.get(k) for k in ("command", "seed", "device", "threads", "data", "recipe", "epochs_done",
                                        "steps_done", "train_seconds", "wall_seconds", "cpu_seconds",
                                        "s_per_iter", "history")}
    run["val_mAP"] = previous.get("val", {}).get("mAP")
    return [*previous.get("previous_stages", []), run]


def train(out: Path, scenes: int, epochs: int, device: str, batch_size: int, seed: int, val_scenes: int = 100,
          lr: float = 3e-3, weight_decay: float = 0.01, model_overrides: dict[str, Any] | None = None,
          workers: int = 0, command: str = "", world: str = "classic", time_budget_min: float | None = None,
          init: Path | None = None, pct_start: float = 0.4, eval_every: int | None = None,
          target_map: float | None = None, first_scene: int = 0, reg_radius: float | None = None) -> dict[str, Any]:
    """Train, evaluate after each epoch, save; return the record written to ``model.json``.

    :param workers: data-loader processes that generate and voxelize scenes (0: in the training process).
    :param world: the synthetic world (``classic``, or ``nuscenes``: :mod:`qcore_detection.nuscenes_like`).
    :param time_budget_min: stop when the training steps (evaluations not counted) have taken this many
        minutes: no further epoch starts when the last one's duration would pass it, and an epoch in progress
        stops at the first step past it (the record's ``stopped`` says where and why). The model and record are
        saved after every evaluation, so an interrupted run leaves the last evaluated model.
    :param init: continue from this model (``model.safetensors`` or its folder) instead of a new one: its
        config is kept (``model_overrides`` must be empty), its record goes into ``previous_stages`` and the
        totals (``total``) count every stage.
    :param pct_start: fraction of the one-cycle schedule spent warming up (``0.4``; a continued model needs
        less).
    :param eval_every: also evaluate (and save) every this many steps inside an epoch.
    :param target_map: stop at the first evaluation whose val mAP reaches this.
    :param reg_radius: set the model's ``reg_radius`` (regression at every active BEV voxel within this many cells
        of a box centre; a loss setting, so a continued model may change it); None keeps the saved or default
        one.
    :param first_scene: train on scenes ``first_scene .. first_scene + scenes - 1`` of the train split (a
        continued model gets scenes its earlier stages did not see).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    vcfg, preset = world_preset(world)
    previous: dict[str, Any] | None = None
    if init is not None:
        if model_overrides:
            raise ValueError("--init keeps the saved model's config: drop --channels/--blocks")
        model, previous = load_init(init, world)
        cfg = model.cfg
        model = model.to(dev)
    else:
        cfg = ModelConfig(spatial_shape=vcfg.spatial_shape, voxel_size=vcfg.voxel_size,
                          point_cloud_range=vcfg.point_cloud_range, **{**preset, **(model_overrides or {})})
        model = build_model(cfg).to(dev)
    if reg_radius is not None:
        cfg = model.cfg = dataclasses.replace(cfg, reg_radius=float(reg_radius))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, channels %s, %d blocks per stage", n_params, cfg.channels, cfg.blocks)
    train_split = SyntheticSplit("train", first_scene + scenes, seed=seed, world=world)
    val = SyntheticSplit("val", val_scenes, seed=seed, cache=True, world=world)[:]
    steps_per_epoch = math.ceil(scenes / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=pct_start, div_factor=10.0, final_div_factor=100.0)
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    steps_done = 0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    stopped: str | None = None
    record: dict[str, Any] = {}
    budget_s = None if time_budget_min is None else 60 * time_budget_min
    t_epoch, eval_seconds = t_start, 0.0

    def checkpoint(epoch: int, step: int, sums: dict[str, float]) -> float:
        """Evaluate on the val scenes, append to the history, save; return the val mAP. The evaluation's time
        is not training time."""
        nonlocal record, eval_seconds
        t_eval = time.perf_counter()
        metrics, scenes_per_s = evaluate(model, val, vcfg, batch_size, dev)
        eval_seconds += time.perf_counter() - t_eval
        model.train()
        history.append({"epoch": epoch, "step": step, **{k: v / max(1, step) for k, v in sums.items()},
                        "val_mAP": metrics["mAP"], "s_per_iter": epoch_seconds() / max(1, step),
                        "lr": sched.get_last_lr()[0], "train_seconds": round(train_seconds + epoch_seconds(), 1),
                        "seconds": round(time.perf_counter() - t_start, 1)})
        log.info("epoch %d step %d: loss %.3f, val mAP %.2f (%s)", epoch, step, history[-1]["loss"], metrics["mAP"],
                 ", ".join(f"{c} {metrics[f'AP/{c}']:.1f}" for c in cfg.class_names))
        record = _record({**locals_for_record(), "metrics": metrics, "scenes_per_s": scenes_per_s})
        save_checkpoint(model, record, out)
        return float(metrics["mAP"])

    def epoch_seconds() -> float:
        return time.perf_counter() - t_epoch - eval_seconds

    def locals_for_record() -> dict[str, Any]:
        return {"cfg": cfg, "vcfg": vcfg, "dev": dev, "world": world, "seed": seed, "scenes": scenes,
                "val_scenes": val_scenes, "history": history, "command": command, "n_params": n_params,
                "epochs": epochs, "batch_size": batch_size, "workers": workers, "lr": lr,
                "weight_decay": weight_decay, "time_budget_min": time_budget_min, "pct_start": pct_start,
                "train_seconds": train_seconds + epoch_seconds(), "steps_done": steps_done,
                "steps_per_epoch": steps_per_epoch, "wall_seconds": time.perf_counter() - t_start,
                "cpu_seconds": time.process_time() - cpu_start,
                "previous": previous, "stopped": stopped, "init": init, "first_scene": first_scene}

    def should_stop(epoch: int, step: int, evaluated: float | None) -> str | None:
        """Why training stops after ``step`` (steps of ``epoch`` done), or None to go on; ``evaluated`` is the val
        mAP of an evaluation at this step (None: none). The one place every stop rule lives: the target mAP, the
        time budget inside an epoch, and at an epoch's end whether another epoch as long fits the budget."""
        if target_map is not None and evaluated is not None and evaluated >= target_map:
            return f"val mAP {evaluated:.2f} reached the target {target_map:g} at step {step} of epoch {epoch}"
        if budget_s is None or (epoch == epochs and step == steps_per_epoch):  # no budget, or the schedule's end
            return None
        spent = train_seconds + epoch_seconds()
        if step < steps_per_epoch:
            if spent <= budget_s:
                return None
            return (f"time budget of {time_budget_min:g} min: stopped at step {step} of {steps_per_epoch} in epoch "
                    f"{epoch} (lr {sched.get_last_lr()[0]:.2e})")
        if spent + epoch_seconds() > budget_s:
            return f"time budget of {time_budget_min:g} min: stopped after epoch {epoch} of {epochs}"
        return None

    for epoch in range(1, epochs + 1):
        model.train()
        loader = torch.utils.data.DataLoader(
            FlippedScenes(train_split, seed, epoch, first_scene), batch_size=batch_size, shuffle=True,
            num_workers=workers,
            collate_fn=functools.partial(collate, cfg=vcfg),
            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        sums = {"loss": 0.0, "loss_hm": 0.0, "loss_loc": 0.0}
        t_epoch = time.perf_counter()
        eval_seconds = 0.0
        for step, batch in enumerate(loader, start=1):
            ret, tb, _ = model(batch_to_device(batch, dev))
            opt.zero_grad(set_to_none=True)
            with spconv_cpu_guard(dev):
                ret["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            sums["loss"] += float(ret["loss"].detach())
            sums["loss_hm"] += tb["loss_hm"]
            sums["loss_loc"] += tb["loss_loc"]
            steps_done += 1
            if step % 25 == 0 or step == steps_per_epoch:
                log.info("epoch %d step %d/%d loss %.3f (%.2f s/iter, lr %.2e)", epoch, step, steps_per_epoch,
                         sums["loss"] / step, epoch_seconds() / step, sched.get_last_lr()[0])
            evaluated = None
            if step == steps_per_epoch or (eval_every and step % eval_every == 0):
                evaluated = checkpoint(epoch, step, sums)
            stopped = should_stop(epoch, step, evaluated)
            if stopped:
                log.warning(stopped)
                if evaluated is None:
                    checkpoint(epoch, step, sums)  # its record says why training stopped
                else:
                    record["stopped"] = stopped
                    save_checkpoint(model, record, out)
                break
        train_seconds += epoch_seconds()
        if stopped:
            break
    model.float().cpu()
    return record


def _scenes_seen(stage: dict[str, Any]) -> int:
    """Training scenes a stage's steps drew (records before ``steps_done``: epochs x scenes of its data)."""
    batch = int(stage["recipe"]["batch_size"])
    if stage.get("steps_done") is not None:
        return int(stage["steps_done"]) * batch
    scenes = int(stage["data"].get("train_scenes") or stage["data"]["train"].split(" scenes")[0].rsplit(" ", 1)[1])
    return int(stage["epochs_done"]) * math.ceil(scenes / batch) * batch


def _record(v: dict[str, Any]) -> dict[str, Any]:
    """The training record (``model.json``) from :func:`train`'s state at an evaluation."""
    cfg, vcfg, dev, world, seed = v["cfg"], v["vcfg"], v["dev"], v["world"], v["seed"]
    scenes, val_scenes, history = v["scenes"], v["val_scenes"], v["history"]
    steps = v["steps_done"]
    stages = _stages(v["previous"])
    totals = {"stages": len(stages) + 1,
              "epochs": sum(float(s.get("epochs_done") or 0) for s in stages) + steps / v["steps_per_epoch"],
              "scenes_seen": sum(_scenes_seen(s) for s in stages) + steps * v["batch_size"],
              "train_seconds": round(sum(float(s.get("train_seconds") or 0) for s in stages) + v["train_seconds"], 1),
              "wall_seconds": round(sum(float(s.get("wall_seconds") or s["history"][-1]["seconds"]) for s in stages)
                                    + v["wall_seconds"], 1)}
    return {
        "model_config": cfg.to_dict(),
        "voxel_config": dataclasses.asdict(vcfg),
        "world": world,
        "command": v["command"],
        "seed": seed,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "spconv": spconv.__version__,
        "parameters": v["n_params"],
        "data": {"train": f"synthetic ({world} world) train split, {scenes} scenes, seed {seed}, random x/y flips"
                          + (f", scenes {first}..{first + scenes - 1}" if (first := v["first_scene"]) else ""),
                 "val": f"synthetic ({world} world) val split, first {val_scenes} scenes, seed {seed}",
                 "train_scenes": scenes},
        "recipe": {"epochs": v["epochs"], "batch_size": v["batch_size"], "workers": v["workers"],
                   "optimizer": "AdamW", "lr": v["lr"], "weight_decay": v["weight_decay"], "schedule": "one-cycle",
                   "pct_start": v["pct_start"], "grad_clip": 10.0, "time_budget_min": v["time_budget_min"],
                   "init": None if v["init"] is None else "the previous stage's weights (previous_stages[-1])"},
        "epochs_done": round(steps / v["steps_per_epoch"], 3),
        "steps_done": steps,
        "train_seconds": round(v["train_seconds"], 1),
        "wall_seconds": round(v["wall_seconds"], 1),
        "cpu_seconds": round(v["cpu_seconds"], 1),  # the training process's own CPU time (not its data workers')
        "s_per_iter": round(v["train_seconds"] / max(1, steps), 3),
        "eval_scenes_per_s": round(v["scenes_per_s"], 2),
        "stopped": v["stopped"],
        "history": list(history),
        "val": v["metrics"],
        "previous_stages": stages,
        "total": totals,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for model.safetensors and model.json")
    p.add_argument("--scenes", type=int, default=1000, help="training scenes (synthetic train split)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-scenes", type=int, default=100, help="validation scenes (synthetic val split)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=None,
                   help="model channels, six comma-separated numbers (default 16,32,64,64,64,64)")
    p.add_argument("--blocks", type=int, default=None, help="basic blocks per stage (default 2)")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (scene generation)")
    p.add_argument("--world", default="classic", choices=WORLDS,
                   help="synthetic world: classic (zoo:voxelnext_lite) or nuscenes (nuScenes-like, 7 classes)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop training after this many minutes (the schedule is cut short; the record says so)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue training this model (model.safetensors or its folder; its record is kept)")
    p.add_argument("--pct-start", type=float, default=0.4, help="warm-up fraction of the one-cycle schedule")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate and save every N steps")
    p.add_argument("--target-map", type=float, default=None, help="stop once the val mAP reaches this")
    p.add_argument("--first-scene", type=int, default=0, help="index of the first training scene of the split")
    p.add_argument("--reg-radius", type=float, default=None,
                   help="regress box offsets/sizes at every active BEV voxel within this many cells of a box "
                        "centre (default: the saved model's, 0 for a new one: the nearest voxel only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides: dict[str, Any] = {}
    if args.channels:
        overrides.update(channels=args.channels, bev_channels=args.channels[3])
    if args.blocks:
        overrides["blocks"] = args.blocks
    command = "python -m qcore_detection.train " + " ".join(sys.argv[1:] if argv is None else argv)
    rec = train(args.out, args.scenes, args.epochs, args.device, args.batch_size, args.seed,
                val_scenes=args.val_scenes, lr=args.lr, model_overrides=overrides, workers=args.workers,
                command=command, world=args.world, time_budget_min=args.time_budget, init=args.init,
                pct_start=args.pct_start, eval_every=args.eval_every, target_map=args.target_map,
                first_scene=args.first_scene, reg_radius=args.reg_radius)
    log.info("val mAP %.2f after %.0f s of training (%.3f s/iter)", rec["val"]["mAP"], rec["train_seconds"],
             rec["s_per_iter"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
