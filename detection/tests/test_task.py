"""The detection task through qcore's real pipeline: uniform, rdoq and aciq on the embedded detector with a
handful of synthetic scenes, and the task's errors."""

import pytest
import torch

from qcore import QcoreError, RunConfig, quant_layers, run
from qcore.testing import make_host
from qcore_aciq import plugin as aciq_plugin
from qcore_detection import plugin
from qcore_rdoq import plugin as rdoq_plugin

SMALL = {"task": "detection", "calib_size": 2, "eval_size": 4, "batch_size": 2}
FIRST_STAGES = "backbone.conv_input.*,backbone.conv1.*"


@pytest.fixture(scope="module")
def host():
    return make_host(("detection", plugin), ("rdoq", rdoq_plugin), ("aciq", aciq_plugin), tiny=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path / "cache"))


def test_uniform_w8a8_keeps_the_fp_map(host):
    out = run(RunConfig(plugin="uniform", w_bits=8, a_bits=8, **SMALL), host)
    r = out.result
    assert r["metric"] == "mAP" and r["fp"] > 50.0
    assert abs(r["quant"] - r["fp"]) <= 1.0
    assert {"AP/car", "AP/pedestrian", "AP/cyclist"} <= set(r["quant_metrics"])
    q = r["quantized"]
    assert len(q["weight_layers"]) == 42 and q["deployable"]
    assert {"subm3d", "spconv3d", "subm2d", "spconv2d"} <= set(q["summary"].split("(")[1].split(";")[0]
                                                               .replace(",", " ").split())


def test_rdoq_runs_on_sparse_layers_without_special_cases(host):
    out = run(RunConfig(plugin="rdoq", target_bits=4.0, **SMALL,
                        options={"include": "backbone.conv_input.*,backbone.conv1.0.*", "act_targets": "none",
                                 "first_last": "same", "curve_samples": 2, "group": 16,
                                 "min_bits": 2, "max_bits": 6}), host)
    assert out.plan.meta["engine"] == "replay"  # torch.fx cannot trace spconv: the hook-based engine, exact
    assert out.result["w_bits_avg"] <= 4.0 + 1e-9
    assert len(out.plan.layers) == 3
    assert any(s.weight.mixed and len(set(s.weight.group_bits)) > 1 for s in out.plan.layers.values()) or \
        len({s.weight.bits for s in out.plan.layers.values()}) > 1  # bits differ across groups or layers


def test_rdoq_deadzone_search_on_sparse_layers(host):
    """The dead-zone grid fits spconv weights ([C_out, k, k, k, C_in]) through the same generic path; curves from
    projected Gauss-Newton (backward passes through spconv inside the task's grad_context)."""
    opts = {"include": "backbone.conv_input.*,backbone.conv1.0.*", "act_targets": "none", "first_last": "same",
            "engine": "second-order", "curve_samples": 2, "group": 8, "min_bits": 2, "max_bits": 4, "deadzones": 2}
    with pytest.raises(QcoreError, match="projections=K"):
        run(RunConfig(method="rdoq-deadzone", target_bits=3.0, **SMALL, options=opts), host)
    out = run(RunConfig(method="rdoq-deadzone", target_bits=3.0, **SMALL, options={**opts, "projections": 2}), host)
    assert out.plan.meta["engine"] == "second-order" and out.plan.meta["projections"] == 2
    assert out.plan.meta["directions"] == "per sample"  # the task splits its batches into scenes
    assert out.result["w_bits_avg"] <= 3.0 + 1e-9 and out.result["quant"] is not None
    specs = [s.weight for s in out.plan.layers.values()]
    assert all(s.quantizer == "deadzone" and s.group_params is not None for s in specs)
    assert out.result["quantized"]["deployable"] is False


def test_split_gives_one_batch_per_scene_with_the_same_targets(host):
    """RDOQ's projected curves draw their random directions per scene through the task's ``split``: each piece is
    one scene of the batch, and the distortion target of the pieces is the batch's, scene by scene."""
    inst = host.get("task", "detection")().build(RunConfig(**{**SMALL, "eval_size": 1}), host)
    batch = inst.calibration[0]
    pieces = inst.split(batch)
    assert [p["batch_size"] for p in pieces] == [1, 1] and [p["frame_id"][0] for p in pieces] == batch["frame_id"]
    with torch.no_grad():
        whole = inst.forward(inst.model, batch)
        parts = torch.cat([inst.forward(inst.model, p) for p in pieces])
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)


