"""qcore-ompq: CKA against its slow reference, importance without underflow, the ILP against brute force and its
budgets, the seed's size/BOPs arithmetic on ResNet-18, and the allocator/method through the pipeline."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from qcore_ompq import (
    brute_force,
    brute_force_joint,
    cka_matrix,
    downstream_mean,
    expand_bits,
    flat_features,
    importance,
    input_errors,
    layer_features,
    linear_cka,
    plan_distortion,
    plugin,
    seed_bops,
    seed_size_mib,
    solve_ilp,
    solve_joint,
    solve_seed,
)
from qcore_ompq.allocator import block_outputs

import qcore
from qcore.ops import qparams_from_range
from qcore.testing import check_allocator, make_host, run_tiny
from qcore_recon import plugin as recon_plugin


class CodebookQuantizer(qcore.Quantizer):
    """Core's uniform grid plus a declared per-tensor codebook of ``2^bits`` 32-bit entries (extra storage that
    grows with the bit-width, as a real codebook's does)."""

    name = "test-codebook"

    def make(self, spec, role, info):
        if role == "weight":
            return qcore.UniformFakeQuant(spec, info.out_channels, info.weight_axis if spec.axis is None else spec.axis)
        return qcore.UniformFakeQuant(spec, info.in_channels, info.act_axis if spec.axis is None else spec.axis)

    def extra_bits(self, spec, role, info):
        return float(2 ** spec.bits * 32) if role == "weight" else 0.0


class CodebookPlugin:
    @staticmethod
    @qcore.hookimpl
    def qcore_register_quantizers(register):
        register(CodebookQuantizer)


@pytest.fixture(scope="module")
def host():
    return make_host(("recon", recon_plugin), ("ompq", plugin), ("test-codebook", CodebookPlugin))


# -- orthogonality -------------------------------------------------------------------------------------------------
def test_cka_matrix_matches_the_slow_reference_in_both_forms():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 5, generator=g, dtype=torch.float64)
    feats = [torch.randn(16, 40, generator=g, dtype=torch.float64),   # p >= N: Gram form
             base @ torch.randn(5, 3, generator=g, dtype=torch.float64),  # p < N: feature-space form
             torch.randn(16, 7, generator=g, dtype=torch.float64),
             base @ torch.randn(5, 30, generator=g, dtype=torch.float64)]
    mat = cka_matrix(feats)
    for i, j in itertools.product(range(4), repeat=2):
        assert mat[i, j] == pytest.approx(linear_cka(feats[i], feats[j]), abs=1e-10)
    assert np.allclose(np.diag(mat), 1.0) and np.allclose(mat, mat.T)
    assert mat[1, 3] > mat[0, 1]  # features from one 5-dim source are more similar than independent ones
    # CKA is invariant to orthogonal transforms and isotropic scaling of the features
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert linear_cka(feats[0], 3.0 * feats[0] @ q) == pytest.approx(1.0, abs=1e-10)


def test_importance_cannot_underflow_and_follows_orthogonality():
    mat = np.array([[1.0, 0.9, 0.8], [0.9, 1.0, 0.1], [0.8, 0.1, 1.0]])
    for beta in (1.0, 100.0, 1e4):
        gamma, theta = importance(mat, beta)
        assert np.allclose(gamma, [1.7, 1.0, 0.9])
        assert theta.max() == 1.0 and np.isfinite(theta).all()
        assert theta[2] >= theta[1] >= theta[0]  # the most orthogonal layer is the most important
    assert np.exp(-100.0 * 0.9) < 1e-38  # the seed's un-normalised theta would be below float32's range here
    assert np.allclose(downstream_mean(np.array([1.0, 2.0, 3.0])), [2.0, 2.5, 3.0])
    with pytest.raises(qcore.QcoreError, match="ompq_beta"):
        importance(mat, -1.0)


