"""Size of packed low-bit weights on disk and in memory against FP, for the zoo models (issue 17, kernel 5).

    OMP_NUM_THREADS=1 python bench/packed_size.py [--models zoo:fmnist_resnet zoo:fmnist_vit]
        [--settings W4 W3 W2 rdoq4] [--out DIR]

Each cell is one in-process ``qcore run`` (512 embedded train-split calibration images, seed 0; only 256 test
images are evaluated: this script measures sizes, not accuracy). ``W4``/``W3``/``W2``: ``--plugin uniform
--w-bits B --a-bits 8`` (per-channel symmetric weights; first and last layer at 8 bits, the default);
``rdoq4``: ``--plugin rdoq --target-bits 4 --a-bits 8`` (RDOQ's mixed plan: 0..10 bits per group of 8 output
channels, first/last at 8). The quantized model is saved twice with :meth:`qcore.Quantized.save`: as floats
(``packed=False``) and with packed weights (``packed=True``); the packed file is loaded back with
:func:`qcore.load` and must give the saved model's outputs bit for bit on a calibration batch.

Columns:

* ``FP weights``: bytes of the float32 Conv2d/Linear weights (what the codes replace; BN folded);
* ``file (float)`` / ``file (packed)``: the two ``.qcore`` files on disk (both also hold biases, quantizer ranges,
  activation parameters and the metadata);
* ``codes``: bytes of the packed codes in memory (:func:`qcore.packing.packed_nbytes` per layer) and
  ``+ scales``: plus one float32 scale and zero point per output channel: what a packed layer holds in memory
  instead of its float32 weight; ``ratio`` = FP weights / (codes + scales);
* ``mem float`` / ``mem packed``: measured in memory, the bytes of every parameter and buffer of the model that
  :func:`qcore.load` returns (``packed=False`` / ``packed=True``: packed layers hold their uint8 codes and per-row
  parameters instead of a float weight, :func:`qcore.packing.pack_layers`), and in brackets the weights alone
  (float weights of the quantized layers / their ``packed_*`` buffers and any float weight left).
  ``outputs same`` also requires the in-memory packed model's outputs to equal the float model's bit for bit.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import qcore
from qcore import RunConfig, load_host, packing, quant_layers, run

SETTINGS = {"W4": ("uniform", 4), "W3": ("uniform", 3), "W2": ("uniform", 2), "rdoq4": ("rdoq", 4)}


def tensor_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every parameter and buffer of ``model``, bytes of its quantized layers' weights: float weights
    or packed codes plus per-row parameters)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    weights = 0
    for layer in quant_layers(model).values():
        w = layer.module.weight
        held = [w] if w is not None else [b for n, b in layer.named_buffers(recurse=False) if n.startswith("packed_")]
        weights += sum(t.numel() * t.element_size() for t in held)
    return total, weights


def cell(host: Any, model: str, setting: str, out: Path) -> dict[str, Any]:
    """Run one setting, save it both ways, check the packed file, return the sizes."""
    plugin, bits = SETTINGS[setting]
    cfg = RunConfig(plugin=plugin, model=model, a_bits=8, eval_size=256,
                    **({"w_bits": bits} if plugin == "uniform" else {"target_bits": float(bits)}))
    t0 = time.perf_counter()
    outcome = run(cfg, host)
    q = qcore.Quantized(model=outcome.model, plan=outcome.plan, report=outcome.result, outcome=outcome)
    name = f"{model.split(':')[-1]}_{setting}"
    fp_file = q.save(out / f"{name}.qcore")
    pk_file = q.save(out / f"{name}.packed.qcore", packed=True)
    layers = quant_layers(q.model)
    fp_weights = sum(4 * layer.module.weight.numel() for layer in layers.values())
    codes = scales = 0
    for layer in layers.values():
        w, wq = layer.module.weight, layer.weight_quantizer
        rows = w.shape[wq.axis]
        codes += packing.packed_nbytes(wq.bits.expand(rows), w.numel() // rows)
        scales += 2 * 4 * rows
    assert outcome.fp_model is not None
    loaded = qcore.load(pk_file, outcome.fp_model, host=host)
    assert outcome.ctx is not None
    x = outcome.ctx.task.example
    x = x[0] if isinstance(x, (tuple, list)) else x
    in_memory = qcore.load(pk_file, outcome.fp_model, host=host, packed=True)
    with torch.no_grad():
        same = torch.equal(loaded(x).view(torch.int32), q.model(x).view(torch.int32))
        same = same and torch.equal(in_memory(x).view(torch.int32), q.model(x).view(torch.int32))
    if not same:
        raise SystemExit(f"{name}: the packed file does not reproduce the model's outputs")
    return {"model": model, "setting": setting, "w_bits_avg": outcome.result["w_bits_avg"], "fp_weights": fp_weights,
            "file_fp": fp_file.stat().st_size, "file_packed": pk_file.stat().st_size, "codes": codes,
            "scales": scales, "same": same,
            "mem_fp": tensor_bytes(loaded), "mem_packed": tensor_bytes(in_memory), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet", "zoo:fmnist_vit"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=None, help="where the .qcore files go (default: a temporary folder)")
    args = ap.parse_args()
    host = load_host()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}")
        print("| model | setting | W avg bits | FP weights KiB | file float KiB | file packed KiB | codes KiB "
              "| codes + scales KiB | ratio | mem float KiB (weights) | mem packed KiB (weights) | outputs same | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for model in args.models:
            for setting in args.settings:
                r = cell(host, model, setting, out)
                kib = {k: r[k] / 1024 for k in ("fp_weights", "file_fp", "file_packed", "codes", "scales")}
                print(f"| {model} | {setting} | {r['w_bits_avg']:.2f} | {kib['fp_weights']:.1f} | "
                      f"{kib['file_fp']:.1f} | {kib['file_packed']:.1f} | {kib['codes']:.1f} | "
                      f"{kib['codes'] + kib['scales']:.1f} | "
                      f"{r['fp_weights'] / (r['codes'] + r['scales']):.2f}x | "
                      f"{r['mem_fp'][0] / 1024:.1f} ({r['mem_fp'][1] / 1024:.1f}) | "
                      f"{r['mem_packed'][0] / 1024:.1f} ({r['mem_packed'][1] / 1024:.1f}) | "
                      f"{'yes' if r['same'] else 'NO'} | "
                      f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
