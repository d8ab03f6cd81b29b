"""qcore-latticeq: exact closest points, the lattice format, the basis search, quantile ranges, and the
method through the real pipeline on the tiny task."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from qcore_latticeq import plugin
from qcore_latticeq.activations import quantile, quantile_range
from qcore_latticeq.cvp import babai_nearest_plane, brute_force_points, closest_points, decode
from qcore_latticeq.quantizer import LatticeFakeQuant, LatticeQuantizer, lattice_dim, quantize_basis
from qcore_latticeq.search import SearchSettings, row_loss, search_bases, select_rows

import qcore
from qcore import LayerInfo, QuantSpec, quant_layers
from qcore.ops import fake_quantize, int_range
from qcore.testing import check_calibrator, check_quantizer, make_host, run_tiny


@pytest.fixture(scope="module")
def host():
    return make_host(("latticeq", plugin))


def _random_bases(c: int, n: int, gen: torch.Generator, skew: float = 0.6) -> torch.Tensor:
    """Random, often far-from-orthogonal bases (identity plus a large random part), well away from singular."""
    while True:
        b = torch.eye(n, dtype=torch.float64) + skew * torch.randn(c, n, n, generator=gen, dtype=torch.float64)
        if (torch.linalg.det(b).abs() > 0.2).all():
            return b


@pytest.mark.parametrize("n,bits", [(1, 3), (2, 2), (2, 3), (3, 2), (3, 3)])
def test_exact_cvp_equals_brute_force_on_random_bases(n, bits):
    gen = torch.Generator().manual_seed(10 * n + bits)
    basis = _random_bases(6, n, gen)
    qmin, qmax = (int(t) for t in int_range(torch.tensor(float(bits)), symmetric=True))
    # points inside and far outside the code (clipped outliers)
    v = torch.randn(6, 300, n, generator=gen, dtype=torch.float64) * (2 ** (bits - 1)) * 1.5
    z = closest_points(v, basis, qmin, qmax)
    ref = brute_force_points(v, basis, qmin, qmax)
    d = (decode(z, basis) - v).norm(dim=-1)
    d_ref = (decode(ref, basis) - v).norm(dim=-1)
    assert torch.allclose(d, d_ref, rtol=0, atol=1e-9), f"max excess {float((d - d_ref).max())}"
    # Babai (clipped first) is feasible but not always the closest: the enumeration matters on skewed bases
    d_babai = (decode(babai_nearest_plane(v, basis, qmin, qmax), basis) - v).norm(dim=-1)
    assert (d_babai >= d_ref - 1e-9).all()
    if n > 1:
        assert (d_babai > d_ref + 1e-9).any()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_decoded_points_are_always_inside_the_bounded_code(n):
    gen = torch.Generator().manual_seed(n)
    basis = _random_bases(4, n, gen).float()
    qmin = torch.tensor([-8.0, -4.0, -2.0, -1.0])
    qmax = -qmin - 1
    v = torch.randn(4, 500, n, generator=gen) * 20.0  # mostly far outside
    z = closest_points(v, basis, qmin, qmax)
    assert torch.equal(z, torch.round(z))
    assert (z >= qmin[:, None, None]).all() and (z <= qmax[:, None, None]).all()


def _lattice(bits: int, channels: int, n: int, basis_bits: int = 8, kind: str = "linear",
             granularity: str = "channel") -> LatticeFakeQuant:
    spec = QuantSpec(bits=bits, symmetric=True, granularity=granularity, quantizer="lattice")
    return LatticeFakeQuant(spec, channels, 0, n, basis_bits)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_basis_step_times_identity_reproduces_the_uniform_quantizer_exactly(n):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 48, generator=gen)
    q = _lattice(4, 16, n)
    q.fit(q.rows_of(w))
    step = q.basis[:, 0, 0]
    assert torch.equal(q.basis, step[:, None, None] * torch.eye(n))  # step * I survives 8-bit basis storage
    qmin, qmax = int_range(torch.tensor(4.0), symmetric=True)
    expected = fake_quantize(w, step[:, None], torch.zeros(16, 1), qmin, qmax)
    assert torch.equal(q(w), expected)


def test_basis_grid_contains_zero_and_is_idempotent():
    b = torch.tensor([[[1.0, 0.0, -0.3], [0.0, 0.5, 0.0], [0.2, 0.0, 0.9]]])
    qb = quantize_basis(b, 4)
    assert (qb == 0).sum() == 4 and qb.abs().max() == 1.0
    assert torch.equal(quantize_basis(qb, 4), qb)
    k = 2 ** 3 - 1
    assert torch.allclose(qb * k, torch.round(qb * k))


def test_search_never_loses_to_the_scalar_grid_and_usually_gains():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3 * 64, generator=gen)
    q = _lattice(3, 8, 3)
    rows = q.rows_of(w)
    q.fit(rows)
    scalar = (q(w) - w).pow(2).sum(dim=1)
    basis, rep = search_bases(q, rows, SearchSettings(steps=6, restarts=1, refine=2, noise=(0.2, 0.05)))
    q.set_basis(basis)
    lattice = (q(w) - w).pow(2).sum(dim=1)
    assert (lattice <= scalar * (1 + 1e-6)).all()
    assert rep["loss_end"] <= rep["loss_start"] and rep["rows_improved"] >= 1
    assert torch.equal(quantize_basis(q.basis, 8), q.basis)  # the stored basis is on its 8-bit grid


def test_weighted_scalar_step_is_mse_range_with_equal_weights_and_wins_on_its_own_loss():
    """The output-aware start is core's weighted mse_range (no copy of its search here): equal weights give the
    plain step bit for bit, and the weighted step wins on the weighted loss."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 96, generator=gen) * torch.linspace(0.2, 3.0, 96)  # columns of very different spread
    q = _lattice(3, 6, 2)
    rows = q.rows_of(w)
    bits = q.row_bits()
    assert torch.equal(q.scalar_step(rows, weights=torch.ones(96)), q.scalar_step(rows))
    h = torch.rand(96, generator=gen) ** 4 * 50  # a few heavy inputs

    def weighted_err(step):
        qmin, qmax = int_range(bits, symmetric=True)
        z = torch.minimum(torch.maximum(torch.round(rows / step[:, None]), qmin[:, None]), qmax[:, None])
        return ((z * step[:, None] - rows).pow(2) * h).sum(dim=1)

    weighted = q.scalar_step(rows, weights=h)
    assert (weighted_err(weighted) <= weighted_err(q.scalar_step(rows)) * (1 + 1e-6)).all()
    assert not torch.equal(weighted, q.scalar_step(rows))  # the weights move some clip