# -- the integer program -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_ilp_equals_brute_force_and_never_exceeds_budgets(seed):
    rng = np.random.default_rng(seed)
    n, choices = 5, [2, 3, 4, 6, 8]
    sizes = rng.integers(10, 500, n).tolist()
    dist = np.sort(rng.random((n, len(choices))) * rng.random((n, 1)) * 10, axis=1)[:, ::-1]  # falls with bits
    macs = (rng.integers(1, 100, n) * 4).astype(float).tolist()
    size_budget = rng.uniform(2.5, 6.0) * sum(sizes)
    bops_budget = rng.uniform(3.0, 7.0) * sum(macs) if seed % 2 else None
    ilp = solve_ilp(sizes, dist, choices, size_budget, macs=macs, bops_budget=bops_budget)
    ref = brute_force(sizes, dist, choices, size_budget, macs=macs, bops_budget=bops_budget)
    assert ref is not None
    assert ilp.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)
    assert ilp.size_bits == sum(s * b for s, b in zip(sizes, ilp.bits, strict=True)) <= size_budget
    if bops_budget is not None:
        assert sum(m * b for m, b in zip(macs, ilp.bits, strict=True)) <= bops_budget


def test_ilp_refuses_an_impossible_budget():
    with pytest.raises(qcore.QcoreError, match="impossible budget"):
        solve_ilp([100, 100], np.zeros((2, 2)), [2, 4], size_budget=399)
    with pytest.raises(qcore.QcoreError, match="BOPs"):
        solve_ilp([100, 100], np.zeros((2, 2)), [2, 4], size_budget=800, macs=[10.0, 10.0], bops_budget=39.0)


def test_seed_solver_stays_within_budget_and_the_ilp_is_at_least_as_good():
    rng = np.random.default_rng(3)
    sizes = rng.integers(100, 5000, 8).tolist()
    omega = rng.random(8)
    budget = 3.0 * sum(sizes)
    seed = solve_seed(sizes, omega, 2, 4, budget)
    assert all(2 <= b <= 4 for b in seed.bits) and seed.size_bits <= budget
    ilp = solve_ilp(sizes, -omega[:, None] * np.array([2.0, 3.0, 4.0])[None, :], [2, 3, 4], budget)
    assert seed.objective == pytest.approx(-float((omega * np.array(seed.bits)).sum()))
    assert ilp.objective <= seed.objective + 1e-9  # the exact optimum is never worse than the seed's path


# -- the seed's arithmetic -----------------------------------------------------------------------------------------
#: ResNet-18 bit lists of the seed (MAC-AutoML/OMPQ PTQ/run_scripts/train_resnet18.sh: 3.0, 3.5, 4.0, 4.5, 5.0,
#: 5.5 "Mb"; QAT/bit_config.py modelsize_6.7: the 16 searched layers, stem and FC at 8)
PTQ_CFGS = {2.998: [4, 3, 4, 4, 4, 4, 4, 3, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2],
            3.499: [4, 3, 3, 4, 4, 4, 4, 4, 4, 4, 3, 3, 4, 3, 2, 2, 2, 3],
            4.000: [4, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 4, 3, 2, 3, 3, 3],
            4.499: [4, 3, 3, 4, 4, 4, 4, 4, 4, 4, 3, 3, 4, 4, 3, 3, 3, 3],
            5.000: [4, 3, 3, 3, 4, 4, 4, 3, 4, 3, 4, 3, 4, 3, 3, 4, 4, 4],
            5.500: [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 4, 4, 4, 4, 4, 4, 4]}
QAT_CFG = [8, 8, 8, 8, 7, 8, 8, 8, 8, 4, 6, 8, 4, 4, 4, 4]


@pytest.fixture(scope="module")
def resnet18_layers():
    import torchvision  # pinned in requirements-test.txt

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    layers = qcore.discover_layers(model, qcore.torch_layer_info)
    qcore.measure_layers(model, layers, lambda m: m(torch.empty(1, 3, 224, 224, device="meta")))
    return model, layers


