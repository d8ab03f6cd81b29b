"""The VoxelNeXt-style detector: forward in eval and training mode, targets, decoding, layers, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qcore import (
    LayerSpec,
    Observer,
    QuantLayer,
    QuantSpec,
    UniformFakeQuant,
    discover_layers,
    fold_batchnorm,
    measure_layers,
    replace_module,
)
from qcore.ranges import minmax_range
from qcore_detection.head import assign_targets, circle_nms, post_process
from qcore_detection.model import (
    HEAD_OUTPUT_ORDER,
    ModelConfig,
    VoxelNeXtLite,
    bev_dense,
    build_model,
    head_outputs,
    load_model,
)
from qcore_detection.spconv_layers import spconv_cpu_guard, spconv_layer_info
from qcore_detection.synthetic import SyntheticSplit
from qcore_detection.train import save_checkpoint
from qcore_detection.voxelize import VoxelConfig, collate

# a 6.4 m x 6.4 m x 1.6 m grid: stride 8 gives an 8 x 8 BEV map
TINY = ModelConfig(spatial_shape=(8, 64, 64), point_cloud_range=(-3.2, -3.2, -0.8, 3.2, 3.2, 0.8),
                   channels=(4, 8, 8, 8, 8, 8), bev_channels=8, score_threshold=0.0)


def tiny_batch(seed: int = 0, batch: int = 2, voxels: int = 300) -> dict:
    """Random voxels (points inside their voxel) and two boxes per sample (the last one padding)."""
    g = torch.Generator().manual_seed(seed)
    nz, ny, nx = TINY.spatial_shape
    coords = torch.stack([torch.randint(0, n, (voxels,), generator=g) for n in (batch, nz, ny, nx)], 1)
    coords = torch.unique(coords, dim=0).int()
    m = len(coords)
    num = torch.randint(1, 6, (m,), generator=g).int()
    lower = torch.tensor(TINY.point_cloud_range[:3])
    size = torch.tensor(TINY.voxel_size)
    xyz = lower + (coords[:, [3, 2, 1]].float()[:, None] + torch.rand(m, 5, 3, generator=g)) * size
    pts = torch.cat([xyz, torch.rand(m, 5, 1, generator=g)], -1)
    pts = pts * (torch.arange(5)[None, :, None] < num[:, None, None])
    gt = torch.zeros(batch, 2, 8)
    gt[:, 0] = torch.tensor([0.5, -1.0, 0.0, 4.0, 1.8, 1.5, 0.3, 1.0])
    gt[0, 1] = torch.tensor([-1.5, 1.2, 0.1, 0.6, 0.6, 1.7, -1.0, 2.0])
    return {"voxels": pts, "voxel_num_points": num, "voxel_coords": coords, "batch_size": batch, "gt_boxes": gt}


@pytest.fixture
def model() -> VoxelNeXtLite:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def test_eval_forward_structure(model: VoxelNeXtLite) -> None:
    bd = tiny_batch()
    with torch.no_grad():
        pred_dicts, ret_dict = model(bd)
    assert isinstance(ret_dict, dict) and len(pred_dicts) == 2
    for p in pred_dicts:
        n = len(p["pred_scores"])
        assert 0 < n <= TINY.max_detections
        assert p["pred_boxes"].shape == (n, 7) and p["pred_labels"].shape == (n,)
        assert p["pred_labels"].min() >= 1 and p["pred_labels"].max() <= len(TINY.class_names)
        assert torch.all(p["pred_scores"][:-1] >= p["pred_scores"][1:])
        assert torch.all(p["pred_boxes"][:, 3:6] > 0)
    enc = bd["encoded_spconv_tensor"]
    assert bd["encoded_spconv_tensor_stride"] == 8 and list(enc.spatial_shape) == [8, 8]
    assert enc.indices.shape[1] == 3 and enc.features.shape == (len(enc.indices), TINY.bev_channels)
    assert bd["voxel_features"].shape == (len(bd["voxels"]), 4)
    outs = bd["head_outputs"]
    assert tuple(outs) == HEAD_OUTPUT_ORDER
    assert outs["hm"].shape == (len(enc.indices), 3) and outs["rot"].shape == (len(enc.indices), 2)
    assert head_outputs(bd).shape == (len(enc.indices), 3 + 8)


def test_bev_dense_matches_sparse(model: VoxelNeXtLite) -> None:
    bd = tiny_batch()
    with torch.no_grad():
        model(bd)
    dense = bev_dense(bd)
    enc = bd["encoded_spconv_tensor"]
    assert dense.shape == (2, TINY.bev_channels, 8, 8)
    idx = enc.indices.long()
    torch.testing.assert_close(dense[idx[:, 0], :, idx[:, 1], idx[:, 2]], enc.features)
    assert dense.abs().sum() == pytest.approx(enc.features.abs().sum().item(), rel=1e-5)


def test_eval_is_deterministic(model: VoxelNeXtLite) -> None:
    with torch.no_grad():
        a, b = tiny_batch(), tiny_batch()
        pa, _ = model(a)
        pb, _ = model(b)
    assert torch.equal(head_outputs(a), head_outputs(b))
    for x, y in zip(pa, pb, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k])


def test_train_forward_gives_finite_loss_and_gradients(model: VoxelNeXtLite) -> None:
    model.train()
    ret, tb_dict, disp_dict = model(tiny_batch())
    assert torch.isfinite(ret["loss"]) and ret["loss"] > 0
    assert {"loss_hm", "loss_loc", "num_pos"} <= set(tb_dict) and tb_dict["num_pos"] == 3
    assert isinstance(disp_dict, dict)
    with spconv_cpu_guard():
        ret["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.conv_input.conv.weight.grad.abs().sum() > 0


def test_targets_put_positive_at_nearest_voxel() -> None:
    indices = torch.tensor([[0, 0, 0], [0, 2, 3], [0, 2, 4], [0, 5, 5], [1, 2, 3]])  # (b, y, x)
    gt = torch.zeros(2, 2, 8)
    gt[0, 0] = torch.tensor([3.3, 2.2, -0.5, 4.0, 2.0, 1.5, 0.5, 2.0])  # cell (x 3.3, y 2.2) with 1 m cells
    hm, pos, reg = assign_targets(indices, gt, cell=(1.0, 1.0), origin=(0.0, 0.0), num_classes=3)
    assert pos.tolist() == [1]  # voxel centre (3.5, 2.5) is the nearest
    assert hm[1, 1] == 1.0 and hm[:, [0, 2]].abs().sum() == 0
    # radius 2 cells (min_radius), sigma 5/6: voxel (x 4.5, y 2.5) is 1.53 cells^2 away, the others beyond 2 cells
    assert hm[2, 1].item() == pytest.approx(math.exp(-1.53 / (2 * (5 / 6) ** 2)), rel=1e-4)
    assert hm[0, 1] == 0 and hm[3, 1] == 0 and hm[4].sum() == 0  # far, far, other sample
    expected = [0.3, 0.2, -0.5, math.log(4.0), math.log(2.0), math.log(1.5), math.sin(0.5), math.cos(0.5)]
    torch.testing.assert_close(reg[0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_decoding_inverts_targets() -> None:
    """Head outputs equal to the regression targets (and a confident heatmap at the positive) decode back to
    the ground-truth box."""
    indices = torch.tensor([[0, y, x] for y in range(6) for x in range(6)])
    box = torch.tensor([2.6, 3.4, 0.2, 4.2, 1.9, 1.6, -2.5, 1.0])
    hm, pos, reg = assign_targets(indices, box.reshape(1, 1, 8), (0.8, 0.8), (0.0, 0.0), num_classes=3)
    n = len(indices)
    outputs = {"hm": torch.full((n, 3), -10.0), "center": torch.zeros(n, 2), "center_z": torch.zeros(n, 1),
               "dim": torch.zeros(n, 3), "rot": torch.zeros(n, 2)}
    outputs["hm"][pos, 0] = 10.0
    for name, part in zip(("center", "center_z", "dim", "rot"), reg[0].split([2, 1, 3, 2]), strict=True):
        outputs[name][pos] = part
    preds = post_process(outputs, indices, 1, (0.8, 0.8), (0.0, 0.0), max_proposals=10, score_threshold=0.5,
                         nms_radius=(2.0, 0.4, 1.0), max_detections=5)
    assert preds[0]["pred_labels"].tolist() == [1]
    torch.testing.assert_close(preds[0]["pred_boxes"][0], box[:7], atol=1e-5, rtol=0)


def test_reg_radius_regresses_every_voxel_near_a_centre_for_its_nearest_box() -> None:
    """With ``reg_radius`` each active voxel within the radius of a box centre is a regression positive of the
    nearest centre (once), each box's nearest voxel stays first; decoded at any of them the box comes back, so a
    heatmap peak off the nearest voxel still places the box right."""
    indices = torch.tensor([[0, y, x] for y in range(4) for x in range(8)] + [[1, 1, 1]])  # (b, y, x), 1 m cells
    gt = torch.zeros(2, 2, 8)
    gt[0, 0] = torch.tensor([2.3, 1.4, 0.0, 4.0, 2.0, 1.5, 0.3, 1.0])
    gt[0, 1] = torch.tensor([4.6, 1.5, 0.2, 10.0, 3.0, 3.0, -0.2, 3.0])
    hm0, pos0, reg0 = assign_targets(indices, gt, (1.0, 1.0), (0.0, 0.0), num_classes=3)
    hm, pos, reg = assign_targets(indices, gt, (1.0, 1.0), (0.0, 0.0), num_classes=3, reg_radius=1.5)
    torch.testing.assert_close(hm, hm0)  # the heatmap does not depend on it
    assert pos[:2].tolist() == pos0.tolist() == [1 * 8 + 2, 1 * 8 + 4]  # voxel centres (2.5, 1.5), (4.5, 1.5)
    torch.testing.assert_close(reg[:2], reg0)
    centres = gt[0, :, :2]
    vox = torch.stack([indices[pos, 2], indices[pos, 1]], 1).float()
    d = torch.cdist(vox + 0.5, centres)
    all_centres = torch.stack([indices[:32, 2], indices[:32, 1]], 1).float() + 0.5  # sample 0's voxels
    expected = torch.nonzero(torch.cdist(all_centres, centres).min(1).values <= 1.5).squeeze(1).tolist()
    assert sorted(pos.tolist()) == expected and len(set(pos.tolist())) == len(pos)  # sample 1 has no boxes
    assert len(pos) > 2
    owner = torch.tensor([0, 1] + d[2:].argmin(1).tolist())
    torch.testing.assert_close(vox + reg[:, :2], centres[owner])  # offsets point at the owner's centre
    torch.testing.assert_close(reg[:, 3:6], torch.log(gt[0, owner, 3:6]))
    # decode at an extra positive of the bus-like second box: the box comes back
    extra = int(pos[(owner == 1).nonzero()[-1]])
    n = len(indices)
    outputs = {"hm": torch.full((n, 3), -10.0), "center": torch.zeros(n, 2), "center_z": torch.zeros(n, 1),
               "dim": torch.zeros(n, 3), "rot": torch.zeros(n, 2)}
    outputs["hm"][extra, 2] = 10.0
    row = reg[list(pos).index(extra)]
    for name, part in zip(("center", "center_z", "dim", "rot"), row.split([2, 1, 3, 2]), strict=True):
        outputs[name][extra] = part
    preds = post_process(outputs, indices, 2, (1.0, 1.0), (0.0, 0.0), max_proposals=10, score_threshold=0.5,
                         nms_radius=(2.0, 0.4, 1.0), max_detections=5)
    torch.testing.assert_close(preds[0]["pred_boxes"][0], gt[0, 1, :7], atol=1e-5, rtol=0)


def test_circle_nms_keeps_best_of_close_centres() -> None:
    centers = torch.tensor([[0.0, 0.0], [0.3, 0.0], [5.0, 5.0], [5.1, 5.0]])
    scores = torch.tensor([0.5, 0.9, 0.2, 0.1])
    assert circle_nms(centers, scores, radius=1.0).tolist() == [1, 2]
    assert circle_nms(centers, scores, radius=0.05).tolist() == [1, 0, 2, 3]


def test_layers_are_discovered_and_wrap_with_core_quant_layer(model: VoxelNeXtLite) -> None:
    layers = discover_layers(model, spconv_layer_info)
    kinds = [i.kind for i in layers.values()]
    assert kinds.count("subm3d") == 25 and kinds.count("spconv3d") == 5
    assert kinds.count("spconv2d") == 1 and kinds.count("subm2d") == 1 + 2 * 5
    assert list(layers)[0] == "backbone.conv_input.conv" and "head.branches.hm.out" in layers
    assert all(m.bias is None for n, m in model.named_modules() if n in layers)
    bd = tiny_batch()
    measure_layers(model, layers, lambda m: m(tiny_batch()))
    assert all(i.macs > 0 and i.act_numel > 0 for i in layers.values())
    with torch.no_grad():
        model(bd)
    ref, ref_bev = head_outputs(bd), bev_dense(bd)

    def quantize(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = build_model(TINY).eval()
        q.load_state_dict(model.state_dict())
        for name, info in layers.items():
            module = q.get_submodule(name)
            spec = LayerSpec(QuantSpec(bits, granularity="channel"), QuantSpec(bits, symmetric=False))
            wq = UniformFakeQuant(spec.weight, info.out_channels, 0)
            wq.set_range(*minmax_range(wq.rows_of(module.weight.detach()), wq.row_bits(), True))
            aq = UniformFakeQuant(spec.act, info.in_channels, 1)
            aq.observer = Observer(10**6)
            replace_module(q, name, QuantLayer(module, info, spec, wq, aq))
        with torch.no_grad():
            q(tiny_batch())
            for layer in (q.get_submodule(n) for n in layers):
                obs, layer.act_quantizer.observer = layer.act_quantizer.observer, None
                layer.act_quantizer.set_range(*minmax_range(obs.sample(), layer.act_quantizer.row_bits(), False))
            out = tiny_batch()
            q(out)
        assert torch.equal(out["encoded_spconv_tensor"].indices, bd["encoded_spconv_tensor"].indices)
        return head_outputs(out), bev_dense(out)

    head16, bev16 = quantize(16)
    torch.testing.assert_close(head16, ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(bev16, ref_bev, atol=1e-3 * ref_bev.abs().max().item(), rtol=0)
    _, bev3 = quantize(3)
    assert (bev3 - ref_bev).abs().max() > 5e-2 * ref_bev.abs().max()


def test_fold_batchnorm_leaves_model_unfolded(model: VoxelNeXtLite) -> None:
    """core's fx-based folding cannot trace spconv models: it logs and returns without touching them."""
    with torch.no_grad():
        bd = tiny_batch()
        model(bd)
        assert fold_batchnorm(model) == []
        again = tiny_batch()
        model(again)
    assert torch.equal(head_outputs(bd), head_outputs(again))


