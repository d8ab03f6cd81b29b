"""Contract checks: each runs a component through the real pipeline on the tiny task and asserts what every
component of its role must guarantee (``PLUGINS.md`` states the contracts). They raise ``AssertionError``
with the reason, naming the component and what it got wrong.

Floors are measured, not guessed; the numbers they come from are in the docstrings below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from qcore._components import OutputCorrection, RunConfig, RunContext, WeightCorrection
from qcore._errors import ContractError, QcoreError
from qcore._fake_quant import FakeQuantizer
from qcore._layers import torch_layer_info
from qcore._options import build_options
from qcore._pipeline import RunOutcome, run, uncalibrated
from qcore._plugins import Host
from qcore._spec import LayerSpec, Plan, QuantSpec
from qcore._wrap import quant_layers
from qcore.testing.tiny import _MODELS

_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))

#: The one quantizable layer of ``tiny:gauss`` (Flatten, Linear): its weight is ``[128, 64]`` from N(0, 1).
GAUSS_LAYER = "1"

#: W8A8 agreement with FP (%) that :func:`check_calibrator` demands by default. Measured on ``tiny:convnet``
#: (seed 0, 128 evaluation inputs, so one input is 0.78 %): ``minmax``, ``mse``, ``percentile`` and ``aciq``
#: all give 99.2 % (96.9-100 % over seeds 0-2). 95 % allows five more disagreeing inputs than they have.
W8A8_AGREEMENT_FLOOR = 95.0


def uniform_sqnr_floor(bits: int) -> float:
    """The SQNR floor (dB) of a uniform grid at ``bits`` for the Gaussian weight of ``tiny:gauss``.

    Core's ``uniform`` grid, per-channel symmetric, min/max ranges (64 values per channel) measures 2.8, 12.0,
    19.3, 25.9, 32.2 and 44.4 dB at 2, 3, 4, 5, 6 and 8 bits: about 6.2 dB per bit from 3 bits on. The floor is
    ``6.02 * bits - 10`` dB from 3 bits on (3.9 dB or more below ``uniform``: room for restricted uniform grids,
    e.g. power-of-two scales, which lose up to 6 dB on a row and 1-2 dB on average) and 0 dB at 2 bits and
    below (better than replacing the weight by zeros; a 2-bit symmetric min/max grid keeps little more).
    """
    return 0.0 if bits <= 2 else 6.02 * bits - 10.0


def run_tiny(host: Host, model: str = "tiny:convnet", **config: Any) -> RunOutcome:
    """Run the pipeline on the tiny task (no files written unless ``out`` is given).

    Keywords are :class:`qcore.RunConfig` fields; component options go in ``options={...}``. Without
    ``method`` or ``plugin`` the ``uniform`` method runs; ``plugin="x"`` runs plugin x's default method, as
    ``qcore run --plugin x`` does.

    :raises TypeError: a keyword that is not a :class:`qcore.RunConfig` field.
    """
    unknown = sorted(set(config) - _RUN_FIELDS)
    if unknown:
        raise TypeError(f"run_tiny() got unknown keyword(s) {', '.join(unknown)}; it takes qcore.RunConfig fields "
                        f"({', '.join(sorted(_RUN_FIELDS))}); put component options in options={{...}}")
    defaults: dict[str, Any] = {"task": "tiny", "model": model, "calib_size": 64, "batch_size": 32,
                                "eval_size": 128}
    defaults.update(config)
    return run(RunConfig(**defaults), host)


def _check_outcome(outcome: RunOutcome, who: str) -> None:
    r = outcome.result
    assert r["quant"] is not None and math.isfinite(r["quant"]), f"{who}: the quantized metric must be a finite number"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = outcome.model(x)
    assert torch.isfinite(y).all(), f"{who}: the quantized model must produce finite outputs"


def _uncalibrated(model: torch.nn.Module) -> list[str]:
    """``layer.role`` of every quantizer in ``model`` that is not a calibrated :class:`qcore.FakeQuantizer`."""
    return uncalibrated(model, strict=True)


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = float((approx.detach().float() - reference.detach().float()).pow(2).sum())
    signal = float(reference.detach().float().pow(2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


# -- quantizers -------------------------------------------------------------------------------------------------
def _check_protocol(host: Host, name: str, weight_spec: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """``make`` returns a :class:`FakeQuantizer` for both roles, and each refuses to run uncalibrated."""
    cls = host.get("quantizer", name)
    quantizer = cls(build_options(cls.Options, options, f"quantizer {name!r}"))
    info = torch_layer_info(torch.nn.Linear(64, 128), "probe")
    assert info is not None
    specs = {"weight": QuantSpec(**{"bits": 4, "symmetric": True, "granularity": "channel", "quantizer": name,
                                    **weight_spec}),
             "act": QuantSpec(bits=8, symmetric=False, granularity="tensor", quantizer=name)}
    inputs = {"weight": torch.randn(128, 64), "act": torch.randn(8, 64)}
    for role, spec in specs.items():
        q = quantizer.make(spec, role, info)
        assert isinstance(q, FakeQuantizer), (
            f"quantizer {name!r}: make(spec, {role!r}, info) returned {type(q).__name__}, not a qcore.FakeQuantizer: "
            "calibrators set a quantizer only through the FakeQuantizer protocol")
        assert not q.calibrated, f"quantizer {name!r}: a new {role} quantizer says it is calibrated"
        try:
            q(inputs[role])
        except QcoreError:
            pass
        else:
            raise AssertionError(f"quantizer {name!r}: the {role} quantizer ran before calibration; it must raise "
                                 "qcore.QcoreError (FakeQuantizer.forward does: implement quantize(), not forward())")


def check_quantizer(host: Host, name: str, bits: Sequence[int] = (2, 3, 4, 6, 8), *,
                    grid: Literal["uniform", "nonuniform"] = "uniform", calibrator: str = "minmax",
                    weight_spec: Mapping[str, Any] | None = None, **options: Any) -> dict[int, float]:
    """Check a quantizer's contract and return its weight SQNR (dB) at each bit-width in ``bits``.

    * ``make`` returns a :class:`qcore.FakeQuantizer` for weights and activations, and each refuses to run
      before calibration;
    * at every bit-width, a run on ``tiny:gauss`` (one Linear layer, N(0, 1) weight ``[128, 64]``, W``b``A``b``)
      calibrated by ``calibrator`` leaves every quantizer calibrated and gives finite outputs. The default
      ``minmax`` calibrator sets quantizers only through the protocol (``set_range`` where ``uses_range``, then
      ``fit``), so a format that passes it works with any range calibrator;
    * the SQNR of the layer's quantized weight against its FP weight meets the floor of its grid:
      ``grid="uniform"``: :func:`uniform_sqnr_floor` at each bit-width (about 6 dB per bit);
      ``grid="nonuniform"`` (dead-zone, bin-allocated, codebook grids, whose SQNR may saturate): above 0 dB at
      the highest bit-width and never falling by more than 0.1 dB as bits grow.

    :param calibrator: the calibrator that can set this format (``aciq`` for a format that only its own
        calibrator can set).
    :param weight_spec: extra :class:`qcore.QuantSpec` fields of the weight (e.g. ``granularity="group"``,
        ``group_size``, ``group_params`` for a per-group format); the run then applies a plan with that spec.
    :param options: ``-o`` options of the run (quantizer, calibrator or pipeline options).
    """
    wspec = dict(weight_spec or {})
    _check_protocol(host, name, wspec, options)
    sqnr: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in sorted(set(bits)):
            cfg: dict[str, Any] = {"quantizer": name, "calibrator": calibrator, "w_bits": b, "a_bits": b,
                                   "allocator": "fixed"}
            opts: dict[str, Any] = {"first_last": "same", **options}
            if wspec:  # a spec the fixed allocator cannot express: apply it as a saved plan
                path = Path(tmp) / f"plan{b}.json"
                weight = QuantSpec(**{"bits": b, "symmetric": True, "granularity": "channel", "quantizer": name,
                                      **wspec})
                act = QuantSpec(bits=b, symmetric=False, granularity="tensor", quantizer=name)
                path.write_text(Plan(layers={GAUSS_LAYER: LayerSpec(weight=weight, act=act)}).to_json())
                cfg["allocator"], opts["plan"] = "plan", str(path)
            who = f"quantizer {name!r} at {b} bits (calibrator {calibrator!r})"
            try:
                out = run_tiny(host, model="tiny:gauss", eval_size=64, options=opts, **cfg)
            except QcoreError as exc:
                raise AssertionError(f"{who} failed: {exc}") from exc
            _check_outcome(out, who)
            missing = _uncalibrated(out.model)
            assert not missing, f"{who}: quantizer(s) not calibrated: {', '.join(missing)}"
            layer = quant_layers(out.model)[GAUSS_LAYER]
            with torch.no_grad():
                wq = layer.quantized_weight()
            assert torch.isfinite(wq).all(), f"{who}: the quantized weight is not finite"
            sqnr[b] = _sqnr_db(layer.module.weight, wq)
    found = ", ".join(f"{b}: {s:.1f}" for b, s in sqnr.items())
    if grid == "uniform":
        low = {b: s for b, s in sqnr.items() if s < uniform_sqnr_floor(b)}
        assert not low, (f"quantizer {name!r}: weight SQNR (dB by bits) {found} is below the uniform-grid floor "
                         f"(6.02 b - 10 dB) at {sorted(low)} bits; for a non-uniform grid pass grid='nonuniform'")
    elif grid == "nonuniform":
        order = sorted(sqnr)
        falls = [(a, b) for a, b in zip(order, order[1:], strict=False) if sqnr[b] < sqnr[a] - 0.1]
        assert not falls, f"quantizer {name!r}: weight SQNR (dB by bits) {found} falls as bits grow at {falls}"
        assert sqnr[order[-1]] > 0.0, f"quantizer {name!r}: weight SQNR {found} is not above 0 dB"
    else:
        raise ValueError(f"grid={grid!r}: use 'uniform' or 'nonuniform'")
    return sqnr


# -- calibrators -----------------------------------------------------------------------------------------------
def check_calibrator(host: Host, name: str, *, quantizer: str = "uniform", model: str = "tiny:convnet",
                     min_agreement: float = W8A8_AGREEMENT_FLOOR, **options: Any) -> RunOutcome:
    """A calibrator must set every quantizer of the model (weights and activations) and keep W8A8 close to FP.

    Runs W8A8 on ``model`` (first and last layer included) with ``quantizer``, then asserts that every
    quantizer is a calibrated :class:`qcore.FakeQuantizer`, that outputs are finite and that agreement with the
    FP model is at least ``min_agreement`` % (:data:`W8A8_AGREEMENT_FLOOR`; lower it only for a calibrator that
    clips by design whatever the bit-width, and say why).
    """
    who = f"calibrator {name!r} (quantizer {quantizer!r})"
    try:
        out = run_tiny(host, model=model, calibrator=name, quantizer=quantizer, allocator="fixed", w_bits=8,
                       a_bits=8, options={"first_last": "same", **options})
    except ContractError as exc:  # the pipeline checks every quantizer is calibrated and names the ones left
        raise AssertionError(f"{who}: {exc}") from exc
    missing = _uncalibrated(out.model)
    assert not missing, f"{who} did not calibrate: {', '.join(missing)}"
    _check_outcome(out, who)
    agreement = out.result["quant"]
    assert agreement >= min_agreement, (f"{who}: W8A8 agreement with FP {agreement:.1f}% is below "
                                        f"{min_agreement:.1f}%")
    return out


# -- allocators ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _recording(host: Host, name: str) -> Iterator[list[tuple[RunContext, Plan]]]:
    """While active, the allocator ``name`` records the context and plan of every ``allocate`` call (before
    core applies the pins; the pipeline itself refuses a return that is not a :class:`qcore.Plan`)."""
    cls = host.get("allocator", name)
    entry = host.tables["allocator"][name]
    calls: list[tuple[RunContext, Plan]] = []

    class Recording(cls):  # type: ignore[valid-type,misc]
        def allocate(self, ctx: RunContext) -> Plan:
            plan = super().allocate(ctx)
            calls.append((ctx, plan))
            return plan

    Recording.__name__ = Recording.__qualname__ = cls.__name__
    entry.obj = Recording
    try:
        yield calls
    finally:
        entry.obj = cls


def _first_layer(model: str) -> str:
    """The first quantizable layer of a tiny model (what ``qcore run`` would call it)."""
    build = _MODELS[model.partition(":")[2]]
    return next(n for n, m in build().named_modules() if torch_layer_info(m, n) is not None)


def check_allocator(host: Host, name: str, target_bits: float | None = 4.0, *, w_bits: int | None = None,
                    a_bits: int = 8, model: str = "tiny:convnet", pin: str | None = "first", pin_bits: int = 8,
                    **options: Any) -> RunOutcome:
    """An allocator must return a :class:`qcore.Plan` that covers every free layer, keep the pins and stay
    within the budget.

    One run on ``model`` with the layer ``pin`` (default: the first) pinned at ``pin_bits`` through the YAML
    ``layers:`` override (first/last pinning off). The pipeline itself refuses a plan that is not a
    :class:`qcore.Plan`, names a layer the run does not quantize, leaves an unpinned layer out, or (with
    ``target_bits``) goes over the budget as the allocator's ``budget_convention`` defines it; here those are
    assertion failures. This check adds:

    * every unpinned layer gets a weight spec in the allocator's own plan (before core applies the pins): a
      plan that keeps a free layer in FP passes the pipeline but not a check of an allocator that quantizes;
    * the pinned layer ends at ``pin_bits`` and the run's outputs are finite;
    * an allocator that spends ``--target-bits`` declares a ``budget_convention``; without ``target_bits`` (a
      fixed-bits allocator) no free layer's weight exceeds ``w_bits`` bits and no activation ``a_bits``.

    :param options: ``-o`` options of the run (allocator or pipeline options).
    """
    if target_bits is None and w_bits is None:
        raise TypeError("check_allocator: a fixed-bits allocator (target_bits=None) needs w_bits")
    who = f"allocator {name!r}"
    pinned_name = _first_layer(model) if pin == "first" else pin
    layers = {pinned_name: {"w_bits": pin_bits, "a_bits": pin_bits}} if pinned_name else {}
    with _recording(host, name) as calls:
        try:
            out = run_tiny(host, model=model, allocator=name, target_bits=target_bits, w_bits=w_bits, a_bits=a_bits,
                           layers=layers, options={"first_last": "same", **options})
        except ContractError as exc:  # what the pipeline checks of every plan: its type, coverage, budget
            raise AssertionError(str(exc)) from exc
    assert calls, f"{who}: allocate() was not called"
    ctx, plan = calls[-1]
    free = [n for n in ctx.layers if n not in ctx.pinned]
    unquantized = [n for n in free if plan.layers[n].weight is None]
    assert not unquantized, f"{who} keeps unpinned layer(s) {', '.join(unquantized)} in floating point"
    if pinned_name:
        assert pinned_name in ctx.pinned, f"{who}: the pin of layer {pinned_name!r} did not reach ctx.pinned"
        spec = out.plan.layers.get(pinned_name)
        assert spec is not None and spec.weight is not None and spec.weight.bits == pin_bits, (
            f"{who}: pinned layer {pinned_name!r} should be at {pin_bits} bits, got {spec}")
    _check_outcome(out, who)
    final = out.plan.layers
    allocator = host.get("allocator", name)
    if target_bits is not None:
        convention = getattr(allocator(build_options(allocator.Options, options, who)), "budget_convention", None)
        assert convention is not None, (f"{who} spends --target-bits but declares no budget_convention, so nothing "
                                        "checks its plans against the budget")
    else:
        over = [n for n in free if max(final[n].weight.group_bits or (final[n].weight.bits,)) > w_bits
                or (final[n].act is not None and max(final[n].act.group_bits or (final[n].act.bits,)) > a_bits)]
        assert not over, f"{who}: layer(s) {', '.join(over)} exceed the fixed budget W{w_bits}A{a_bits}"
    return out


# -- corrections -----------------------------------------------------------------------------------------------
#: How much W4A8 agreement with FP (points, on ``tiny:convnet``, 128 inputs: 0.78 per input) a correction may
#: cost against the same run without it. Core's corrections measured over seeds 0-2: from -0.8 (``local``, one
#: input) to +2.3 (``affine``); a correction that costs more than four inputs on this easy case is broken.
CORRECTION_TOLERANCE = 3.2


def check_correction(host: Host, name: str, *, w_bits: int = 4, a_bits: int = 8,
                     tolerance: float = CORRECTION_TOLERANCE, **options: Any) -> RunOutcome:
    """A correction must be a :class:`qcore.WeightCorrection` or :class:`qcore.OutputCorrection` with a
    ``summary``, run in the pipeline when selected by name (``-o weight_correction`` / ``-o act_correction``),
    leave finite outputs and every quantizer usable, appear in result.json's summary, and cost at most
    ``tolerance`` points of W``w_bits``A``a_bits`` agreement with FP against the same run without it. A weight
    correction must also map a quantized weight to a finite tensor of the same shape, by itself."""
    cls = host.get("correction", name)
    who = f"correction {name!r}"
    assert issubclass(cls, (WeightCorrection, OutputCorrection)), (
        f"{who} is a {cls.__name__}, neither a qcore.WeightCorrection nor a qcore.OutputCorrection")
    assert cls.summary, f"{who} has no summary (the words result.json's quantized.summary uses)"
    key = "weight_correction" if issubclass(cls, WeightCorrection) else "act_correction"
    if issubclass(cls, WeightCorrection):
        corr = cls(build_options(cls.Options, options, who))
        w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
        wq = (w * 2).round() / 2
        out = corr.correct(w, wq, 0)
        assert isinstance(out, torch.Tensor) and out.shape == w.shape and torch.isfinite(out).all(), (
            f"{who}: correct(w, wq, axis) must return a finite tensor shaped like the weight")
    runs = {}
    for value in ("none", name):
        try:
            runs[value] = run_tiny(host, w_bits=w_bits, a_bits=a_bits, allocator="fixed",
                                   options={"first_last": "same", **options, key: value})
        except ContractError as exc:
            raise AssertionError(f"{who}: {exc}") from exc
    out = runs[name]
    _check_outcome(out, who)
    assert cls.summary in out.result["quantized"]["summary"], (
        f"{who}: result.json's summary does not say the correction was applied")
    base, got = runs["none"].result["quant"], out.result["quant"]
    assert got >= base - tolerance, (f"{who}: W{w_bits}A{a_bits} agreement with FP {got:.1f}% against "
                                     f"{base:.1f}% without it (more than {tolerance} points lost)")
    return out
