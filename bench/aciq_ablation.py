"""The ACIQ ablation (the seed's table) on qcore's zoo models: uniform, each ACIQ ingredient alone, all
combined, and the deployable per-tensor-activation variants, at W4A4, W3A3, W4A8 and W8A4.

    python bench/aciq_ablation.py [--models zoo:fmnist_resnet zoo:fmnist_vit] [--bits W4A4 W3A3 W4A8 W8A4]
                                  [--device cpu|cuda] [--json FILE]

Every cell is one in-process ``qcore run`` (512 embedded train-split calibration images, seed 0; the full
10,000-image Fashion-MNIST test split). First and last layer at 8 bits (weights and inputs), BN folded,
inputs of every conv/linear quantized; residual sums, pooling, attention matmuls and softmax are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from qcore import RunConfig, load_host, run

#: (row label, deployable, run settings): every row runs the plugin ``aciq`` (affine per-channel weights)
#: with the components and options given here.
ROWS: list[tuple[str, bool, dict[str, Any]]] = [
    ("uniform (per-channel A, min/max)", False,
     {"calibrator": "minmax", "allocator": "fixed", "options": {"weight_correction": "none"}}),
    ("ACIQ clipping", False, {"allocator": "fixed", "options": {"weight_correction": "none"}}),
    ("bit alloc A", False, {"calibrator": "minmax", "options": {"alloc_weights": False, "weight_correction": "none"}}),
    ("bit alloc W", False, {"calibrator": "minmax", "options": {"alloc_acts": False, "weight_correction": "none"}}),
    ("bias correction W", False, {"calibrator": "minmax", "allocator": "fixed", "options": {}}),
    ("all combined (`--plugin aciq`)", False, {"options": {}}),
    ("uniform (per-tensor A, min/max)", True,
     {"calibrator": "minmax", "allocator": "fixed",
      "options": {"weight_correction": "none", "act_granularity": "tensor"}}),
    ("ACIQ clip + alloc W + bias corr, per-tensor A", True,
     {"options": {"act_granularity": "tensor", "alloc_acts": False}}),
    # the deployable uniform baseline with the same weight correction as the row above (like for like)
    ("bias correction W, per-tensor A", True,
     {"calibrator": "minmax", "allocator": "fixed", "options": {"act_granularity": "tensor"}}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet", "zoo:fmnist_vit"])
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3", "W4A8", "W8A4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS],
                   help="run only these rows (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = p.parse_args()
    host = load_host()
    results: list[dict[str, Any]] = []
    for model in args.models:
        for bits in args.bits:
            m = re.fullmatch(r"W(\d+)A(\d+)", bits)
            if not m:
                p.error(f"--bits {bits}: use the form W4A4")
            w, a = int(m.group(1)), int(m.group(2))
            for label, deployable, settings in ROWS:
                if label not in args.rows:
                    continue
                cfg = RunConfig(plugin="aciq", model=model, w_bits=w, a_bits=a, device=args.device,
                                calibrator=settings.get("calibrator"), allocator=settings.get("allocator"),
                                options=dict(settings["options"]))
                t0 = time.perf_counter()
                r = run(cfg, host).result
                results.append({"model": model, "bits": bits, "row": label, "deployable": deployable,
                                "fp": r["fp"], "quant": r["quant"], "w_bits_avg": r["w_bits_avg"],
                                "a_bits_avg": r["a_bits_avg"], "seconds": round(time.perf_counter() - t0, 1)})
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for model in args.models:
        sub = [r for r in results if r["model"] == model]
        print(f"\n{model} (FP top-1 {sub[0]['fp']:.2f})\n")
        print("| row | deployable | " + " | ".join(args.bits) + " |")
        print("|---|---|" + "---|" * len(args.bits))
        for label, deployable, _ in ROWS:
            if label not in args.rows:
                continue
            cells = [next(r for r in sub if r["row"] == label and r["bits"] == b) for b in args.bits]
            print(f"| {label} | {'yes' if deployable else 'no'} | "
                  + " | ".join(f"{c['quant']:.2f} ({c['w_bits_avg']:.2f}/{c['a_bits_avg']:.2f})" for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
