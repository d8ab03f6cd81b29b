"""Voxelization and batching in OpenPCDet's ``batch_dict`` conventions.

Default grid (for :mod:`qcore_detection.synthetic`'s frame: sensor at the origin, ground at z = -1.8 m):
``point_cloud_range`` (-48, -48, -2.2, 48, 48, 2.6) with voxels of (0.1, 0.1, 0.2) m, i.e. from 0.4 m
below the ground to 4.4 m above it; ``grid_size`` (nx, ny, nz) = (960, 960, 24) and ``spatial_shape``
(nz, ny, nx) = (24, 960, 960). 24 = 3 * 8 and 960 = 120 * 8, so three stride-2 down-samplings
(kernel 3, padding 1) give exactly 3 x 120 x 120 at stride 8 (further ones: 3 -> 2 -> 1 in z).
A point belongs to voxel ``floor((p - range_min) / voxel_size)``; points whose voxel falls outside the grid
(i.e. outside ``[min, max)`` per axis) are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qcore_detection.synthetic import Scene

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoxelConfig:
    """Voxel grid over ``point_cloud_range`` (x0, y0, z0, x1, y1, z1) with ``voxel_size`` (vx, vy, vz)."""

    point_cloud_range: tuple[float, float, float, float, float, float] = (-48.0, -48.0, -2.2, 48.0, 48.0, 2.6)
    voxel_size: tuple[float, float, float] = (0.1, 0.1, 0.2)
    max_points_per_voxel: int = 5
    max_voxels: int = 60000

    def __post_init__(self) -> None:
        extent = np.subtract(self.point_cloud_range[3:], self.point_cloud_range[:3]) / np.asarray(self.voxel_size)
        if np.any(extent <= 0) or not np.allclose(extent, np.round(extent), atol=1e-4):
            raise ValueError(f"point_cloud_range {self.point_cloud_range} is not a positive whole number of "
                             f"voxels {self.voxel_size}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxels per axis (nx, ny, nz), as OpenPCDet's ``grid_size``."""
        extent = np.subtract(self.point_cloud_range[3:], self.point_cloud_range[:3]) / np.asarray(self.voxel_size)
        nx, ny, nz = np.round(extent).astype(int)
        return int(nx), int(ny), int(nz)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(nz, ny, nx): the ``spatial_shape`` of a spconv tensor indexed (b, z, y, x)."""
        nx, ny, nz = self.grid_size
        return nz, ny, nx


def voxel_indices(points: np.ndarray, cfg: VoxelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Voxel (x, y, z) integer index [N, 3] of each point and a mask of those inside the grid.

    Computed in float32, as OpenPCDet (float32 ``point_cloud_range``) and spconv do, so a float32 point
    equal to the range minimum is inside and one equal to the maximum is outside."""
    xyz = np.asarray(points, dtype=np.float32)[:, :3]
    lo = np.asarray(cfg.point_cloud_range[:3], dtype=np.float32)
    idx = np.floor((xyz - lo) / np.asarray(cfg.voxel_size, dtype=np.float32)).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(cfg.grid_size)), axis=1)
    return idx, inside


