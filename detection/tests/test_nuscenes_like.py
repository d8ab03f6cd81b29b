"""The nuScenes-like synthetic world: determinism, contents, ranges, occlusion, motion; the velocity head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcore_detection import nuscenes_like as nl
from qcore_detection.head import assign_targets, decode_boxes
from qcore_detection.model import ModelConfig, build_model, head_outputs
from qcore_detection.nuscenes_like import NUSCENES_CLASS_NAMES, WorldConfig, make_nuscenes_scene, nuscenes_sensor
from qcore_detection.synthetic import SyntheticSplit
from qcore_detection.train import flip_scene, world_preset
from qcore_detection.voxelize import collate

ONE = WorldConfig(sweeps=1)
SENSOR = nuscenes_sensor()


@pytest.fixture(scope="module")
def scenes() -> list:
    """Four single-sweep scenes and one default (5-sweep) scene."""
    return [make_nuscenes_scene(s, ONE) for s in range(4)] + [make_nuscenes_scene(11)]


def test_deterministic_by_seed_and_split_selects_the_world(scenes: list) -> None:
    again = make_nuscenes_scene(3, ONE)
    for f in ("points", "gt_boxes", "gt_labels", "num_points_in_gt", "sensor_origins"):
        np.testing.assert_array_equal(getattr(again, f), getattr(scenes[3], f))
    assert scenes[2].points.shape != again.points.shape or not np.array_equal(scenes[2].points, again.points)
    split = SyntheticSplit("val", 2, world="nuscenes", scene_cfg=ONE)
    np.testing.assert_array_equal(split[1].points, make_nuscenes_scene(split.seed_of(1), ONE).points)
    assert split[1].frame_id == "nus_val_0_000001" and split[1].class_names == NUSCENES_CLASS_NAMES
    with pytest.raises(ValueError, match="world"):
        SyntheticSplit("val", 1, world="kitti")


def test_scene_contents_shapes_and_ranges(scenes: list) -> None:
    labels = np.concatenate([s.gt_labels for s in scenes])
    assert set(labels.tolist()) == set(range(1, len(NUSCENES_CLASS_NAMES) + 1))  # all 7 classes occur
    for s in scenes:
        assert s.points.dtype == np.float32 and s.points.shape[1] == 5
        assert s.gt_boxes.shape == (len(s.gt_labels), 9) and len(s.gt_labels) >= 15
        assert np.all(s.num_points_in_gt >= ONE.min_points)
        assert np.all(np.abs(s.gt_boxes[:, :2]) < ONE.label_range)
        assert np.all((s.gt_boxes[:, 6] >= -np.pi) & (s.gt_boxes[:, 6] < np.pi))
        assert s.points[:, 3].min() >= 0 and s.points[:, 3].max() <= 1
        # every point within the sensor's range of the sweep that produced it (plus range noise)
        sweep = np.rint(s.points[:, 4] / ONE.sweep_dt).astype(int)
        dist = np.linalg.norm(s.points[:, :3] - s.sensor_origins[sweep], axis=1)
        assert dist.max() <= SENSOR.max_range + 0.2 and dist.min() >= SENSOR.min_range - 0.2
    multi = scenes[-1]
    assert sorted(np.unique(np.rint(multi.points[:, 4] / 0.05)).astype(int).tolist()) == [0, 1, 2, 3, 4]
    assert len(multi.sensor_origins) == 5 and np.abs(multi.gt_boxes[:, 7:9]).max() > 1.0  # something moves
    # overlapping sizes: some trucks are shorter than some cars
    boxes = np.concatenate([s.gt_boxes for s in scenes])
    assert boxes[labels == 2, 0 + 3].min() < boxes[labels == 1, 3].max()


def _hand_world(occluder: bool, speed: float = 0.0) -> nl._World:
    """Flat ground, a wall 30 m ahead and (optionally) a truck 15 m ahead between the sensor and the wall."""
    ground = nl._Ground(g0=-SENSOR.height, a=0.0, b=0.0, amp=np.zeros(3), k=np.ones((3, 2)), phase=np.zeros(3))
    street = nl._Street(angle=0.0, v_ego=0.0, lanes=1, lane_width=3.5, parking=(False, False), parking_width=2.5,
                        sidewalk=(3.0, 3.0), cross_u=None, cross_half=4.0)
    w = nl._World(ground=ground, street=street)
    w.add_static(30.5, 0.0, (1.0, 20.0, 6.0), 0.0, 0.5)
    if occluder:
        assert w.add_object(np.random.default_rng(0), "truck", 15.0, 0.0, 0.0, speed, 0.1,
                            size=np.array([7.0, 2.5, 3.0]))
    return w


def test_occlusion_removes_points_behind_boxes() -> None:
    rng = np.random.default_rng(0)
    shadow = []
    for occluder in (False, True):
        pts, own = nl._sweep(_hand_world(occluder), ONE, SENSOR, 0, 0.0, 0.0, rng)
        on_wall = (pts[:, 0] > 29.5) & (np.abs(pts[:, 1]) < 1.0) & (pts[:, 2] > -1.5) & (pts[:, 2] < 1.5)
        shadow.append(int(on_wall.sum()))
        if occluder:
            assert (own == 0).sum() > 100  # the truck itself is seen
    assert shadow[0] > 20 and shadow[1] == 0


def test_moving_object_is_smeared_over_sweeps_and_compensated_ego_motion() -> None:
    w = _hand_world(True, speed=10.0)
    cfg = WorldConfig(sweeps=3)
    rng = np.random.default_rng(0)
    xs, walls = [], []
    for k in range(3):  # the ego car drives at 8 m/s: static surfaces stay put in the current frame
        pts, own = nl._sweep(w, cfg, SENSOR, k, 8.0, 0.0, rng)
        xs.append(pts[own == 0, 0].min())  # the truck's rear face
        walls.append(np.median(pts[(pts[:, 0] > 29.0) & (np.abs(pts[:, 1]) > 3), 0]))
        np.testing.assert_allclose(pts[:, 4], k * cfg.sweep_dt)
    np.testing.assert_allclose(np.diff(xs), -10.0 * cfg.sweep_dt, atol=0.1)
    np.testing.assert_allclose(walls, 30.0, atol=0.1)


def test_collate_flip_and_velocity_targets(scenes: list) -> None:
    s = scenes[0]
    vcfg, preset = world_preset("nuscenes")
    bd = collate([s], vcfg)
    assert bd["gt_boxes"].shape == (1, len(s.gt_labels), 10) and bd["voxels"].shape[2] == 5
    np.testing.assert_array_equal(bd["gt_boxes"][0, :, 9].numpy(), s.gt_labels)
    f = flip_scene(s, True, True)
    np.testing.assert_allclose(f.gt_boxes[:, 7:9], -s.gt_boxes[:, 7:9])
    np.testing.assert_allclose(f.points[:, :2], -s.points[:, :2])
    # velocity targets at the positives; decoding returns 9-column boxes
    idx = torch.tensor([[0, 10, 10], [0, 20, 30]])
    gt = torch.tensor([[[1.0, 1.0, 0.0, 4.0, 2.0, 1.5, 0.2, 3.0, -1.0, 1.0]]])
    _, pos, reg = assign_targets(idx, gt, (1.0, 1.0), (-10.0, -10.0), 7, velocity=True)
    assert pos.tolist() == [0] and reg.shape == (1, 10)
    np.testing.assert_allclose(reg[0, 8:].numpy(), [3.0, -1.0])
    with pytest.raises(ValueError, match="10 columns"):
        assign_targets(idx, gt[..., [0, 1, 2, 3, 4, 5, 6, 9]], (1.0, 1.0), (-10.0, -10.0), 7, velocity=True)
    outs = {"center": torch.zeros(2, 2), "center_z": torch.zeros(2, 1), "dim": torch.zeros(2, 3),
            "rot": torch.zeros(2, 2), "vel": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    assert decode_boxes(outs, idx, (1.0, 1.0), (0.0, 0.0))[:, 7:].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_velocity_model_trains_on_a_nuscenes_batch(scenes: list) -> None:
    vcfg, preset = world_preset("nuscenes")
    cfg = ModelConfig(spatial_shape=vcfg.spatial_shape, voxel_size=vcfg.voxel_size,
                      point_cloud_range=vcfg.point_cloud_range, channels=(4, 8, 8, 8, 8, 8), blocks=1,
                      bev_channels=8, **preset)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = build_model(cfg).train()
    bd = collate([scenes[0]], vcfg)
    ret, tb, _ = model(bd)
    assert torch.isfinite(ret["loss"]) and tb["num_pos"] == len(scenes[0].gt_labels)
    assert head_outputs(bd).shape[1] == 7 + 10  # heatmaps of 7 classes, 8 box values, vx, vy
    model.eval()
    with torch.no_grad():
        preds, _ = model(collate([scenes[0]], vcfg))
    assert preds[0]["pred_boxes"].shape[1] == 9