def _rows_sorted(points):
    """``points`` with its rows in lexicographic order (a multiset compare: duplicates count)."""
    import numpy as np

    return points[np.lexsort(points.T[::-1])]


#: which side of the sensor tile i of ``scene_tiles(scene, tiles)`` holds: (x >= 0, y >= 0), None: either
TILE_SIDES = {2: [(False, None), (True, None)], 4: [(False, False), (False, True), (True, False), (True, True)]}


@pytest.mark.parametrize("tiles", [2, 4])
def test_curve_tiles_cut_every_scene_into_disjoint_pieces(host, tiles):
    """``-o curve_tiles=2|4``: the task's ``split`` gives one batch per half / quadrant of every scene (RDOQ's
    projected curves then draw their directions per tile); the tiles hold every point of the scene exactly once,
    each in its own half / quadrant, and 1 (the default) keeps the scenes whole."""
    import numpy as np

    from qcore_detection.synthetic import SyntheticSplit
    from qcore_detection.zoo import scene_tiles

    scene = SyntheticSplit("train", 1, seed=0)[0]
    assert scene_tiles(scene, 1) == [scene]
    parts = scene_tiles(scene, tiles)
    assert len(parts) == tiles and all(len(p.points) > 0 for p in parts)
    assert np.array_equal(_rows_sorted(np.concatenate([p.points for p in parts])), _rows_sorted(scene.points))
    for part, (east, north) in zip(parts, TILE_SIDES[tiles], strict=True):
        assert bool((part.points[:, 0] >= 0).all()) if east else bool((part.points[:, 0] < 0).all())
        if north is not None:
            assert bool((part.points[:, 1] >= 0).all()) if north else bool((part.points[:, 1] < 0).all())
        assert np.array_equal(part.gt_boxes, scene.gt_boxes)
    inst = host.get("task", "detection")().build(RunConfig(**{**SMALL, "eval_size": 1},
                                                           options={"curve_tiles": str(tiles)}), host)
    assert inst.split_unit == f"per tile ({tiles} per scene)"
    batch = inst.calibration[0]
    pieces = inst.split(batch)
    assert len(pieces) == tiles * batch["batch_size"] and all(p["batch_size"] == 1 for p in pieces)
    assert all(p["curve_tiles"] == tiles for p in pieces)
    assert sum(len(p["points"]) for p in pieces) == len(batch["points"])
    with torch.no_grad():  # a tile's BEV target is scaled so that the mean square over the tiles is the scene's
        whole = inst.forward(inst.model, batch).pow(2).mean()
        tiled = torch.stack([inst.forward(inst.model, p).pow(2).mean() for p in pieces]).mean()
    assert 0.8 < float(tiled / whole) < 1.25


def test_empty_tiles_are_dropped_and_the_rest_scaled_by_the_tiles_kept(host, monkeypatch):
    """A scene without points on one side of the sensor (a detector whose range starts at x = 0) has empty tiles:
    they are left out (spconv cannot run an empty scene) and the kept tiles' targets are scaled by the square
    root of their number, so that they still carry the scene's distortion."""
    import numpy as np

    import qcore_detection.zoo as zoo
    from qcore_detection.synthetic import SyntheticSplit

    class FrontOnly(SyntheticSplit):
        def __getitem__(self, index):  # type: ignore[override]
            scene = super().__getitem__(index)
            return zoo.dataclasses.replace(scene, points=scene.points[scene.points[:, 0] >= 0])

    monkeypatch.setattr(zoo, "SyntheticSplit", FrontOnly)
    inst = host.get("task", "detection")().build(RunConfig(**{**SMALL, "eval_size": 1},
                                                           options={"curve_tiles": 4}), host)
    batch = inst.calibration[0]
    pieces = inst.split(batch)
    assert len(pieces) == 2 * batch["batch_size"] and all(p["curve_tiles"] == 2 for p in pieces)
    assert sum(len(p["points"]) for p in pieces) == len(batch["points"])
    with torch.no_grad():
        whole = inst.forward(inst.model, batch).pow(2).mean()
        tiled = torch.stack([inst.forward(inst.model, p).pow(2).mean() for p in pieces]).mean()
    assert 0.8 < float(tiled / whole) < 1.25
    empty = zoo.dataclasses.replace(FrontOnly("train", 1)[0], points=np.zeros((0, 4), np.float32))
    with pytest.raises(QcoreError, match="has no points"):
        zoo.scene_tiles(empty, 4)


