"""Run the uniform baseline on the zoo models at several bit-widths and print a Markdown table.

    python bench/baseline_table.py --out qcore-runs/baseline [--models zoo:fmnist_resnet zoo:fmnist_vit]

Each cell is one ``qcore run`` (default calibration: 512 embedded train-split images, seed 0; evaluation:
the full 10,000-image Fashion-MNIST test split). The table is what BENCHMARKS.md records.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BITS = [(8, 8), (4, 8), (4, 4)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("qcore-runs/baseline"))
    p.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet", "zoo:fmnist_vit"])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for every qcore run")
    args = p.parse_args()
    rows = []
    for model in args.models:
        for w, a in BITS:
            out = args.out / f"{model.replace(':', '-')}-w{w}a{a}"
            cmd = [sys.executable, "-m", "qcore", "run", "--plugin", "uniform", "--model", model,
                   "--w-bits", str(w), "--a-bits", str(a), "--out", str(out), *args.extra]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            r = json.loads((out / "result.json").read_text())
            rows.append((model, f"W{w}A{a}", r))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| model | bits (first/last 8) | FP top-1 | quant top-1 | delta | W avg | A avg | size MiB (FP) | "
          "GBOPs (FP) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, bits, r in rows:
        print(f"| {model} | {bits} | {r['fp']:.2f} | {r['quant']:.2f} | {r['quant'] - r['fp']:+.2f} | "
              f"{r['w_bits_avg']:.2f} | {r['a_bits_avg']:.2f} | {r['size_mb']:.3f} ({r['fp_size_mb']:.3f}) | "
              f"{r['bops'] / 1e9:.2f} ({r['fp_bops'] / 1e9:.1f}) | {sum(r['seconds'].values()):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
