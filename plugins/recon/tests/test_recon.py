"""qcore-recon: AdaRound's rounding variables, LSQ/QDrop in the loop, blocks, the FC input's bits, determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import qcore
from qcore.ranges import minmax_range
from qcore.testing import TinyResNet, make_host, run_tiny, tiny_resnet
from qcore_recon import (
    AdaRound,
    ReconSettings,
    STERounding,
    find_units,
    plugin,
    plugin_brecq,
    plugin_qdrop,
    reconstruct,
    rectified_sigmoid,
    rounding_for,
)


@pytest.fixture(scope="module")
def host():
    return make_host(("recon", plugin), ("qdrop", plugin_qdrop), ("brecq", plugin_brecq))


def uniform_weight_quantizer(w: torch.Tensor, bits: int = 4, symmetric: bool = False) -> qcore.UniformFakeQuant:
    q = qcore.UniformFakeQuant(qcore.QuantSpec(bits, symmetric=symmetric, granularity="channel"), w.shape[0], 0)
    qcore.calibrate_rows(q, q.rows_of(w), minmax_range)
    return q


# -- AdaRound -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_adaround_init_reproduces_the_fp_weight(symmetric):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    q = uniform_weight_quantizer(w, symmetric=symmetric)
    r = rounding_for(q, w)
    assert isinstance(r, AdaRound)
    with torch.no_grad():
        soft = r.soft()
        nearest = q(w)
        scale, zero, qmin, qmax, _ = (t[:, None, None, None] for t in q.qparams())
        # inside the grid's range (an affine grid's integer zero point may shift it to clip an extreme weight)
        inside = (w >= (qmin - zero) * scale) & (w <= (qmax - zero) * scale)
    assert inside.float().mean() > 0.95
    assert torch.allclose(soft[inside], w[inside], atol=1e-5, rtol=0)  # h(V) = W/s - floor(W/s): the FP weight
    assert torch.allclose(soft[~inside], nearest[~inside])  # clipped like the quantizer clips
    assert not torch.allclose(nearest, w, atol=1e-3)


def test_hard_rounding_moves_each_weight_at_most_one_step_from_nearest():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    q = uniform_weight_quantizer(w, bits=3)
    r = AdaRound(q, w)
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=torch.Generator().manual_seed(2)) * 5)  # any learned V
        hard = r.final_weight()
        nearest = q(w)
        scale = q.qparams()[0][:, None]
        assert torch.all((hard - nearest).abs() <= scale * (1 + 1e-4))
        assert (hard != nearest).any()
        # the stored weight is a grid point: the layer's own quantizer keeps it as it is
        assert torch.allclose(q(hard), hard, atol=1e-6)


def test_regulariser_alone_drives_rounding_to_nearest():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = uniform_weight_quantizer(w)
    r = AdaRound(q, w)
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    for _ in range(1500):
        opt.zero_grad()
        r.regularizer(beta=2.0).backward()
        opt.step()
    h = rectified_sigmoid(r.v.detach())
    settled = ((h == 0) | (h == 1)).float().mean()
    assert settled > 0.95  # all but the fractional parts closest to 1/2 (where the gradient vanishes) are hard
    with torch.no_grad():
        assert torch.equal(r.final_weight(), q(w))  # and the rounding kept is round-to-nearest


class DeadZoneLike(qcore.UniformFakeQuant):
    """A uniform grid with its own mapping (as RDOQ's dead-zone grid): small values go to zero."""

    def quantize(self, x):
        return torch.where(x.abs() < 0.3, torch.zeros_like(x), super().quantize(x))


def test_a_uniform_subclass_with_its_own_mapping_learns_through_it():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    q = DeadZoneLike(qcore.QuantSpec(4, symmetric=False, granularity="channel"), 4, 0)
    qcore.calibrate_rows(q, q.rows_of(w), minmax_range)
    r = rounding_for(q, w)
    assert isinstance(r, STERounding)  # AdaRound's plain-grid arithmetic would learn for a grid not deployed
    with torch.no_grad():
        assert torch.equal(r.soft(), q(w))
    from qcore_recon import LSQAct, act_quant_for

    assert not isinstance(act_quant_for(q, learn=True), LSQAct)
    assert isinstance(act_quant_for(uniform_weight_quantizer(w), learn=True), LSQAct)


def test_a_quantizer_may_supply_its_own_rounding():
    w = torch.randn(4, 8)
    q = uniform_weight_quantizer(w)
    own = STERounding(q, w)
    q.recon_rounding = lambda weight: own  # e.g. a lattice quantizer with a straight-through estimator
    assert rounding_for(q, w) is own


# -- reconstruction on a small residual network ---------------------------------------------------------------------
CALIB = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def quantize_tiny(host, method: str = "qdrop", seed: int = 0, **options):
    if method != "uniform":
        options = {"iters": 30, "cache": "off", **options}
    return qcore.quantize(tiny_resnet(), CALIB, method, w_bits=4, a_bits=4, seed=seed, batch_size=32, host=host,
                          options=options)


def test_blocks_are_units_and_the_rest_is_layerwise(host):
    qmodel = quantize_tiny(host, "uniform").model
    units = find_units(qmodel)
    assert [(u.name, u.kind) for u in units] == [("stem.0", "layer"), ("blocks.0", "block"), ("blocks.1", "block"),
                                                 ("fc", "layer")]
    assert units[1].layers == ["blocks.0.conv1", "blocks.0.conv2"]
    assert [u.kind for u in find_units(qmodel, blocks=[])] == ["layer"] * 6


class DeclaresBlocks:
    """A plugin that names the blocks of TinyResNet (as a task would for an architecture qcore-recon does not know)."""

    @staticmethod
    @qcore.hookimpl
    def qcore_blocks(model):
        return ["blocks"] if isinstance(model, TinyResNet) else None


def test_a_plugin_declares_blocks_through_the_hook():
    host = make_host(("recon", plugin), ("qdrop", plugin_qdrop), ("blocks", DeclaresBlocks))
    facts = quantize_tiny(host, iters=2).report["measured"]["qdrop"]
    assert facts["blocks"] == ["blocks"] and facts["layerwise"] == ["stem.0", "fc"]


def test_fc_input_is_8_bit_with_first_last_pinned(host):
    """BRECQ's bug: its FC-input quantizer setting has no effect on ResNet. Here the FC's own input quantizer is
    at 8 bits after reconstruction, and its learned step keeps 8-bit levels."""
    qmodel = quantize_tiny(host).model
    fc = qcore.quant_layers(qmodel)["fc"]
    assert int(fc.act_quantizer.bits.max()) == 8
    assert int(qcore.quant_layers(qmodel)["blocks.1.conv2"].act_quantizer.bits.max()) == 4
    seen: list[torch.Tensor] = []
    fc.act_quantizer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        qmodel(CALIB)
    levels = seen[0].unique().numel()
    assert 16 < levels <= 256


def test_same_seed_same_model(host):
    a = quantize_tiny(host, seed=3).model.state_dict()
    b = quantize_tiny(host, seed=3).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # not vacuous: the seed reaches the reconstruction (mini-batches, QDrop masks), so another seed differs
    c = quantize_tiny(host, seed=4).model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_qdrop_with_keep_prob_1_is_brecqs_activation_in_the_loop_block(host):
    base = qcore.quantize(tiny_resnet(), CALIB, "uniform", w_bits=4, a_bits=4, calibrator="mse", batch_size=32,
                          host=host, options={"weight_symmetric": False})
    ctx = base.outcome.ctx
    models = []
    for settings in (ReconSettings(iters=25, keep_prob=1.0, inputs="mixed", act_lr=1e-3),
                     ReconSettings(iters=25, keep_prob=None, inputs="quantized", act_lr=1e-3)):
        qmodel = copy.deepcopy(base.model)  # frozen by the pipeline: reconstruct unfreezes it
        reconstruct(qmodel, ctx.model, ctx, settings=settings)
        models.append(qmodel.state_dict())
    a, b = models
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    changed = [k for k in a if k.endswith("act_quantizer.hi") and not torch.equal(a[k], base.model.state_dict()[k])]
    assert changed  # the activation steps were learned


def test_a_caller_supplies_the_whole_objective(host):
    """PTMQ-style: the objective runs the unit itself (here twice, as a multi-bit loss would at two bit-widths)."""
    base = qcore.quantize(tiny_resnet(), CALIB, "uniform", w_bits=4, a_bits=4, calibrator="mse", batch_size=32,
                          host=host)
    calls: dict[str, int] = {}

    def two_runs(module, x, target, unit):
        calls[unit.name] = calls.get(unit.name, 0) + 1
        return sum(((module(x) - target) ** 2).mean() for _ in range(2))

    report = reconstruct(base.model, base.outcome.ctx.model, base.outcome.ctx, objective=two_runs,
                         settings=ReconSettings(iters=7))
    assert calls == {"stem.0": 7, "blocks.0": 7, "blocks.1": 7, "fc": 7}
    assert [u.name for u in report.units] == list(calls)


def test_reconstruction_lowers_the_block_loss(host):
    out = quantize_tiny(host, iters=80)
    facts = out.report["measured"]["qdrop"]["joint"]
    assert set(facts["seconds_per_unit"]) == {"stem.0", "blocks.0", "blocks.1", "fc"}
    ends, starts = facts["loss_end_per_unit"], facts["loss_start_per_unit"]
    assert sum(ends.values()) < sum(starts.values())


def test_brecq_runs_two_stages(host, tmp_path):
    facts = quantize_tiny(host, "brecq", cache=str(tmp_path)).report["measured"]["brecq"]
    assert facts["weights"]["units"] == facts["acts"]["units"] == 4
    assert facts["iters_per_unit"] == 30 and "20000" in facts["iters_note"]
    assert facts["calibration_samples"] == 64
    again = quantize_tiny(host, "brecq", cache=str(tmp_path)).report["measured"]["brecq"]
    assert len(again["weights"]["resumed_units"]) == len(again["acts"]["resumed_units"]) == 4  # stable cache keys


def test_lp_loss_sums_channels_and_averages_the_rest():
    from qcore_recon import lp_loss, mse_loss

    pred, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    assert float(lp_loss(pred, target, p=2.4)) == pytest.approx(3 * 2.0 ** 2.4)
    assert float(mse_loss(pred[:, :, 0, 0], target[:, :, 0, 0])) == pytest.approx(3 * 4.0)


def test_a_killed_run_resumes_block_by_block(host, tmp_path):
    full = quantize_tiny(host, cache=str(tmp_path))
    assert full.report["measured"]["qdrop"]["joint"]["resumed_units"] == []
    entries = sorted(tmp_path.rglob("*.pt"))
    assert [p.name for p in entries] == ["000-stem.0.pt", "001-blocks.0.pt", "002-blocks.1.pt", "003-fc.pt"]
    for p in entries[2:]:  # killed while reconstructing the third unit
        p.unlink()
    again = quantize_tiny(host, cache=str(tmp_path))
    assert again.report["measured"]["qdrop"]["joint"]["resumed_units"] == ["stem.0", "blocks.0"]
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    other_seed = quantize_tiny(host, seed=1, cache=str(tmp_path))  # another key: nothing restored
    assert other_seed.report["measured"]["qdrop"]["joint"]["resumed_units"] == []


@pytest.mark.parametrize("name, calibrator", [("qdrop", "qdrop"), ("brecq", "brecq"), ("recon", "qdrop")])
def test_each_method_runs_by_plugin_name(host, name, calibrator):
    result = run_tiny(host, plugin=name, options={"iters": 5, "cache": "off"}).result
    assert result["method"] == name and result["components"]["calibrator"] == calibrator
    assert result["options"]["weight_symmetric"] is False  # the papers' per-channel affine weights
    assert result["options"]["round_lr"] == 5e-3  # the methods' rate for their 300 steps, not the papers' 1e-3
    assert calibrator in result["measured"]


def test_the_faster_rounding_rate_is_the_methods_not_the_calibrators(host, monkeypatch):
    """Methods that borrow the qdrop calibrator (ompq, ``--calibrator qdrop``) keep the papers' rate, and a run at
    the papers' step count with the methods' rate says how to get the papers' setting."""
    from qcore_recon import calibrators

    borrowed = run_tiny(host, method="uniform", calibrator="qdrop", options={"iters": 3, "cache": "off"}).result
    assert borrowed["measured"]["qdrop"]["round_lr"] == 1e-3 and "round_lr_note" not in borrowed["measured"]["qdrop"]
    monkeypatch.setattr(calibrators, "PAPER_ITERS", 3)  # "the papers' step count" without running 20,000 steps
    own = run_tiny(host, plugin="qdrop", options={"iters": 3, "cache": "off"}).result["measured"]["qdrop"]
    assert own["round_lr"] == 5e-3 and "-o round_lr=0.001" in own["round_lr_note"]
    paper = run_tiny(host, plugin="qdrop", options={"iters": 3, "cache": "off", "round_lr": 1e-3}).result
    assert "round_lr_note" not in paper["measured"]["qdrop"]
    plain = run_tiny(host, plugin="qdrop", calibrator="mse").result  # no reconstruction: the rate is not its option
    assert plain["components"]["calibrator"] == "mse" and "round_lr" not in plain["options"]


@pytest.mark.parametrize("bad", [{"iters": -1}, {"drop_prob": 1.5}, {"warmup": 1.0}, {"recon_batch": 0},
                                 {"memory_mb": -1}, {"cache": ""}])
def test_bad_options_are_user_errors(host, bad):
    with pytest.raises(qcore.QcoreError):
        run_tiny(host, plugin="qdrop", options=bad)


# -- blocks of torchvision and timm models ---------------------------------------------------------------------------
def test_torchvision_resnet_and_mobilenet_blocks_are_recognised():
    tv = pytest.importorskip("torchvision")
    from qcore_recon import is_block

    r18, r50 = tv.models.resnet18(), tv.models.resnet50()
    assert is_block(r18.layer1[0]) and is_block(r50.layer1[0])  # BasicBlock, Bottleneck
    assert is_block(tv.models.mobilenet_v2().features[1])  # InvertedResidual
    regnet = tv.models.regnet_x_400mf()
    assert is_block(regnet.trunk_output.block1[0]) and type(regnet.trunk_output.block1[0]).__name__ == \
        "ResBottleneckBlock"
    mnas = tv.models.mnasnet0_5()
    assert is_block(mnas.layers[8][0]) and type(mnas.layers[8][0]).__name__ == "_InvertedResidual"
    assert not is_block(r18.layer1) and not is_block(r18)


def test_mobilenet_blocks_are_depthwise_and_get_lambda_0_1(host):
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v2(width_mult=0.25, num_classes=4).eval()
    qmodel = qcore.quantize(model, torch.randn(8, 3, 32, 32), "uniform", w_bits=8, a_bits=8, batch_size=8,
                            host=host).model
    units = find_units(qmodel)
    blocks = [u for u in units if u.kind == "block"]
    assert len(blocks) == 17 and all(u.depthwise for u in blocks)
    assert [u.name for u in units if u.kind == "layer"] == ["features.0.0", "features.18.0", "classifier.1"]
    assert ReconSettings().lam(blocks[0]) == 0.1 and ReconSettings().lam(units[0]) == 0.01


def test_timm_vit_blocks_are_reconstructed(host):
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0).eval()
    out = qcore.quantize(model, torch.randn(16, 1, 8, 8), "qdrop", w_bits=4, a_bits=8, batch_size=8, host=host,
                         options={"iters": 3, "cache": "off"})
    facts = out.report["measured"]["qdrop"]
    assert facts["blocks"] == ["blocks.0", "blocks.1"]
    assert facts["layerwise"] == ["patch_embed.proj", "head"]