def test_config_roundtrip_and_checkpoint(model: VoxelNeXtLite, tmp_path) -> None:
    d = json.loads(json.dumps(TINY.to_dict()))
    assert ModelConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**d, "nope": 1})
    save_checkpoint(model, {"model_config": TINY.to_dict()}, tmp_path)
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.cfg == TINY and not loaded.training
    with torch.no_grad():
        a, b = tiny_batch(), tiny_batch()
        model(a)
        loaded(b)
    assert torch.equal(head_outputs(a), head_outputs(b))


def test_full_size_synthetic_scene() -> None:
    """The default grid on one synthetic scene: the BEV map is 120 x 120 at stride 8."""
    vcfg = VoxelConfig()
    m = build_model(ModelConfig(spatial_shape=vcfg.spatial_shape, voxel_size=vcfg.voxel_size,
                                point_cloud_range=vcfg.point_cloud_range, channels=(4, 8, 8, 8, 8, 8),
                                bev_channels=8)).eval()
    bd = collate(SyntheticSplit("val", 1)[:], vcfg)
    with torch.no_grad():
        preds, _ = m(bd)
    assert bev_dense(bd).shape == (1, 8, 120, 120)
    assert len(preds) == 1 and preds[0]["pred_boxes"].shape[1] == 7