def test_input_weighted_search_never_loses_on_its_loss_and_equal_weights_change_nothing():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(8, 32, generator=gen)
    settings = SearchSettings(steps=3, restarts=1, refine=2, noise=(0.1,))
    h = torch.rand(32, generator=gen) * 4
    runs = {}
    for name, weights in (("plain", None), ("ones", torch.ones(32)), ("input", h)):
        q = _lattice(3, 8, 2)
        rows = q.rows_of(w)
        q.fit(rows)
        if weights is not None:
            step = q.scalar_step(rows, weights=weights)
            q.set_basis(step[:, None, None] * torch.eye(2))
        start = q.basis.clone()
        basis, rep = search_bases(q, rows, settings, weights)
        runs[name] = (start, basis, rep)
    assert runs["ones"][2]["loss_end"] == pytest.approx(runs["plain"][2]["loss_end"], rel=1e-4)
    start, basis, rep = runs["input"]
    q = _lattice(3, 8, 2)
    rows = q.rows_of(w)
    weight = h.reshape(1, -1, 2)

    def loss(b):
        return row_loss(decode(q.codes(rows, b), b) - q.vectors_of(rows), weight, "mse")

    assert (loss(basis) <= loss(start) * (1 + 1e-6)).all() and rep["loss_end"] <= rep["loss_start"]
    assert rep["loss_end"] == pytest.approx(float(loss(basis).sum()), rel=1e-4)
    with pytest.raises(qcore.QcoreError, match="non-negative"):
        search_bases(q, rows, settings, -h)


