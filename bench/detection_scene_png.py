"""Draw one synthetic LiDAR scene top-down as a PNG: points coloured by height (or by sweep time), labelled
boxes outlined by class, velocity arrows. Needs matplotlib.

    python bench/detection_scene_png.py --out bench/figures/nuscenes_like_scene.png [--world nuscenes]
        [--split val] [--index 0] [--color height|time] [--extent 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection/src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qcore_detection.synthetic import WORLDS, SyntheticSplit, bev_corners  # noqa: E402

CLASS_COLOURS = ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple", "gold", "tab:pink"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--world", default="nuscenes", choices=WORLDS)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--index", type=int, default=0, help="scene index in the split (seed 0)")
    p.add_argument("--color", default="height", choices=["height", "time"])
    p.add_argument("--extent", type=float, default=50.0, help="half width of the plotted square (m)")
    args = p.parse_args()
    scene = SyntheticSplit(args.split, args.index + 1, world=args.world)[args.index]
    pts = scene.points
    inside = (np.abs(pts[:, 0]) < args.extent) & (np.abs(pts[:, 1]) < args.extent)
    pts = pts[inside]
    if args.color == "time" and pts.shape[1] > 4:
        colour, label, cmap = pts[:, 4], "sweep time lag (s)", "viridis_r"
    else:
        ground = np.percentile(pts[:, 2], 5)
        colour, label, cmap = np.clip(pts[:, 2] - ground, 0, 4), "height above the low ground (m)", "viridis"
    fig, ax = plt.subplots(figsize=(10, 10))
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=colour, s=0.8, cmap=cmap, linewidths=0, rasterized=True)
    fig.colorbar(sc, ax=ax, fraction=0.035, pad=0.02, label=label)
    corners = bev_corners(scene.gt_boxes[:, :7])
    seen: set[int] = set()
    for box, c, lab in zip(scene.gt_boxes, corners, scene.gt_labels, strict=True):
        colour_k = CLASS_COLOURS[(int(lab) - 1) % len(CLASS_COLOURS)]
        name = scene.class_names[int(lab) - 1]
        ax.fill(c[:, 0], c[:, 1], fill=False, edgecolor=colour_k, linewidth=1.2,
                label=None if int(lab) in seen else name)
        seen.add(int(lab))
        front = c[[0, 3]].mean(0)  # heading: a tick from the centre to the front edge
        ax.plot([box[0], front[0]], [box[1], front[1]], color=colour_k, linewidth=0.8)
        if len(box) >= 9 and np.hypot(box[7], box[8]) > 0.3:
            ax.arrow(box[0], box[1], box[7], box[8], color="black", width=0.05, head_width=0.5,
                     length_includes_head=True)
    ax.plot(0, 0, marker="^", color="red", markersize=8)
    ax.set_xlim(-args.extent, args.extent)
    ax.set_ylim(-args.extent, args.extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, forward)")
    ax.set_ylabel("y (m, left)")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    ax.set_title(f"{scene.frame_id}: {len(scene.points):,} points, {len(scene.gt_labels)} labelled objects "
                 "(arrows: velocity over 1 s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
