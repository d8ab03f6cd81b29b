"""Synthetic LiDAR scenes, voxelization and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcore_detection import synthetic as syn
from qcore_detection.synthetic import (
    CLASS_NAMES,
    SceneConfig,
    SensorConfig,
    SyntheticSplit,
    make_scene,
    points_in_boxes,
    scene_seed,
)
from qcore_detection.voxelize import VoxelConfig, collate, voxel_indices, voxelize

SENSOR = SensorConfig()
GROUND = -SENSOR.height


@pytest.fixture(scope="module")
def scenes() -> list[syn.Scene]:
    return [make_scene(s) for s in range(6)]


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    for field in ("points", "gt_boxes", "gt_labels", "num_points_in_gt"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.points.shape != c.points.shape or not np.array_equal(a.points, c.points)
    assert not np.array_equal(a.gt_boxes[:1], c.gt_boxes[:1])


def test_split_is_lazy_deterministic_and_train_val_differ() -> None:
    train, again, val = SyntheticSplit("train", 3), SyntheticSplit("train", 3), SyntheticSplit("val", 3)
    assert len(train) == 3
    np.testing.assert_array_equal(train[1].points, again[1].points)
    np.testing.assert_array_equal(train[-1].gt_boxes, again[2].gt_boxes)
    assert not np.array_equal(train[0].gt_boxes[:1], val[0].gt_boxes[:1])
    assert [s.frame_id for s in train[0:2]] == ["train_0_000000", "train_0_000001"]
    assert not np.array_equal(SyntheticSplit("train", 1, seed=1)[0].gt_boxes[:1], train[0].gt_boxes[:1])
    with pytest.raises(IndexError):
        train[3]
    with pytest.raises(ValueError):
        SyntheticSplit("test", 1)
    cached = SyntheticSplit("val", 2, cache=True)
    assert cached[0] is cached[0]


def test_train_and_val_seeds_are_disjoint() -> None:
    train = {scene_seed("train", i, s) for s in range(4) for i in range(1000)}
    val = {scene_seed("val", i, s) for s in range(4) for i in range(1000)}
    assert len(train) == 4000 and len(val) == 4000 and not train & val
    assert SyntheticSplit("val", 5, seed=2).seed_of(4) == scene_seed("val", 4, 2)


def test_arrays_labels_and_boxes(scenes: list[syn.Scene]) -> None:
    cfg = SceneConfig()
    for s in scenes:
        assert s.points.dtype == np.float32 and s.points.ndim == 2 and s.points.shape[1] == 4
        assert s.gt_boxes.dtype == np.float32 and s.gt_boxes.shape == (len(s.gt_labels), 7)
        assert s.gt_labels.dtype == np.int64
        assert len(s.gt_labels) > 0
        assert set(s.gt_labels.tolist()) <= set(range(1, len(CLASS_NAMES) + 1))
        assert (s.points[:, 3] >= 0).all() and (s.points[:, 3] <= 1).all()
        b = s.gt_boxes
        assert (np.abs(b[:, :2]) <= cfg.half_extent).all()
        assert (b[:, 3:6] > 0).all()
        np.testing.assert_allclose(b[:, 2] - b[:, 5] / 2, GROUND, atol=1e-5)  # boxes stand on the ground
        assert (b[:, 6] >= -np.pi).all() and (b[:, 6] < np.pi).all()
        assert (s.num_points_in_gt >= cfg.min_points).all()
        rng_xy = np.linalg.norm(s.points[:, :3], axis=1)
        assert rng_xy.max() < SENSOR.max_range + 1.0 and rng_xy.min() > SENSOR.min_range - 1.0


def test_sizes_follow_the_class(scenes: list[syn.Scene]) -> None:
    boxes = np.concatenate([s.gt_boxes for s in scenes])
    labels = np.concatenate([s.gt_labels for s in scenes])
    cars, peds = boxes[labels == 1], boxes[labels == 2]
    assert 3.5 < cars[:, 3].mean() < 5.3 and 1.4 < cars[:, 4].mean() < 2.2
    assert peds[:, 3].mean() < 1.0 and 1.3 < peds[:, 5].mean() < 2.1


def test_points_lie_on_ground_or_objects(scenes: list[syn.Scene]) -> None:
    for s in scenes:
        z = s.points[:, 2]
        above = z > GROUND + 0.15  # not a ground return (range noise 2 cm)
        assert (z > GROUND - 0.15).all()
        assert 0.5 < (~above).mean() < 0.99
        inside = points_in_boxes(s.points[above], s.gt_boxes, margin=0.1).any(1)
        assert inside.mean() > 0.05  # the rest hits walls, poles and bushes
        # every labelled box holds at least min_points points (its returns lie in the box up to noise)
        counts = points_in_boxes(s.points, s.gt_boxes, margin=0.1).sum(0)
        assert (counts >= SceneConfig().min_points).all()


def test_density_falls_with_range() -> None:
    dist, n, cls = [], [], []
    for seed in range(20):
        s = make_scene(seed)
        dist.append(np.hypot(s.gt_boxes[:, 0], s.gt_boxes[:, 1]))
        n.append(s.num_points_in_gt)
        cls.append(s.gt_labels)
    dist, n, cls = np.concatenate(dist), np.concatenate(n), np.concatenate(cls)
    cars = cls == 1
    near, far = n[cars & (dist < 15)], n[cars & (dist > 30)]
    assert len(near) and len(far) and near.mean() > 3 * far.mean()


def test_objects_do_not_overlap(scenes: list[syn.Scene]) -> None:
    for s in scenes:
        bev = s.gt_boxes[:, [0, 1, 3, 4, 6]].astype(np.float64)
        for k in range(len(bev)):
            assert not syn._bev_overlaps(bev[k], np.delete(bev, k, axis=0), gap=0.0)


def test_nearer_box_occludes_farther_one() -> None:
    near = [10.0, 0.0, GROUND + 1.0, 1.0, 4.0, 2.0, 0.0]
    far = [20.0, 0.0, GROUND + 1.0, 1.0, 4.0, 2.0, 0.3]
    t, hit, _ = syn._cast(np.array([near, far]), SENSOR)
    assert (hit == 0).sum() > 0
    assert (hit == 1).sum() == 0  # entirely in the shadow of the near box
    np.testing.assert_allclose(t[hit == 0].min(), 9.5, atol=0.05)
    t_alone, hit_alone, _ = syn._cast(np.array([far]), SENSOR)
    assert (hit_alone == 0).sum() > 0


def test_empty_world_is_flat_ground() -> None:
    cfg = SceneConfig(object_counts=((0, 0), (0, 0), (0, 0)), walls=(0, 0), poles=(0, 0), bushes=(0, 0))
    s = make_scene(3, scene_cfg=cfg)
    assert len(s.gt_labels) == 0 and s.gt_boxes.shape == (0, 7)
    np.testing.assert_allclose(s.points[:, 2], GROUND, atol=0.1)
    elev = np.deg2rad(np.linspace(*SENSOR.elevation_deg, SENSOR.beams))
    ground_range = SENSOR.height / np.sin(-elev[elev < 0])
    expected = ((ground_range <= SENSOR.max_range) & (ground_range >= SENSOR.min_range)).sum() * SENSOR.azimuth_steps
    assert abs(len(s.points) / expected - (1 - SENSOR.dropout)) < 0.01


def test_voxel_grid_shape() -> None:
    cfg = VoxelConfig()
    assert cfg.grid_size == (960, 960, 24)
    assert cfg.spatial_shape == (24, 960, 960)
    assert all(n % 8 == 0 for n in cfg.grid_size)
    z0, z1 = cfg.point_cloud_range[2], cfg.point_cloud_range[5]
    assert z0 < GROUND and z1 > GROUND + 4.0
    with pytest.raises(ValueError):
        VoxelConfig(point_cloud_range=(-48, -48, -2.2, 48, 48, 2.65))


def test_voxelize_conventions(scenes: list[syn.Scene]) -> None:
    cfg = VoxelConfig()
    pts = scenes[0].points
    voxels, coords, num = voxelize(pts, cfg)
    m = len(coords)
    assert voxels.dtype == np.float32 and voxels.shape == (m, cfg.max_points_per_voxel, 4)
    assert coords.dtype == np.int32 and coords.shape == (m, 3)
    assert num.dtype == np.int32 and (num >= 1).all() and (num <= cfg.max_points_per_voxel).all()
    assert len(np.unique(coords, axis=0)) == m
    assert (coords >= 0).all() and (coords < np.array(cfg.spatial_shape)).all()
    # every stored point falls in its voxel's (z, y, x); padding slots are zero
    slot = np.arange(cfg.max_points_per_voxel)[None] < num[:, None]
    stored = voxels[slot]
    idx, inside = voxel_indices(stored, cfg)
    assert inside.all()
    np.testing.assert_array_equal(idx[:, ::-1], np.repeat(coords, num, axis=0))
    assert not voxels[~slot].any()
    # counts: points in range, capped per voxel; the first points of each voxel (input order) are kept
    idx_all, inside_all = voxel_indices(pts, cfg)
    _, per_voxel = np.unique(idx_all[inside_all], axis=0, return_counts=True)
    assert num.sum() == np.minimum(per_voxel, cfg.max_points_per_voxel).sum()
    first = np.nonzero(inside_all)[0][0]
    np.testing.assert_array_equal(voxels[0, 0], pts[first])
    # max_voxels keeps the voxels seen first
    small = VoxelConfig(max_voxels=50)
    v2, c2, n2 = voxelize(pts, small)
    np.testing.assert_array_equal(c2, coords[:50])
    np.testing.assert_array_equal(v2, voxels[:50])
    np.testing.assert_array_equal(n2, num[:50])


def test_voxelize_drops_points_outside_range() -> None:
    cfg = VoxelConfig()
    pts = np.array([[0.05, 0.05, -1.75, 0.5], [48.0, 0.0, 0.0, 0.1], [0.0, 0.0, -2.3, 0.1],
                    [-48.0, -48.0, -2.2, 0.2], [0.06, 0.07, -1.7, 0.9]], dtype=np.float32)
    voxels, coords, num = voxelize(pts, cfg)
    assert coords.tolist() == [[2, 480, 480], [0, 0, 0]]
    assert num.tolist() == [2, 1]
    np.testing.assert_array_equal(voxels[0, :2], pts[[0, 4]])


def test_collate_batch_dict(scenes: list[syn.Scene]) -> None:
    cfg = VoxelConfig()
    batch = collate(scenes[:3], cfg)
    assert set(batch) == {"points", "voxels", "voxel_coords", "voxel_num_points", "batch_size", "gt_boxes",
                          "frame_id"}
    assert batch["batch_size"] == 3 and batch["frame_id"] == [s.frame_id for s in scenes[:3]]
    assert batch["points"].dtype == torch.float32 and batch["points"].shape[1] == 5
    assert batch["voxels"].dtype == torch.float32 and batch["voxel_coords"].dtype == torch.int32
    assert batch["voxel_num_points"].dtype == torch.int32
    coords = batch["voxel_coords"].numpy()
    assert coords.shape[1] == 4 and sorted(set(coords[:, 0].tolist())) == [0, 1, 2]
    for b, s in enumerate(scenes[:3]):
        v, c, n = voxelize(s.points, cfg)
        np.testing.assert_array_equal(coords[coords[:, 0] == b, 1:], c)
        p = batch["points"].numpy()
        assert (p[:, 0] == b).sum() == voxel_indices(s.points, cfg)[1].sum()
    gt = batch["gt_boxes"].numpy()
    k_max = max(len(s.gt_labels) for s in scenes[:3])
    assert gt.dtype == np.float32 and gt.shape == (3, k_max, 8)
    for b, s in enumerate(scenes[:3]):
        k = len(s.gt_labels)
        np.testing.assert_array_equal(gt[b, :k, :7], s.gt_boxes)
        np.testing.assert_array_equal(gt[b, :k, 7], s.gt_labels)
        assert (gt[b, k:] == 0).all()  # padding: label 0
    empty = syn.Scene(points=np.zeros((0, 4), np.float32), gt_boxes=np.zeros((0, 7), np.float32),
                      gt_labels=np.zeros(0, np.int64), num_points_in_gt=np.zeros(0, np.int64), frame_id="e")
    eb = collate([empty], cfg)
    assert eb["gt_boxes"].shape == (1, 1, 8) and eb["voxels"].shape == (0, cfg.max_points_per_voxel, 4)
