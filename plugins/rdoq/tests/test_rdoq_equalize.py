"""RDOQ under input equalization (-o equalize=gelu, core's default): the plan is chosen before equalization, and
the run says so."""

from __future__ import annotations

import torch

import qcore
from qcore.testing import tiny_gelu_mlp


def test_a_searched_plan_on_an_equalized_model_is_flagged() -> None:
    calib = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q = qcore.quantize(tiny_gelu_mlp(), calib, method="rdoq", w_bits=4, a_bits=4, options={"first_last": "same"})
    eq = q.report["quantized"]["equalized"]
    assert eq["layers"] == ["4"] and eq["plan_chosen_before_equalization"] is True
    fixed = qcore.quantize(tiny_gelu_mlp(), calib, method="uniform", w_bits=4, a_bits=4,
                           options={"first_last": "same"})
    assert "plan_chosen_before_equalization" not in fixed.report["quantized"]["equalized"]