def test_input_weighting_runs_through_the_pipeline(host):
    out = run_tiny(host, plugin="latticeq", options={"first_last": "same", "steps": 2, "restarts": 1, "refine": 1,
                                                     "weighting": "input"})
    facts = out.result["measured"]["lattice-search"]["layers"]
    searched = [f for f in facts.values() if f["n"] > 1]
    assert searched and all(f["loss"] == "mse, input-weighted" for f in searched)


def test_stored_bits_follow_the_cheapest_layout():
    q = _lattice(3, 4, 2)  # 4 rows, 2x2 bases, 8-bit entries: 32 bits per basis
    step = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q.set_basis(step[:, None, None] * torch.eye(2))
    assert not q.basis_rows().any() and q.stored_extra_bits() == 0.0  # c * I: the step is the row's scale
    skew = q.basis.clone()
    skew[1, 0, 1] = 0.05
    q.set_basis(skew)
    assert q.basis_rows().tolist() == [False, True, False, False]
    assert q.stored_extra_bits() == 4 + 32  # a flag per row + one basis
    diag = q.basis.clone()
    diag[:, 1, 1] *= 2  # unequal diagonals are not a scalar grid: every row stores its basis
    q.set_basis(diag)
    assert q.basis_rows().all() and q.stored_extra_bits() == 4 * 32  # no flags needed


def _equal_rate_gain(scalar: torch.Tensor, lattice: torch.Tensor, keep: torch.Tensor, slope: float, length: int,
                     basis_bits: float) -> float:
    """Reference: the tensor's gain over the scalar grid at equal rate (dB) when the rows ``keep`` keep a basis,
    the rate from the cheapest stored layout, written out per case."""
    rows, k = scalar.numel(), int(keep.sum())
    extra = 0.0 if k == 0 else min(rows * basis_bits, rows + k * basis_bits)
    loss = float(torch.where(keep, lattice, scalar).double().sum())
    return 10 * math.log10(float(scalar.double().sum()) / loss) - slope * extra / (rows * length)


def test_tensor_choice_equals_brute_force_over_every_subset():
    gen = torch.Generator().manual_seed(5)
    for case in range(12):
        rows, length, bits = 7, int(torch.randint(16, 300, (1,), generator=gen)), float(4 * (1 + case % 3) ** 2)
        scalar = torch.rand(rows, generator=gen) + 0.1
        lattice = scalar * (0.3 + 0.7 * torch.rand(rows, generator=gen))
        lattice[case % rows] = scalar[case % rows]  # a row the search did not improve
        slope = 4.0 + 3.0 * float(torch.rand(1, generator=gen))
        keep, rep = select_rows(scalar, lattice, slope, length, bits)
        subsets = torch.tensor([[(m >> i) & 1 for i in range(rows)] for m in range(2 ** rows)], dtype=torch.bool)
        brute = max(_equal_rate_gain(scalar, lattice, sub, slope, length, bits) for sub in subsets)
        got = _equal_rate_gain(scalar, lattice, keep, slope, length, bits)
        assert got == pytest.approx(brute, abs=1e-9) and got == pytest.approx(rep["gain_equal_rate_db"], abs=1e-9)
        assert got >= 0.0 and rep["k"] == int(keep.sum())
        assert rep["layout"] == ("scalar" if not keep.any() else "basis" if rep["extra_bits"] == rows * bits
                                 else "mixed")


def test_tensor_choice_layouts():
    scalar = torch.ones(4)
    # 6 dB per bit, 4 rows of 64 weights, 32-bit bases: k = 2 costs 4 + 64 bits = 0.27 bits per weight (1.59 dB)
    keep, rep = select_rows(scalar, torch.tensor([0.2, 0.9, 0.25, 0.99]), 6.0, 64, 32)
    assert rep["layout"] == "mixed" and keep.tolist() == [True, False, True, False]
    keep, rep = select_rows(scalar, torch.tensor([0.4, 0.9, 0.45, 0.99]), 6.0, 64, 32)  # 1.47 dB < 1.59 dB
    assert rep["layout"] == "scalar" and not keep.any() and rep["gain_equal_rate_db"] == 0.0
    keep, rep = select_rows(scalar, scalar * 0.1, 6.0, 64, 32)  # every row pays: no flags needed
    assert rep["layout"] == "basis" and keep.all() and rep["extra_bits"] == 4 * 32