def test_seed_size_and_bops_reproduced_on_resnet18(resnet18_layers):
    _, layers = resnet18_layers
    assert len(layers) == 21
    for mib, cfg in PTQ_CFGS.items():
        assert round(seed_size_mib(layers, cfg), 3) == pytest.approx(mib)
    assert round(seed_size_mib(layers, QAT_CFG, fixed_ends=True), 3) == pytest.approx(6.699)
    assert round(seed_bops(layers, QAT_CFG, a_bits=6) / 1e9, 2) == pytest.approx(75.10)
    assert round(seed_bops(layers, QAT_CFG, a_bits=8) / 1e9, 2) == pytest.approx(97.51)
    per = expand_bits(layers, PTQ_CFGS[2.998])
    assert per["layer2.0.downsample.0"] == per["layer2.0.conv2"] == 4 and per["fc"] == 2
    with pytest.raises(qcore.QcoreError, match="entries"):
        expand_bits(layers, [4] * 5)


def test_block_output_convention_maps_conv2_and_downsample_to_the_block(resnet18_layers):
    model, layers = resnet18_layers
    out = block_outputs(model, list(layers))
    assert out["layer1.0.conv2"] == "layer1.0" and out["layer2.0.downsample.0"] == "layer2.0"
    assert "layer2.0.conv1" not in out and "conv1" not in out and "fc" not in out


# -- the allocator and the method through the pipeline ------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["orm", "size", "hawq", "uniform"])
def test_allocator_contract(host, criterion):  # rdoq: the same plan code, its own test below
    check_allocator(host, "ompq", target_bits=4.0, criterion=criterion, hawq_batches=1, hawq_probes=1)


def test_rdoq_curve_sums_are_qcore_rdoqs_curves_through_the_same_ilp(host):
    from qcore_rdoq import RDOQOptions, layer_curves

    out = run_tiny(host, allocator="ompq", target_bits=6.0, a_bits=8, calibrator="minmax",
                   options={"criterion": "rdoq", "rdoq_samples": 16, "rdoq_cache": "off",
                            "bit_choices": (2, 3, 4, 6)})
    m = out.result["measured"]["ompq"]
    assert out.ctx is not None and m["criterion"] == "rdoq" and out.result["w_bits_avg"] <= 6.0 + 1e-9
    free = list(m["bits"])
    curves = layer_curves(out.ctx, free, [2, 3, 4, 6], options=RDOQOptions(curve_samples=16, cache="off"))
    assert np.allclose([[m["rdoq_curve_sums"][n][str(b)] for b in (2, 3, 4, 6)] for n in free], curves)
    sizes = [out.ctx.layers[n].weight_numel for n in free]
    pinned = sum(out.ctx.layers[n].weight_numel * 8 for n in out.ctx.layers if n not in free)
    cap = 6.0 * sum(out.ctx.layers[n].weight_numel for n in out.ctx.layers) - pinned
    ref = brute_force(sizes, curves, [2, 3, 4, 6], math.floor(cap + 1e-6))
    assert ref is not None and [m["bits"][n] for n in free] == ref.bits


def test_size_and_bops_budgets_hold_in_result_json_terms(host):
    hi = run_tiny(host, allocator="fixed", w_bits=8, a_bits=8, calibrator="minmax").result
    lo = run_tiny(host, allocator="fixed", w_bits=2, a_bits=8, calibrator="minmax").result
    size_mb = (hi["size_mb"] + lo["size_mb"]) / 2
    bops_g = (0.4 * hi["bops"] + 0.6 * lo["bops"]) / 1e9
    r = run_tiny(host, allocator="ompq", a_bits=8, calibrator="minmax",
                 options={"size_mb": size_mb, "bops_g": bops_g}).result
    assert r["size_mb"] <= size_mb and r["bops"] / 1e9 <= bops_g
    m = r["measured"]["ompq"]
    assert m["size_mb"] == pytest.approx(r["size_mb"]) and m["bops_g"] == pytest.approx(r["bops"] / 1e9)
    with pytest.raises(qcore.QcoreError, match="impossible budget"):
        run_tiny(host, allocator="ompq", a_bits=8, calibrator="minmax", options={"size_mb": lo["size_mb"] * 0.99})