def test_the_reconstructed_model_is_deployable_and_saves(host, tmp_path):
    """The learned rounding is stored as grid points of each layer's own quantizer and the learned steps as its
    ranges: the .qcore file reloads onto a fresh FP model with identical outputs."""
    out = quantize_tiny(host)
    for name, layer in qcore.quant_layers(out.model).items():
        w = layer.module.weight.detach()
        assert torch.allclose(layer.weight_quantizer(w), w, atol=1e-6), name
    loaded = qcore.load(out.save(tmp_path / "m.qcore"), tiny_resnet(), host=host)
    with torch.no_grad():
        assert torch.equal(loaded(CALIB), out.model(CALIB))


# -- BRECQ's options: the L2.4 shrink search of initial ranges, the Fisher-diagonal loss -----------------------------
def test_shrink_search_gives_brecqs_lp_ranges(host):
    """-o weight_range=shrink: each weight channel's range is [min, max] shrunk by the factor in 0.21..1.00 (1 %
    steps) with the least mean |error|^2.4, not the MSE range; -o act_range=shrink searches activations so."""
    from qcore.ranges import mse_range

    shrunk = quantize_tiny(host, "brecq", iters=0, iters_act=0, weight_range="shrink", act_range="shrink",
                           act_samples=2048)
    name = "blocks.0.conv1"
    q = qcore.quant_layers(shrunk.model)[name].weight_quantizer
    w = shrunk.outcome.ctx.model.get_submodule(name).weight.detach()  # the FP (BN-folded) weight
    refs = []
    for est in (lambda x, b, s: mse_range(x, b, s, steps=80, lowest=0.21, p=2.4), mse_range):
        ref = qcore.UniformFakeQuant(qcore.QuantSpec(4, symmetric=False, granularity="channel"), w.shape[0], 0)
        qcore.calibrate_rows(ref, ref.rows_of(w), est)
        refs.append(ref)
    assert torch.allclose(q.lo, refs[0].lo) and torch.allclose(q.hi, refs[0].hi)
    assert not torch.allclose(q.hi, refs[1].hi)
    facts = shrunk.report.get("config", {})
    assert facts.get("options", {}).get("act_range", "shrink") == "shrink"


