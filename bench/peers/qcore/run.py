"""qcore's same-setting rows of the peer comparison, through the Python API (``qcore.quantize``) in qcore's own
venv, on exactly the tensors the peers get (``common.load_data``) and timed the same way (``quantize`` =
calibration seconds, then the same evaluation loop).

What is quantized (every row): weights of every Conv2d/Linear, BN folded, per output channel; the input of each of
those layers per tensor, affine; first and last layer (weights and input) at 8 bits; residual additions, pooling,
LayerNorm, attention matmuls and softmax not quantized. qcore's default input equalization (``equalize=gelu``) is on
in every row: on the ViT it moves per-channel scales from the six GELU-fed ``fc2`` inputs into their weights (one
float multiply per input element at run time); the convnets have no GELU, so it changes nothing there. Deployable
(integer grids, per-tensor activation scales) except where a row says simulated.

Run in qcore's venv: ``python bench/peers/qcore/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import qcore  # noqa: E402

BASE = {
    "first_last": "8-bit (W8A8)",
    "residual_adds": "not quantized",
    "weights": "per-channel symmetric (min/max)",
    "activations": "per-tensor affine, inputs of every Conv/Linear; equalize=gelu (default: ViT fc2 inputs only)",
    "deployable": "deployable (integer grid, per-tensor A)",
}


def _row(method: str, label: str, w_bits: int | None, a_bits: int | None, bits: tuple[int, int],
         options: dict[str, Any] | None = None, calibrator: str | None = None, **describe: str) -> common.Row:
    def quantize(model: torch.nn.Module, data: common.Data):
        kw: dict[str, Any] = {"w_bits": w_bits, "a_bits": a_bits}
        if w_bits is None:
            kw = {"target_bits": 4.0, "a_bits": a_bits}
        return qcore.quantize(model, data.calib, method, options=options or {}, batch_size=64, seed=common.SEED,
                              calibrator=calibrator, **kw).model
    return common.Row(label, bits[0], bits[1], quantize, {**BASE, **describe})


AFFINE = {"act_correction": "affine"}
_RDOQ_W = "per group of 8 channels, 3-6 bits (avg 4), symmetric, MSE ranges"


def _low_bit_rows(a_bits: int) -> list[common.Row]:
    """qcore's rows at 4-bit weights and ``a_bits``-bit activations: every method with and without the affine
    output correction (ACIQ's per-channel-activation default only at A4, where it was the headline number)."""
    bits = (4, a_bits)
    rows = [
        _row("uniform", "uniform", 4, a_bits, bits),
        _row("uniform", "uniform + affine correction", 4, a_bits, bits, AFFINE),
        _row("uniform", "uniform, MSE ranges", 4, a_bits, bits, {"weight_range": "mse"}, calibrator="mse",
             weights="per-channel symmetric (MSE range search)",
             activations="per-tensor affine (MSE range search), inputs of every Conv/Linear; equalize=gelu "
                         "(default: ViT fc2 inputs only)"),
        _row("aciq", "aciq (per-tensor A, alloc W, bias corr)", 4, a_bits, bits,
             {"act_granularity": "tensor", "alloc_acts": False},
             weights="per-channel affine, ACIQ clip, per-channel bits (avg 4)",
             deployable="integer grids, per-tensor A; mixed W bits per channel"),
        _row("aciq", "aciq (per-tensor A) + affine correction", 4, a_bits, bits,
             {"act_granularity": "tensor", "alloc_acts": False, **AFFINE},
             weights="per-channel affine, ACIQ clip, per-channel bits (avg 4)",
             deployable="integer grids, per-tensor A; mixed W bits per channel"),
        _row("rdoq", "rdoq (default: affine correction)", None, a_bits, bits, {}, weights=_RDOQ_W,
             deployable="simulated (mixed bits per channel group)"),
        _row("rdoq", "rdoq, no correction", None, a_bits, bits, {"act_correction": "none"}, weights=_RDOQ_W,
             deployable="simulated (mixed bits per channel group)"),
        _row("qdrop", "qdrop (300 steps/block)", 4, a_bits, bits, {"cache": "off"},
             weights="per-channel affine, MSE init, AdaRound"),
        _row("qdrop", "qdrop + affine correction", 4, a_bits, bits, {"cache": "off", **AFFINE},
             weights="per-channel affine, MSE init, AdaRound"),
        _row("brecq", "brecq (300+75 steps/block)", 4, a_bits, bits, {"cache": "off"},
             weights="per-channel affine, MSE init, AdaRound"),
    ]
    if a_bits == 4:
        rows.insert(4, _row("aciq", "aciq (default, per-channel A)", 4, 4, bits, {},
                            weights="per-channel affine, ACIQ clip, per-channel bits (avg 4)",
                            activations="per-CHANNEL affine, per-channel bits (avg 4)",
                            deployable="simulated (per-channel A)"))
    return rows


ROWS = [_row("uniform", "uniform", 8, 8, (8, 8)), *_low_bit_rows(8), *_low_bit_rows(4)]

if __name__ == "__main__":
    common.run_rows("qcore", getattr(qcore, "__version__", "0.1.0"), ROWS)