def test_selected_search_never_loses_at_equal_rate():
    """Random tensors, among them short rows (48 weights, a 2x2 8-bit basis = 0.67 bits per weight) where every
    searched basis kept loses to the scalar grid once its bits are priced: the chosen configuration's measured
    gain at equal rate (stored bits as the quantizer counts them) is the one reported, and never negative."""
    gen = torch.Generator().manual_seed(3)
    settings = SearchSettings(steps=4, restarts=1, refine=2, noise=(0.2, 0.05))
    priced = {}
    for rows_, length, laplace in ((16, 48, False), (8, 96, True), (12, 144, False), (6, 400, True)):
        w = torch.randn(rows_, length, generator=gen)
        if laplace:
            w = w.sign() * w.pow(2)
        for select in (False, True):
            q = _lattice(2, rows_, 2)
            rows = q.rows_of(w)
            q.fit(rows)
            scalar = float((q(w) - w).pow(2).sum())
            more = _lattice(3, rows_, 2)
            more.fit(rows)
            slope = 10 * math.log10(scalar / float((more(w) - w).pow(2).sum()))
            basis, rep = search_bases(q, rows, dataclasses.replace(settings, select=select))
            q.set_basis(basis)
            loss = float((q(w) - w).pow(2).sum())
            assert loss <= scalar * (1 + 1e-6)
            gain = 10 * math.log10(scalar / loss) - slope * q.stored_extra_bits() / w.numel()
            priced[rows_, select] = gain
            if select:
                assert gain >= -1e-6
                assert gain == pytest.approx(rep["gain_equal_rate_db"], abs=1e-3)
                assert rep["rows_with_basis"] == int(q.basis_rows().sum())
                assert rep["slope_db"] == pytest.approx(slope, abs=1e-3)
        assert priced[rows_, True] >= priced[rows_, False] - 1e-6
    assert priced[16, False] < 0.0  # the short rows: keeping every basis loses, the choice does not


def test_search_cubic_loss_and_tensor_granularity():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 40, generator=gen)
    q = _lattice(3, 4, 2, granularity="tensor")
    rows = q.rows_of(w)
    q.fit(rows)
    basis, rep = search_bases(q, rows, SearchSettings(steps=4, restarts=1, refine=1, loss="cubic"))
    assert basis.shape == (1, 2, 2) and rep["loss_end"] <= rep["loss_start"]


def test_lattice_dim_rule():
    def info(kind, cin, macs):
        return LayerInfo(name="x", kind=kind, out_channels=8, in_channels=cin, macs_per_out=macs)

    assert lattice_dim(info("conv2d", 16, 16 * 9), 2) == 3
    assert lattice_dim(info("conv2d", 16, 16), 2) == 2
    assert lattice_dim(info("conv2d", 16, 16), 3) == 3
    assert lattice_dim(info("conv2d", 1, 9), 2) == 1  # the image stem
    assert lattice_dim(info("conv2d", 16, 9), 2) == 1  # depthwise 3x3: scalar
    assert lattice_dim(info("linear", 96, 96), 2) == 2
    # basis storage per weight: 4 * 8 bits over 16 weights = 2 bits > 0.5: scalar; over 96 weights: 0.33
    assert lattice_dim(dataclasses.replace(info("conv2d", 16, 16), weight_numel=8 * 16), 2, 8, 0.5) == 1
    assert lattice_dim(dataclasses.replace(info("linear", 96, 96), weight_numel=8 * 96), 2, 8, 0.5) == 2


