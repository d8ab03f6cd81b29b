"""Where a nuScenes-like detector places its boxes: centre errors per class, at the voxel that decodes them.

    OMP_NUM_THREADS=1 python bench/detection_localisation.py [--scenes 30] [--weights W.safetensors]

For every labelled box of the first ``--scenes`` val scenes (default model: ``zoo:voxelnext_nuscenes_like``):

* the BEV centre error decoded at the box's **positive** voxel (the active voxel nearest its centre, where the
  regression is always trained) and at the **top** voxel (the highest heatmap score of its class among the
  active voxels within 3 m of the centre: the one the decoder keeps), their medians and the share under 0.5 m,
  and how often the two voxels are the same;
* for car, truck and bus, the error of the nearest kept prediction (score > 0.2, within 6 m) along the box's
  heading, by the box's speed along its heading: a negative mean means the centre is placed behind the object,
  toward the trail of points from the older sweeps.

BENCHMARKS.md ("nuScenes-like detector, third training stage") used it to diagnose bus/truck placement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection/src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qcore_detection.head import decode_boxes  # noqa: E402
from qcore_detection.model import load_model  # noqa: E402
from qcore_detection.synthetic import SyntheticSplit  # noqa: E402
from qcore_detection.train import NUSCENES_VOXELS, predict  # noqa: E402
from qcore_detection.voxelize import collate  # noqa: E402
from qcore_detection.zoo import MODELS  # noqa: E402


def voxel_errors(model: torch.nn.Module, scenes: list, batch: int = 3) -> dict[int, np.ndarray]:
    """Per class: rows (error at positive voxel, error at top voxel, top is positive) in m, one per box."""
    res: dict[int, list[tuple[float, float, float]]] = {}
    cell, origin = model.bev_cell, model.bev_origin
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            bd = collate(scenes[i:i + batch], NUSCENES_VOXELS)
            model(bd)
            ind = bd["encoded_spconv_tensor"].indices.long()
            out = bd["head_outputs"]
            boxes = decode_boxes(out, ind, cell, origin)
            scores = torch.sigmoid(out["hm"])
            centres = torch.stack([(ind[:, 2] + 0.5) * cell[0] + origin[0], (ind[:, 1] + 0.5) * cell[1] + origin[1]], 1)
            for b, gt in enumerate(bd["gt_boxes"]):
                rows = torch.nonzero(ind[:, 0] == b).squeeze(1)
                for g in gt[gt[:, -1] > 0]:
                    c = int(g[-1]) - 1
                    d = torch.linalg.norm(centres[rows] - g[:2], dim=1)
                    if not (d < 3.0).any():
                        continue
                    pos = int(d.argmin())
                    top = int(torch.where(d < 3.0, scores[rows, c], -1.0).argmax())
                    err = [float(torch.linalg.norm(boxes[rows[r], :2] - g[:2])) for r in (pos, top)]
                    res.setdefault(c, []).append((err[0], err[1], float(pos == top)))
    return {c: np.array(v) for c, v in res.items()}


def along_heading(preds: list, gts: list, cls: int) -> np.ndarray:
    """Rows (error along the heading in m, speed along the heading in m/s) for boxes of class ``cls`` (0-based)."""
    rows = []
    for p, g in zip(preds, gts, strict=True):
        gb, gl = np.asarray(g["gt_boxes"]), np.asarray(g["gt_labels"])
        keep = (p["pred_labels"].numpy() == cls + 1) & (p["pred_scores"].numpy() > 0.2)
        pb = p["pred_boxes"].numpy()[keep]
        for b in gb[gl == cls + 1]:
            if not len(pb):
                continue
            d = np.hypot(pb[:, 0] - b[0], pb[:, 1] - b[1])
            j = int(d.argmin())
            if d[j] > 6.0:
                continue
            h = b[6]
            rows.append((np.cos(h) * (pb[j, 0] - b[0]) + np.sin(h) * (pb[j, 1] - b[1]),
                         np.cos(h) * b[7] + np.sin(h) * b[8]))
    return np.array(rows).reshape(-1, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=30, help="first N scenes of the nuScenes-like val split")
    p.add_argument("--weights", type=Path, default=MODELS["voxelnext_nuscenes_like"],
                   help="model.safetensors with its .json record beside it")
    args = p.parse_args()
    model = load_model(args.weights, args.weights.with_suffix(".json")).eval()
    names = model.cfg.class_names
    scenes = SyntheticSplit("val", args.scenes, seed=0, world="nuscenes")[:]
    print(f"{args.weights}, first {args.scenes} val scenes")
    print("class         boxes  positive voxel: median m, <0.5 m   top voxel: median m, <0.5 m   top is positive")
    for c, r in sorted(voxel_errors(model, scenes).items()):
        print(f"{names[c]:<13} {len(r):5d}  {np.median(r[:, 0]):14.2f}  {(r[:, 0] < 0.5).mean():6.2f}"
              f"  {np.median(r[:, 1]):19.2f}  {(r[:, 1] < 0.5).mean():6.2f}  {r[:, 2].mean():16.2f}")
    preds, gts = predict(model, scenes, NUSCENES_VOXELS, 4, torch.device("cpu"))
    print("along-heading error of the nearest prediction (m; negative: behind), by speed along the heading")
    for c in range(3):
        r = along_heading(preds, gts, c)
        parts = [f"{names[c]:<6} all n {len(r)} mean {r[:, 0].mean():+.2f}"]
        for lo, hi in ((-np.inf, 0.5), (0.5, 5.0), (5.0, np.inf)):
            k = (r[:, 1] >= lo) & (r[:, 1] < hi)
            if k.any():
                parts.append(f"[{lo:g}, {hi:g}) m/s n {int(k.sum())} mean {r[k, 0].mean():+.2f}")
        print(";  ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
