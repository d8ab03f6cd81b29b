"""Contract checks: each runs a component through the real pipeline on the tiny task and asserts what every
component of its role must guarantee. They raise ``AssertionError`` with the reason."""

from __future__ import annotations

import math
from typing import Any

import torch

from qcore._components import RunConfig
from qcore._pipeline import RunOutcome, run
from qcore._plugins import Host
from qcore._wrap import iter_quantizers


def run_tiny(host: Host, model: str = "tiny:convnet", **config: Any) -> RunOutcome:
    """Run the pipeline on the tiny task (no files written unless ``out`` is given)."""
    defaults: dict[str, Any] = {"task": "tiny", "model": model, "calib_size": 64, "batch_size": 32,
                                "eval_size": 128, "method": "uniform"}
    defaults.update(config)
    return run(RunConfig(**defaults), host)


def _check_outcome(outcome: RunOutcome) -> None:
    r = outcome.result
    assert r["quant"] is not None and math.isfinite(r["quant"]), "the quantized metric must be a finite number"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = outcome.model(x)
    assert torch.isfinite(y).all(), "the quantized model must produce finite outputs"


def check_quantizer(host: Host, name: str, bits: tuple[int, ...] = (8, 4), **options: Any) -> None:
    """A quantizer must insert quantizers, give finite outputs at every bit-width in ``bits``, and keep 16 bits
    near-exact (agreement with FP of at least 95 %)."""
    errors = []
    for b in sorted(set(bits) | {16}, reverse=True):
        out = run_tiny(host, quantizer=name, w_bits=b, a_bits=b, options={"first_last": "same", **options})
        _check_outcome(out)
        assert any(True for _ in iter_quantizers(out.model)), "no quantizer was inserted"
        errors.append((b, 100.0 - out.result["quant"]))
    assert errors[0][1] <= 5.0, f"at 16 bits the model should match FP (disagreement {errors[0][1]:.1f}%)"


def check_calibrator(host: Host, name: str, **options: Any) -> None:
    """A calibrator must leave every quantizer usable and keep W8A8 close to FP on the tiny model."""
    out = run_tiny(host, calibrator=name, w_bits=8, a_bits=8, options={"first_last": "same", **options})
    _check_outcome(out)
    assert out.result["quant"] >= 80.0, f"W8A8 agreement with FP too low: {out.result['quant']:.1f}%"


def check_allocator(host: Host, name: str, target_bits: float = 4.0, **options: Any) -> None:
    """An allocator must cover the layers it is given and respect the average weight budget."""
    out = run_tiny(host, allocator=name, target_bits=target_bits, w_bits=8, a_bits=8,
                   options={"first_last": "same", **options})
    _check_outcome(out)
    avg = out.result["w_bits_avg"]
    assert avg is not None and avg <= target_bits + 1e-6, f"average weight bits {avg} exceed the budget {target_bits}"
