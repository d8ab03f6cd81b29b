"""Time the synthetic-LiDAR generator and the voxelizer (default configs).

    python bench/detection_synthetic.py [--scenes 50] [--split val] [--batch 4] [--world classic|nuscenes]

``--world nuscenes`` times the nuScenes-like world (:mod:`qcore_detection.nuscenes_like`, 5 sweeps) with the
grid its detector uses (``qcore_detection.train.NUSCENES_VOXELS``).

Prints scenes/s for generation, voxelization and collation into a batch_dict, and per-scene statistics
(points, voxels, labelled objects per class).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection/src"))

import numpy as np  # noqa: E402

from qcore_detection.synthetic import WORLDS, SyntheticSplit  # noqa: E402
from qcore_detection.voxelize import VoxelConfig, collate, voxelize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--world", default="classic", choices=WORLDS)
    args = p.parse_args()
    split = SyntheticSplit(args.split, args.scenes, seed=args.seed, world=args.world)
    if args.world == "classic":
        cfg = VoxelConfig()
    else:
        from qcore_detection.train import NUSCENES_VOXELS

        cfg = NUSCENES_VOXELS

    t0 = time.perf_counter()
    scenes = [split[i] for i in range(len(split))]
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    voxel_counts = [len(voxelize(s.points, cfg)[1]) for s in scenes]
    t_vox = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(0, len(scenes), args.batch):
        collate(scenes[i:i + args.batch], cfg)
    t_col = time.perf_counter() - t0

    n = len(scenes)
    labels = np.concatenate([s.gt_labels for s in scenes])
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"scenes: {n} ({args.world} world, {args.split}, seed {args.seed}); grid {cfg.grid_size} (nx, ny, nz), "
          f"voxel {cfg.voxel_size}")
    print(f"generate  {n / t_gen:8.1f} scenes/s  ({1000 * t_gen / n:.1f} ms/scene)")
    print(f"voxelize  {n / t_vox:8.1f} scenes/s  ({1000 * t_vox / n:.1f} ms/scene)")
    print(f"collate   {n / t_col:8.1f} scenes/s  (batches of {args.batch}, voxelization included)")
    print(f"points/scene  mean {np.mean([len(s.points) for s in scenes]):.0f}, "
          f"voxels/scene mean {np.mean(voxel_counts):.0f} (max {max(voxel_counts)})")
    per_class = ", ".join(f"{name} {np.sum(labels == c) / n:.1f}" for c, name in enumerate(scenes[0].class_names, 1))
    print(f"labelled objects/scene  {len(labels) / n:.1f} ({per_class})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