def test_fisher_weights_are_the_kl_gradient_at_the_unit_output(host):
    """(|g| + 1)^2 with g = dKL(FP || quantized till the unit)/dz: checked against finite differences (in double
    precision), and 1 everywhere when nothing is quantized."""
    from qcore_recon import fisher_weights

    model = tiny_resnet()
    with torch.no_grad():
        model.fc.weight.mul_(30.0)  # confident predictions: a KL gradient well above float noise
    base = qcore.quantize(model, CALIB, "uniform", w_bits=3, a_bits=3, calibrator="mse", batch_size=32, host=host)
    ctx, qmodel = base.outcome.ctx, base.model
    batches = list(ctx.calibration_batches())
    for layer in qcore.quant_layers(qmodel).values():
        layer.unfreeze()
    names = list(qcore.quant_layers(qmodel))
    later = [n for n in names if not n.startswith(("stem", "blocks.0"))]
    w = fisher_weights(qmodel, ctx.model, ctx.task.forward, batches, "blocks.0", later)
    assert w.shape[0] == 64 and bool((w >= 1).all()) and float(w.max()) > 1.0 + 1e-5
    assert torch.allclose(fisher_weights(qmodel, ctx.model, ctx.task.forward, batches, "blocks.0", names),
                          torch.ones_like(w), atol=1e-6)
    # finite differences of the KL at the element with the largest gradient, later layers in FP, in float64
    i = int(w[:32].flatten().argmax())
    q64, fp64 = copy.deepcopy(qmodel).double(), copy.deepcopy(ctx.model).double()
    for n in later:
        qcore.quant_layers(q64)[n].weight_quantizer = qcore.quant_layers(q64)[n].act_quantizer = None
    x = batches[0].double()

    def kl(eps: float) -> float:
        def bump(_m, _a, out):
            out = out.clone()
            out.view(-1)[i] += eps
            return out
        h = q64.get_submodule("blocks.0").register_forward_hook(bump)
        with torch.no_grad():
            out = torch.nn.functional.kl_div(torch.log_softmax(q64(x), 1), torch.softmax(fp64(x), 1),
                                             reduction="batchmean")
        h.remove()
        return float(out)

    g = (kl(1e-4) - kl(-1e-4)) / 2e-4
    assert abs(g) == pytest.approx(float(w[:32].flatten()[i].double().sqrt()) - 1.0, rel=0.02)