def test_curve_tiles_values_and_where_they_apply(host):
    """One parser for ``-o curve_tiles``: the command line's ``"4"`` and the Python API's ``4`` and ``4.0`` are 4
    in the options and in the task; ``abc``, ``04`` and 3 are refused, as is a model loader without tiles."""
    from qcore_detection.task import DetectionOptions, parse_curve_tiles

    assert parse_curve_tiles("4") == parse_curve_tiles(4) == parse_curve_tiles(4.0) == 4
    assert DetectionOptions(curve_tiles=4.0).curve_tiles == 4  # type: ignore[arg-type]
    assert isinstance(DetectionOptions(curve_tiles=4.0).curve_tiles, int)  # type: ignore[arg-type]
    for bad in ("abc", "04", "3", 3, 4.5, " 4"):
        with pytest.raises(QcoreError, match="is not supported; use one of 1, 2, 4"):
            parse_curve_tiles(bad)
        with pytest.raises(QcoreError, match="curve_tiles"):
            host.get("task", "detection")().build(RunConfig(**SMALL, options={"curve_tiles": bad}), host)
    with pytest.raises(QcoreError, match="embedded detectors"):
        host.get("task", "detection")().build(RunConfig(**{**SMALL, "model": "pcdet:x.yaml"},
                                                        options={"curve_tiles": 4}), host)


@pytest.mark.parametrize(("config", "unused"), [
    ({"plugin": "uniform"}, "allocator"),
    ({"method": "rdoq"}, "not second-order"),
    ({"method": "rdoq", "options": {"engine": "second-order", "projections": 2}}, None),
])
def test_curve_tiles_without_effect_are_warned(host, caplog, config, unused):
    """``-o curve_tiles`` only changes RDOQ's projected second-order curves: another allocator or engine gets one
    warning saying so, that run none."""
    import logging

    options = {**config.get("options", {}), "curve_tiles": 2}
    cfg = RunConfig(**{**SMALL, "eval_size": 1}, **{k: v for k, v in config.items() if k != "options"},
                    options=options)
    with caplog.at_level(logging.WARNING, logger="qcore_detection"):
        host.get("task", "detection")().build(cfg, host)
    warned = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(warned) == (0 if unused is None else 1)
    if unused:
        assert "curve_tiles=2" in warned[0] and unused in warned[0]


def test_plan_records_directions_per_tile(host):
    """With ``-o curve_tiles=2`` RDOQ's projected curves draw their directions per half scene, and plan.json's
    ``meta.directions`` says so instead of ``per sample``."""
    opts = {"include": "backbone.conv_input.*", "act_targets": "none", "first_last": "same", "engine": "second-order",
            "projections": 2, "curve_samples": 2, "group": 16, "min_bits": 2, "max_bits": 4, "curve_tiles": 2}
    out = run(RunConfig(method="rdoq", target_bits=3.0, **{**SMALL, "eval_size": 1}, options=opts), host)
    assert out.plan.meta["directions"] == "per tile (2 per scene)"


def test_forward_key_names_the_distortion_target(host):
    """RDOQ's curve caches key on ``TaskInstance.forward_key``: the detection task's ``target`` is in it."""
    build = host.get("task", "detection")().build
    bev = build(RunConfig(**{**SMALL, "eval_size": 1}), host)
    head = build(RunConfig(**{**SMALL, "eval_size": 1}, options={"target": "head"}), host)
    assert bev.forward_key == {"target": "bev"} and head.forward_key == {"target": "head"}
    assert bev.split_unit == "per sample"


def test_aciq_is_task_agnostic(host):
    out = run(RunConfig(plugin="aciq", **SMALL, options={"include": FIRST_STAGES, "first_last": "same",
                                                          "act_correction": "affine"}), host)
    assert out.result["a_bits_avg"] <= 4.0 + 1e-9 and out.result["quant"] is not None
    assert out.result["quantized"]["act_correction"] == "affine"  # gains and shifts reach sparse features
    assert all(q.out_scale is not None and q.out_correction is not None for q in quant_layers(out.model).values())