def test_size_budget_counts_the_quantizers_extra_bits(host):
    """-o size_mb is result.json's size_mb, which counts Quantizer.extra_bits: a plan priced without them would go
    over (the bug this guards against); priced with them it stays within and reports the same size."""
    common = dict(allocator="ompq", a_bits=8, calibrator="minmax")
    hi = run_tiny(host, allocator="fixed", w_bits=8, a_bits=8, calibrator="minmax", quantizer="test-codebook").result
    lo = run_tiny(host, allocator="fixed", w_bits=2, a_bits=8, calibrator="minmax", quantizer="test-codebook").result
    assert hi["size_mb"] - lo["size_mb"] > 0
    size_mb = (hi["size_mb"] + lo["size_mb"]) / 2
    blind = run_tiny(host, options={"size_mb": size_mb}, **common)  # the uniform quantizer declares no extra
    plan_blind = blind.plan
    priced = qcore.plan_cost(blind.fp_model, blind.ctx.layers, plan_blind, CodebookQuantizer().extra_bits)
    assert priced.size_mb > size_mb  # the same bits on the codebook format would be over budget
    for crit in ("orm", "uniform"):
        r = run_tiny(host, quantizer="test-codebook", options={"size_mb": size_mb, "criterion": crit},
                     **common).result
        assert r["size_mb"] <= size_mb
        assert r["measured"]["ompq"]["size_mb"] == pytest.approx(r["size_mb"])
    # the ILP with extra storage against brute force
    rng = np.random.default_rng(7)
    sizes, choices = rng.integers(10, 200, 4).tolist(), [2, 3, 4, 8]
    dist = np.sort(rng.random((4, 4)), axis=1)[:, ::-1]
    extra = np.array([[2 ** b * 8 for b in choices]] * 4)
    budget = 4.0 * sum(sizes) + extra[:, 1].sum()
    ilp = solve_ilp(sizes, dist, choices, 8 * sum(sizes), extra=extra, storage_budget=budget)
    ref = brute_force(sizes, dist, choices, 8 * sum(sizes), extra=extra, storage_budget=budget)
    assert ref is not None and ilp.objective == pytest.approx(ref.objective)
    assert sum(n * b + 2 ** b * 8 for n, b in zip(sizes, ilp.bits, strict=True)) <= budget


def test_default_method_records_orthogonality_and_plots(host):
    out = run_tiny(host, plugin="ompq", target_bits=6.0,  # matplotlib is in requirements-test.txt
                   options={"iters": 4, "plots": True, "convention": "seed", "cache": "off"})
    m = out.result["measured"]["ompq"]
    assert out.result["components"]["calibrator"] == "qdrop"
    names = m["orthogonality"]["layers"]
    assert max(m["orthogonality"]["theta"].values()) == 1.0 and len(m["orthogonality"]["matrix"]) == len(names)
    assert set(m["bits"]) == set(names) and m["seed"]["size_mib"] > 0
    assert out.result["w_bits_avg"] <= 6.0 + 1e-9
    assert out.ctx is not None and out.ctx.artifacts["plots/ompq_orm.png"].startswith(b"\x89PNG")


def _qat_run(host, epochs, seed=0):
    return run_tiny(host, allocator="ompq", target_bits=4.0, a_bits=8, calibrator="minmax", seed=seed,
                    options={"act_correction": "ompq-qat", "finetune_epochs": epochs, "finetune_batch_size": 16,
                             "first_last": "same"})