def test_brecq_with_the_fisher_loss(host):
    """-o loss=fisher weights the weight stage's squared error by (|g| + 1)^2 >= 1: the same first step scores
    higher than with the plain squared error; a caller's own loss cannot be combined with it."""
    def run(loss: str):
        model = tiny_resnet()
        with torch.no_grad():
            model.fc.weight.mul_(30.0)
        out = qcore.quantize(model, CALIB, "brecq", w_bits=3, a_bits=3, batch_size=32, host=host,
                             options={"iters": 4, "cache": "off", "loss": loss})
        return out.report["measured"]["brecq"]["weights"]["loss_start_per_unit"]

    fisher, plain = run("fisher"), run("mse")
    assert all(fisher[u] >= plain[u] for u in plain) and any(fisher[u] > plain[u] for u in plain)
    base = qcore.quantize(tiny_resnet(), CALIB, "uniform", w_bits=4, a_bits=4, batch_size=32, host=host)
    with pytest.raises(qcore.QcoreError, match="Fisher"):
        reconstruct(base.model, base.outcome.ctx.model, base.outcome.ctx, settings=ReconSettings(fisher=True),
                    loss=lambda p, t: (p - t).abs().mean())


def test_cached_block_data_over_the_memory_limit_is_read_from_disk(host, tmp_path, monkeypatch):
    """Block inputs/targets beyond -o memory_mb go to a temporary file, memory-mapped; the model is the same."""
    import tempfile

    from qcore_recon.recon import capture

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_resnet().eval()
    batches = [CALIB[:24], CALIB[24:]]
    x, y = capture(model, qcore.default_forward, batches, "blocks.1", output=True)
    xd, yd = capture(model, qcore.default_forward, batches, "blocks.1", output=True, memory_limit=1000)
    assert torch.equal(x, xd) and torch.equal(y, yd)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the spilled tensor's memory is a mapping of the (deleted) temporary file
        ptr = xd.untyped_storage().data_ptr()
        spans = [line.split()[0].split("-") for line in maps.read_text().splitlines() if "qcore-recon-" in line]
        assert any(int(lo, 16) <= ptr < int(hi, 16) for lo, hi in spans)
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped: nothing is left behind
    in_memory = quantize_tiny(host).model.state_dict()
    on_disk = quantize_tiny(host, memory_mb=0).model.state_dict()
    assert all(torch.equal(in_memory[k], on_disk[k]) for k in in_memory if isinstance(in_memory[k], torch.Tensor))