def test_head_target_and_errors(host):
    inst = host.get("task", "detection")().build(RunConfig(**SMALL, options={"target": "head"}), host)
    y = inst.forward(inst.model, inst.calibration[0])
    assert y.dim() == 2 and y.shape[1] == 11 and torch.isfinite(y).all()
    with pytest.raises(QcoreError, match="unknown detection zoo model"):
        host.get("task", "detection")().build(RunConfig(model="zoo:nope", **SMALL), host)
    with pytest.raises(QcoreError, match="synthetic LiDAR"):
        host.get("task", "detection")().build(RunConfig(data="/nowhere", **SMALL), host)
    with pytest.raises(QcoreError, match="belongs to task 'classification'|unknown model prefix"):
        host.get("task", "detection")().build(RunConfig(model="tv:resnet18", **SMALL), host)


def test_corrupt_weights_are_a_clear_error(host, tmp_path):
    from qcore_detection.zoo import MODELS

    bad = tmp_path / "voxelnext_lite.safetensors"
    bad.write_bytes(b"not a safetensors file")
    (tmp_path / "voxelnext_lite.json").write_text(MODELS["voxelnext_lite"].with_suffix(".json").read_text())
    with pytest.raises(QcoreError, match="corrupt"):
        host.get("task", "detection")().build(RunConfig(weights=bad, **SMALL), host)


def test_weights_record_without_voxel_config_is_a_clear_error(host, tmp_path):
    import json

    from qcore_detection.zoo import MODELS

    src = MODELS["voxelnext_lite"]
    (tmp_path / "m.safetensors").write_bytes(src.read_bytes())
    record = json.loads(src.with_suffix(".json").read_text())
    del record["voxel_config"]
    (tmp_path / "m.json").write_text(json.dumps(record))
    with pytest.raises(QcoreError, match="corrupt or not from"):
        host.get("task", "detection")().build(RunConfig(weights=tmp_path / "m.safetensors", **SMALL), host)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7], ids=["0-byte", "7-byte"])
def test_empty_or_tiny_weights_file_is_a_clear_error(tmp_path, content):
    """An exception without a message (``EOFError()``) must not break the error message itself."""
    from qcore_detection.zoo import MODELS, load_detector

    bad = tmp_path / "m.safetensors"
    bad.write_bytes(content)
    (tmp_path / "m.json").write_text(MODELS["voxelnext_lite"].with_suffix(".json").read_text())
    with pytest.raises(QcoreError, match="cannot load detector weights .* the file is corrupt"):
        load_detector(bad)


def test_exception_without_message_is_reported(tmp_path, monkeypatch):
    from qcore_detection import zoo

    def empty(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(zoo, "model_from_record", empty)
    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(QcoreError, match=r"\(EOFError: \(no message\)\)"):
        zoo.load_detector(tmp_path / "m.safetensors")


def test_task_gives_backward_passes_their_spconv_guard(host):
    """Backward passes through spconv on CPU need spconv_cpu_guard (one thread, no CUDA stream lookup); the task
    hands it to allocators as TaskInstance.grad_context (core's default: None)."""
    from qcore import TaskInstance

    assert TaskInstance.__dataclass_fields__["grad_context"].default is None
    inst = host.get("task", "detection")().build(RunConfig(**SMALL), host)
    threads = torch.get_num_threads()
    with inst.grad_context():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_nuscenes_like_zoo_model_loads_its_world_and_evaluates():
    """zoo:voxelnext_nuscenes_like: its record selects the nuScenes-like world (7 classes, 5-feature points,
    velocity head) for calibration and evaluation."""
    from qcore_detection.zoo import load_zoo

    setup = load_zoo("voxelnext_nuscenes_like", None, RunConfig(task="detection", calib_size=1, eval_size=1,
                                                                batch_size=1))
    classes = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_cone", "barrier")
    assert setup.class_names == classes and "nuscenes world" in setup.data["evaluation"]
    assert setup.calibration[0]["voxels"].shape[2] == 5 and setup.calibration[0]["gt_boxes"].shape[2] == 10
    convs = [n for n, m in setup.model.named_modules() if type(m).__name__ in ("SubMConv3d", "SparseConv3d",
                                                                               "SubMConv2d", "SparseConv2d")]
    assert setup.model.cfg.velocity and len(convs) == 32  # 18 3-D, 2 BEV, 6 head branches x 2 (incl. velocity)
    metrics = setup.evaluate(setup.model)
    assert {f"AP/{c}" for c in classes} <= set(metrics) and 0 <= metrics["mAP"] <= 100