def test_qat_fine_tunes_within_one_grid_step_deterministically(host):
    base = _qat_run(host, 0)
    ft = _qat_run(host, 1)
    again = _qat_run(host, 1)
    assert "ompq_qat" not in base.result.get("measured", {})
    m = ft.result["measured"]["ompq_qat"]
    assert m["epochs"] == 1 and m["steps"] == 64 // 16 and 0 < m["weights_changed"] < 1
    assert base.plan.layers == ft.plan.layers
    b_layers, f_layers, a_layers = (qcore.quant_layers(o.model) for o in (base, ft, again))
    moved = 0
    for n, layer in f_layers.items():
        q = layer.weight_quantizer
        wb, wf = b_layers[n].quantized_weight(), layer.quantized_weight()
        assert torch.equal(q(layer.module.weight), wf)  # deployed as the quantizer quantizes the trained weight
        step = qparams_from_range(q.lo, q.hi, q.row_bits(), q.spec.symmetric)[0]  # the grid's own step per row
        diff = q.rows_of(wf - wb).abs().amax(1)
        assert (diff <= 1.0001 * step + 1e-7).all()  # every weight moved at most one step of its own grid
        moved += int((wf != wb).sum())
        assert torch.equal(wf, a_layers[n].quantized_weight())  # deterministic for a seed
    assert moved > 0
    assert m["loss_end"] <= m["loss_start"] * 1.5  # one short epoch: runs and does not blow up
    with pytest.raises(qcore.NotImplementedMethodError, match="distill"):
        run_tiny(host, allocator="ompq", target_bits=4.0, calibrator="minmax",
                 options={"act_correction": "ompq-qat", "finetune_epochs": 1, "distill": False,
                          "first_last": "same"})


def test_seed_solver_through_the_allocator(host):
    r = run_tiny(host, allocator="ompq", target_bits=5.0, calibrator="minmax",
                 options={"solver": "seed", "objective": "linear", "bit_choices": (2, 3, 4)}).result
    assert r["measured"]["ompq"]["solver"].startswith("seed") and r["w_bits_avg"] <= 5.0 + 1e-9


# -- beta chosen on calibration data -------------------------------------------------------------------------------
def _slow_distortion(ctx, bits, batches, acts=True):
    """Reference for plan_distortion, written out by hand: per-channel min/max weights on core's UniformFakeQuant,
    then (``acts``) per-tensor min/max inputs, their extremes observed over ``batches`` on the model with quantized
    weights and FP inputs (as core's calibration observes them); KL(FP || simulated) of the logits."""
    from qcore.ranges import minmax_range

    model = ctx.model
    with torch.no_grad():
        refs = [ctx.task.forward(model, b) for b in batches]
    sim = copy.deepcopy(model).eval()
    for n, info in ctx.layers.items():
        pin = ctx.pinned.get(n)
        wb = pin.w_bits if pin is not None else bits[n]
        mod = sim.get_submodule(n)
        wq = qcore.UniformFakeQuant(qcore.QuantSpec(wb, symmetric=False, granularity="channel"),
                                    info.out_channels, info.weight_axis)
        qcore.calibrate_rows(wq, wq.rows_of(mod.weight.detach()), minmax_range)
        with torch.no_grad():
            mod.weight.copy_(wq(mod.weight))
    if acts:
        lo_hi = {}

        def watch(name):
            def hook(_m, args):
                x = args[0].detach()
                lo, hi = lo_hi.get(name, (math.inf, -math.inf))
                lo_hi[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            return hook
        handles = [sim.get_submodule(n).register_forward_pre_hook(watch(n)) for n in ctx.layers]
        with torch.no_grad():
            for b in batches:
                ctx.task.forward(sim, b)
        for h in handles:
            h.remove()
        for n, info in ctx.layers.items():
            pin = ctx.pinned.get(n)
            ab = pin.a_bits if pin is not None else ctx.budget.a_bits
            aq = qcore.UniformFakeQuant(qcore.QuantSpec(ab, symmetric=False), info.in_channels, info.act_axis)
            lo, hi = lo_hi[n]
            qcore.calibrate_rows(aq, torch.tensor([[lo, hi]]), minmax_range)
            sim.get_submodule(n).register_forward_pre_hook(lambda _m, args, aq=aq: (aq(args[0]), *args[1:]))
    total = 0.0
    with torch.no_grad():
        for b, ref in zip(batches, refs, strict=True):
            out = ctx.task.forward(sim, b)
            total += float(torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                                      reduction="batchmean"))
    return total / len(batches)