def voxelize(points: np.ndarray, cfg: VoxelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group points [N, C] into voxels.

    Returns ``voxels`` float32 [M, max_points_per_voxel, C] (zero-padded), ``coords`` int32 [M, 3] as
    (z, y, x) and ``num_points`` int32 [M]. Each voxel keeps its first ``max_points_per_voxel`` points in
    input order; voxels are ordered by their first point (as spconv's point-to-voxel does) and only the first
    ``max_voxels`` are kept."""
    points = np.asarray(points, dtype=np.float32)
    idx, inside = voxel_indices(points, cfg)
    pts, idx = points[inside], idx[inside]
    nx, ny, _ = cfg.grid_size
    linear = (idx[:, 2] * ny + idx[:, 1]) * nx + idx[:, 0]
    order = np.argsort(linear, kind="stable")  # points of a voxel stay in input order
    _, start, inverse_sorted, counts = np.unique(linear[order], return_index=True, return_inverse=True,
                                                 return_counts=True)
    first_point = order[start]  # input index of each voxel's first point
    voxel_rank = np.empty(len(start), dtype=np.int64)
    voxel_rank[np.argsort(first_point, kind="stable")] = np.arange(len(start))
    slot = np.arange(len(order)) - start[inverse_sorted]  # position of each sorted point inside its voxel
    m = min(len(start), cfg.max_voxels)
    if len(start) > cfg.max_voxels:
        log.debug("voxelize: %d voxels, keeping the first %d", len(start), cfg.max_voxels)
    keep = (slot < cfg.max_points_per_voxel) & (voxel_rank[inverse_sorted] < m)
    rank = voxel_rank[inverse_sorted][keep]

    voxels = np.zeros((m, cfg.max_points_per_voxel, points.shape[1]), dtype=np.float32)
    voxels[rank, slot[keep]] = pts[order[keep]]
    coords = np.empty((m, 3), dtype=np.int32)
    coords[voxel_rank[voxel_rank < m]] = idx[first_point[voxel_rank < m]][:, ::-1]
    num_points = np.empty(m, dtype=np.int32)
    num_points[voxel_rank[voxel_rank < m]] = np.minimum(counts[voxel_rank < m], cfg.max_points_per_voxel)
    return voxels, coords, num_points


def collate(scenes: Sequence[Scene], cfg: VoxelConfig | None = None) -> dict:
    """Batch scenes into an OpenPCDet ``batch_dict`` of torch tensors (CPU).

    Keys: ``points`` float32 (N, 1 + C) with the batch index first (points outside the range removed),
    ``voxels`` float32 (M, max_pts, C), ``voxel_coords`` int32 (M, 4) as (b, z, y, x), ``voxel_num_points``
    int32 (M,), ``batch_size`` int, ``gt_boxes`` float32 (B, max(1, Kmax), 8) = (x, y, z, dx, dy, dz,
    heading, label) zero-padded (label 0 = padding; scenes with velocities, [K, 9] boxes, give
    (B, max(1, Kmax), 10) with vx, vy before the label, as OpenPCDet's nuScenes), ``frame_id`` list of str.
    """
    cfg = cfg or VoxelConfig()
    points, voxels, coords, nums = [], [], [], []
    for b, scene in enumerate(scenes):
        _, inside = voxel_indices(scene.points, cfg)
        p = scene.points[inside]
        points.append(np.c_[np.full((len(p), 1), b, np.float32), p])
        v, c, n = voxelize(scene.points, cfg)
        voxels.append(v)
        coords.append(np.c_[np.full((len(c), 1), b, np.int32), c])
        nums.append(n)
    k_max = max([1] + [len(s.gt_labels) for s in scenes])
    box_dim = scenes[0].gt_boxes.shape[1] if len(scenes) else 7
    gt = np.zeros((len(scenes), k_max, box_dim + 1), dtype=np.float32)
    for b, scene in enumerate(scenes):
        k = len(scene.gt_labels)
        gt[b, :k, :box_dim] = scene.gt_boxes
        gt[b, :k, box_dim] = scene.gt_labels
    channels = scenes[0].points.shape[1] if len(scenes) else 4
    return {
        "points": torch.from_numpy(np.concatenate(points) if points else np.zeros((0, 1 + channels), np.float32)),
        "voxels": torch.from_numpy(np.concatenate(voxels) if voxels else
                                   np.zeros((0, cfg.max_points_per_voxel, channels), np.float32)),
        "voxel_coords": torch.from_numpy(np.concatenate(coords) if coords else np.zeros((0, 4), np.int32)),
        "voxel_num_points": torch.from_numpy(np.concatenate(nums) if nums else np.zeros(0, np.int32)),
        "batch_size": len(scenes),
        "gt_boxes": torch.from_numpy(gt),
        "frame_id": [s.frame_id for s in scenes],
    }