# --- RDOQ's replay RD engine on this tiny detector: torch.fx cannot trace it, so ``engine=fast`` uses replay,
# whose curves are the reference engine's (the same operations on the same values), with the head skipped when
# the distortion target is the BEV map and rerun when it is the head.
import numpy as np  # noqa: E402

from qcore_rdoq.curves import first_order_curves  # noqa: E402
from qcore_rdoq.replay import ReplayEngine  # noqa: E402

REPLAY_LAYERS = ["backbone.conv2.0.conv", "backbone.conv3.1.conv2", "head.branches.hm.conv"]


def _target(kind):
    def forward(model, batch):
        bd = dict(batch)
        model(bd)
        return bev_dense(bd) if kind == "bev" else head_outputs(bd)
    return forward


@pytest.mark.parametrize("kind", ["bev", "head"])
def test_replay_equals_reference_on_spconv(kind):
    from qcore_rdoq.curves import make_engine

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    batches = [tiny_batch(seed=1, voxels=150), tiny_batch(seed=2, voxels=100)]
    fwd = _target(kind)
    layers = {n: spconv_layer_info(m, n) for n, m in model.named_modules() if n in REPLAY_LAYERS[:2 if kind == "bev"
                                                                                                 else 3]}
    measure_layers(model, layers, lambda m: fwd(m, batches[0]))
    eng = make_engine("fast", model, fwd, batches)  # fx cannot trace spconv: replay, not the reference
    assert isinstance(eng, ReplayEngine)
    assert eng.upstream("backbone.conv3.1.conv2") == ["backbone.conv_input", "backbone.conv1", "backbone.conv2",
                                                       "backbone.conv3.0", "backbone.conv3.1.conv1",
                                                       "backbone.conv3.1.bn1"]
    bits = [0, 4]
    ref = first_order_curves(model, fwd, batches, layers, 8, bits, engine="reference")
    rep = first_order_curves(model, fwd, batches, layers, 8, bits, engine=eng)
    assert set(rep.layer_engines.values()) == {"replay"}
    np.testing.assert_allclose(rep.dist, ref.dist, rtol=1e-6, atol=0)
    assert (ref.dist[:, 0] > ref.dist[:, 1]).all() and (ref.dist > 0).all()
    assert eng._irrelevant == {"head": kind == "bev"}  # the head is rerun when the target reads it