def test_plan_distortion_matches_a_hand_built_simulation(host):
    out = run_tiny(host, allocator="ompq", target_bits=6.0, a_bits=4, calibrator="minmax",
                   options={"ompq_beta": 1.0, "weight_symmetric": False})
    ctx = out.ctx
    free = [n for n in ctx.layers if n not in ctx.pinned]
    batches = list(ctx.calibration_batches())[1:]
    plans = [{n: 2 for n in free}, {n: 8 for n in free}, out.result["measured"]["ompq"]["bits"]]
    for acts in (True, False):
        scores = plan_distortion(ctx, plans, batches, activations="run" if acts else "fp")
        ref = [_slow_distortion(ctx, p, batches, acts) for p in plans]
        assert scores == pytest.approx(ref, rel=1e-4, abs=1e-7)
        assert scores[1] < scores[0]  # 8-bit weights are closer to FP than 2-bit ones
    assert plan_distortion(ctx, plans[:1], batches, "fp")[0] < plan_distortion(ctx, plans[:1], batches)[0]
    with pytest.raises(qcore.QcoreError, match="activations"):
        plan_distortion(ctx, plans[:1], batches, "int8")


def test_default_beta_is_chosen_on_held_out_calibration_data(host):
    grid = (0.0, 1.0, 30.0)
    out = run_tiny(host, allocator="ompq", target_bits=6.0, a_bits=8, calibrator="minmax",
                   options={"beta_grid": grid})
    m = out.result["measured"]["ompq"]
    s = m["beta_search"]
    assert s["grid"] == list(grid) and s["held_out"] and len(s["scores"]) == 3 and s["activations"] == "fp"
    assert s["chosen"] == grid[int(np.argmin(s["scores"]))] == m["beta"] == m["orthogonality"]["beta"]
    assert m["bits"] == s["bits"][str(s["chosen"])]  # the plan deployed is the chosen beta's plan
    batches = list(out.ctx.calibration_batches())[1:]
    assert plan_distortion(out.ctx, [m["bits"]], batches[:1], "fp")[0] == pytest.approx(min(s["scores"]))
    theta = np.array(list(m["orthogonality"]["theta"].values()))
    assert s["chosen"] != 0.0 or np.allclose(theta, 1.0)  # beta 0: every layer equally important
    fixed = run_tiny(host, allocator="ompq", target_bits=6.0, a_bits=8, calibrator="minmax",
                     options={"ompq_beta": 1.0}).result["measured"]["ompq"]
    assert "beta_search" not in fixed and fixed["beta"] == 1.0
    assert fixed["bits"] == s["bits"]["1.0"]  # a fixed beta solves exactly what the grid solved for it
    with pytest.raises(qcore.QcoreError, match="beta_grid"):
        run_tiny(host, allocator="ompq", target_bits=6.0, options={"beta_grid": (-1.0,)})