def test_quantile_equals_torch_quantile_on_small_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1001, generator=gen, dtype=torch.float64)
    for p in (0.0, 0.5, 0.9991, 0.9997, 1.0, 0.37):
        assert torch.allclose(quantile(x, p), torch.quantile(x, p, dim=1), rtol=0, atol=1e-12)
        # float32: torch.quantile's interpolation weight is rounded to float32, ours is not
        assert torch.allclose(quantile(x.float(), p), torch.quantile(x.float(), p, dim=1), rtol=0, atol=2e-5)
    lo, hi = quantile_range(x, torch.tensor([4.0]), symmetric=False)
    assert torch.allclose(hi.double(), torch.quantile(x, 0.9997, dim=1), atol=1e-6)
    assert torch.allclose(lo.double(), torch.quantile(x, 1 - 0.9997, dim=1), atol=1e-6)


def test_quantile_beyond_torch_quantile_old_limit():
    """torch.quantile refused more than 2^24 values (pytorch #64947) in torch versions this plugin supports
    (>= 2.1; the pinned one lifted the limit): kthvalue has none. The values 0..m-1 have the p-quantile
    p (m - 1) exactly."""
    m = 2**24 + 8
    x = torch.arange(m, dtype=torch.float32).flip(0)[None]  # not sorted
    for p in (0.5, 0.9997):
        assert float(quantile(x, p)) == pytest.approx(p * (m - 1), abs=2.0)  # float32 spacing at 2^24 is 2


def test_signed_inputs_are_quantized_correctly(host):
    """The seed mapped signed inputs to about x/2 + alpha/2; quantile ranges on core's affine grid keep them."""
    x = torch.linspace(-3, 3, 4001)[None]
    lo, hi = quantile_range(x, torch.tensor([8.0]), symmetric=False)
    q = qcore.UniformFakeQuant(QuantSpec(bits=8, symmetric=False), None, 1)
    q.set_range(lo, hi)
    assert float(lo) == -3.0 and float(hi) == 3.0
    assert (q(x) - x).abs().max() <= 6 / 255 / 2 + 1e-6


def test_contract_and_cost_of_the_basis(host):
    sqnr = check_quantizer(host, "lattice", bits=(2, 3, 4), calibrator="lattice-search", grid="nonuniform",
                           steps=2, restarts=1, refine=1)
    uniform = check_quantizer(host, "uniform", bits=(2, 3, 4), calibrator="mse")
    for b in (2, 3, 4):  # never below the MSE-optimal scalar grid it starts from
        assert sqnr[b] >= uniform[b] - 0.05
    # any range calibrator calibrates it through the protocol (fit: the scalar grid)
    check_quantizer(host, "lattice", bits=(4,), grid="nonuniform")


def test_calibrator_contract(host):
    check_calibrator(host, "lattice-search", quantizer="lattice", steps=2, restarts=1, refine=1)


def test_method_counts_basis_storage_and_keeps_channel_means(host):
    out = run_tiny(host, plugin="latticeq", options={"first_last": "same", "steps": 2, "restarts": 1,
                                                     "refine": 1})
    r = out.result
    assert r["method"] == "latticeq" and not r["quantized"]["deployable"]
    assert r["quantized"]["weight_correction"] == "mean"
    layers = quant_layers(out.model)
    quantizer = LatticeQuantizer(LatticeQuantizer.Options())
    # the cost counts each calibrated tensor's layout (scalar rows store no basis), at most every row's basis
    extra = sum(layers[n].weight_quantizer.stored_extra_bits() for n in layers)
    bound = sum(quantizer.extra_bits(layers[n].spec.weight, "weight", out.ctx.layers[n]) for n in layers)
    numel = sum(out.ctx.layers[n].weight_numel for n in layers)
    assert 0 <= extra <= bound and bound > 0 and r["w_bits_avg"] == pytest.approx(4 + extra / numel)
    for name, layer in layers.items():
        w = layer.module.weight.detach()
        n = layer.weight_quantizer.n
        assert n == quantizer.dim_of(out.ctx.layers[name])
        wq = layer.quantized_weight()
        assert torch.allclose(wq.mean(dim=tuple(range(1, w.dim()))), w.mean(dim=tuple(range(1, w.dim()))),
                              atol=1e-6)  # core's mean correction, reused
    assert "lattice-search" in r["measured"]


def test_save_and_load_are_bit_identical(host, tmp_path):
    out = run_tiny(host, plugin="latticeq", out=tmp_path / "run",
                   options={"first_last": "same", "steps": 2, "restarts": 1, "refine": 1})
    loaded = qcore.load(tmp_path / "run" / "model.qcore", qcore.testing.tiny_convnet(), host=host)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(out.model(x), loaded(x))
    for name, layer in quant_layers(loaded).items():
        assert torch.equal(layer.weight_quantizer.basis, quant_layers(out.model)[name].weight_quantizer.basis)


def test_bad_options_are_one_line_errors(host):
    with pytest.raises(qcore.QcoreError, match="dim=4"):
        run_tiny(host, plugin="latticeq", options={"dim": 4})
    with pytest.raises(qcore.QcoreError, match="basis_bits"):
        run_tiny(host, plugin="latticeq", options={"basis_bits": 1})
    with pytest.raises(qcore.QcoreError, match="weight_granularity"):
        LatticeFakeQuant(QuantSpec(4, granularity="group", group_size=2), 4, 0, 2, 8)


def test_reconstruction_learns_lattice_codes_through_the_ste(host):
    """-o recon=true: qcore-recon's engine with the lattice's own rounding; the stored weights still decode to
    codes of the (unchanged) bases and the loss does not rise."""
    from qcore_recon import plugin as recon_plugin

    host = make_host(("latticeq", plugin), ("recon", recon_plugin))
    opts = {"first_last": "same", "steps": 1, "restarts": 1, "refine": 1}
    before = run_tiny(host, plugin="latticeq", options=opts)
    out = run_tiny(host, plugin="latticeq", options=opts | {"recon": True, "recon_iters": 10})
    rec = out.result["measured"]["lattice-search"]["recon"]
    assert rec["units"] >= 1
    for name, layer in quant_layers(out.model).items():
        q = layer.weight_quantizer
        assert torch.equal(q.basis, quant_layers(before.model)[name].weight_quantizer.basis)
        rows = q.rows_of(layer.module.weight.detach())
        z = q.codes(rows)
        qmin, qmax = q.code_bounds()
        assert (z >= qmin[:, None, None]).all() and (z <= qmax[:, None, None]).all()
    starts, ends = rec["loss_start_per_unit"], rec["loss_end_per_unit"]
    assert sum(ends.values()) <= sum(starts.values()) * 1.05


def test_input_weighting_uses_the_equalized_input(monkeypatch):
    """On an equalized layer (-o equalize) the quantized weight is W * s and its input x / s, so the loss weights
    are the moments of x / s, not of the FP input x."""
    from qcore_latticeq.calibrator import LatticeSearchCalibrator

    from qcore.testing import tiny_gelu_mlp

    seen: dict[str, torch.Tensor] = {}
    original = LatticeSearchCalibrator.input_weights

    def record(self, model, ctx):
        out = original(self, model, ctx)
        seen.update(out)
        return out

    monkeypatch.setattr(LatticeSearchCalibrator, "input_weights", record)
    calib = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    q = qcore.quantize(tiny_gelu_mlp(), calib, method="latticeq", w_bits=4, a_bits=8,
                       options={"equalize": "gelu", "weighting": "input", "first_last": "same", "steps": 1,
                                "restarts": 1, "refine": 0})
    inv = qcore.quant_layers(q.model)["4"].input_scale
    assert inv is not None and "4" in seen
    fp = tiny_gelu_mlp()
    with torch.no_grad():
        x = fp[2](fp[1](fp[0](calib)))  # the GELU output, layer 4's FP input
    want = (x * inv).pow(2).mean(dim=0)
    want = (want / want.mean()).clamp_min(1e-3)
    torch.testing.assert_close(seen["4"], want, rtol=1e-4, atol=1e-6)