class _TinyAttention(torch.nn.Module):
    """One self-attention through F.scaled_dot_product_attention (whose fused CPU kernel has no double backward)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(1))


def test_hessian_traces_through_attention_match_the_exact_trace():
    from qcore_ompq import hessian_traces

    torch.manual_seed(0)
    model = _TinyAttention().eval()
    batch = torch.randn(8, 5, 4)
    fwd = lambda m, b: m(b)  # noqa: E731
    traces = hessian_traces(model, ["qkv", "head"], [batch], fwd, probes=64)
    ref = fwd(model, batch).detach()
    for name in ("qkv", "head"):
        mod = copy.deepcopy(model)
        w0 = mod.get_submodule(name).weight.detach()

        def loss(w, name=name, mod=mod):
            out = torch.func.functional_call(mod, {f"{name}.weight": w}, (batch,))
            return torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                              reduction="batchmean")
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            h = torch.autograd.functional.hessian(loss, w0)
        exact = float(h.reshape(w0.numel(), w0.numel()).trace())
        assert exact > 0 and traces[name] == pytest.approx(exact, rel=0.15)


# -- the activation-bit search (-o act_bits=search) ----------------------------------------------------------------
def _joint_case(seed, n=3):
    rng = np.random.default_rng(seed)
    w_choices, a_choices = [2, 4, 8], [4, 6, 8]
    sizes = rng.integers(10, 300, n).tolist()
    w_dist = np.sort(rng.random((n, 3)) * rng.random((n, 1)) * 10, axis=1)[:, ::-1]
    a_dist = np.sort(rng.random((n, 3)) * rng.random((n, 1)) * 10, axis=1)[:, ::-1]
    macs = (rng.integers(1, 100, n) * 4).astype(float).tolist()
    size_budget = rng.uniform(2.5, 7.0) * sum(sizes)
    bops_budget = rng.uniform(16.0, 50.0) * sum(macs)
    return sizes, w_dist, a_dist, w_choices, a_choices, size_budget, macs, bops_budget


@pytest.mark.parametrize("seed", range(6))
def test_joint_ilp_equals_brute_force_and_never_exceeds_budgets(seed):
    sizes, w_dist, a_dist, wc, ac, size_budget, macs, bops_budget = _joint_case(seed)
    extra = storage = None
    if seed % 3 == 2:  # a format's extra storage as well
        extra = np.array([[2 ** b * 4 for b in wc]] * len(sizes))
        storage = 4.0 * sum(sizes) + extra[:, 1].sum()
    ilp = solve_joint(sizes, w_dist, a_dist, wc, ac, size_budget, macs, bops_budget, extra=extra,
                      storage_budget=storage)
    ref = brute_force_joint(sizes, w_dist, a_dist, wc, ac, size_budget, macs, bops_budget, extra=extra,
                            storage_budget=storage)
    assert ref is not None and ilp.a_bits is not None
    assert ilp.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)
    assert ilp.size_bits == sum(s * b for s, b in zip(sizes, ilp.bits, strict=True)) <= size_budget
    bops = sum(m * w * a for m, w, a in zip(macs, ilp.bits, ilp.a_bits, strict=True))
    assert ilp.bops == bops <= bops_budget
    if storage is not None:
        assert sum(n * b + 2 ** b * 4 for n, b in zip(sizes, ilp.bits, strict=True)) <= storage


def test_joint_ilp_refuses_an_impossible_bops_budget_and_reduces_to_the_weight_ilp():
    sizes, w_dist, a_dist, wc, ac, size_budget, macs, _ = _joint_case(11)
    with pytest.raises(qcore.QcoreError, match="BOPs"):
        solve_joint(sizes, w_dist, a_dist, wc, ac, 8 * sum(sizes), macs, 2 * 4 * sum(macs) - 1)
    # one activation choice: the weight-only ILP with MACs x those bits (same optimum, same budgets)
    budget = 5 * 6 * sum(macs)
    one = solve_joint(sizes, w_dist, a_dist[:, 1:2], wc, [6], size_budget, macs, budget)
    ref = solve_ilp(sizes, w_dist, wc, size_budget, macs=[m * 6 for m in macs], bops_budget=budget)
    assert one.bits == ref.bits and one.a_bits == [6] * len(sizes)
    assert one.objective == pytest.approx(ref.objective + float(a_dist[:, 1].sum()))


def _search_run(host, **options):
    return run_tiny(host, allocator="ompq", target_bits=5.0, a_bits=6, calibrator="minmax",
                    options={"first_last": "same", "act_bits": "search", **options})


def test_activation_search_deploys_per_layer_bits_within_the_bops_budget(host):
    out = _search_run(host)
    r, m = out.result, out.result["measured"]["ompq"]
    act = m["act_search"]
    uniform = run_tiny(host, allocator="fixed", w_bits=5, a_bits=6, calibrator="minmax",
                       options={"first_last": "same"}).result
    # the derived budget is the uniform W5A6 plan's BOPs (every layer free here), never exceeded
    assert act["bops_g_budget"] == pytest.approx(uniform["bops"] / 1e9)
    assert r["bops"] <= uniform["bops"] * (1 + 1e-12) and m["bops_g"] == pytest.approx(r["bops"] / 1e9)
    assert r["w_bits_avg"] <= 5.0 + 1e-9
    assert set(act["bits"]) == set(m["bits"]) and set(act["bits"].values()) <= set(act["choices"])
    # deployable: one per-tensor activation quantizer per layer, at the searched bits
    for name, layer in qcore.quant_layers(out.model).items():
        assert layer.act_quantizer.spec.granularity == "tensor"
        assert layer.act_quantizer.spec.bits == act["bits"][name]
    assert "a_bits" in m["beta_search"] and m["beta_search"]["activations"] == "run"
    assert "input_orthogonality" in m
    # an explicit budget holds too, and a tighter one lowers the BOPs
    tight = uniform["bops"] / 1e9 * 0.8
    r2 = _search_run(host, bops_g=tight, ompq_beta=0.0).result
    assert r2["bops"] / 1e9 <= tight and r2["measured"]["ompq"]["act_search"]["budget_from"] == "-o bops_g"
    with pytest.raises(qcore.QcoreError, match="BOPs"):
        _search_run(host, bops_g=uniform["bops"] / 1e9 / 10)
    with pytest.raises(qcore.QcoreError, match="act_bits=search is not implemented"):
        _search_run(host, criterion="uniform")


def test_default_activations_stay_uniform_and_one_act_choice_reproduces_the_default_plan(host):
    common = dict(allocator="ompq", target_bits=5.0, a_bits=6, calibrator="minmax")
    default = run_tiny(host, options={"first_last": "same", "ompq_beta": 1.0}, **common)
    m = default.result["measured"]["ompq"]
    assert "act_search" not in m and m["act_bits"] == "uniform"
    assert {layer.act_quantizer.spec.bits for layer in qcore.quant_layers(default.model).values()} == {6}
    # searching over the single choice --a-bits with a budget that does not bind is the default problem
    one = run_tiny(host, options={"first_last": "same", "ompq_beta": 1.0, "act_bits": "search",
                                  "act_choices": (6,), "bops_g": 1e3}, **common)
    assert one.result["measured"]["ompq"]["bits"] == m["bits"]
    assert one.result["measured"]["ompq"]["act_search"]["bits"] == {n: 6 for n in m["bits"]}


def test_input_features_are_the_layers_inputs(host):
    out = run_tiny(host, allocator="fixed", w_bits=8, a_bits=8, calibrator="minmax")
    model, ctx = out.fp_model, out.ctx
    batch = next(iter(ctx.calibration_batches()))
    names = list(ctx.layers)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().reshape(a[0].shape[0], -1).double())) for n in names]
    with torch.no_grad():
        ctx.task.forward(model, batch)
    for h in hooks:
        h.remove()
    feats = layer_features(model, names, batch, ctx.task.forward, layers=ctx.layers, inputs=True)
    raw = layer_features(model, names, batch, ctx.task.forward, layers=ctx.layers, inputs=True, flatten=False)
    for n in names:
        assert torch.equal(feats[n], seen[n])
        assert torch.equal(flat_features(raw[n]), seen[n])
    # the search captures the inputs once and hands them to input_errors: the same errors as its own forward pass
    own = input_errors(ctx, names, [4, 8], 2, batch, samples=8)
    given = input_errors(ctx, names, [4, 8], 2, batch, inputs={n: t[:8] for n, t in raw.items()})
    assert given.samples == own.samples == 8
    assert np.array_equal(given.act, own.act) and np.array_equal(given.ref, own.ref)


def test_plan_distortion_scores_per_layer_activation_bits(host):
    out = run_tiny(host, allocator="ompq", target_bits=5.0, a_bits=6, calibrator="minmax",
                   options={"first_last": "same", "ompq_beta": 0.0})
    ctx, bits = out.ctx, out.result["measured"]["ompq"]["bits"]
    batches = list(ctx.calibration_batches())[:1]
    same = plan_distortion(ctx, [bits], batches, "run", act_plans=[{n: 6 for n in bits}])
    assert same == plan_distortion(ctx, [bits], batches, "run")  # --a-bits everywhere: the default's score
    wide, narrow = plan_distortion(ctx, [bits, bits], batches, "run",
                                   act_plans=[{n: 8 for n in bits}, {n: 2 for n in bits}])
    assert narrow > wide
