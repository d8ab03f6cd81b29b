"""RDOQ against the uniform baseline at several average bit-widths, on the zoo models, as a Markdown table.

    python bench/rdoq_table.py --out qcore-runs/rdoq-table [--models zoo:fmnist_resnet] [--bits 3 4 5 6]

Per model and bit-width b: uniform W{b}A{b} with min/max activation ranges (the baseline), uniform W{b}A{b}
with MSE activation ranges (what RDOQ uses for activations, so the difference to it is the allocation alone),
and RDOQ at --target-bits b with activations uniform at b bits: first-order curves with the DP and with the
Lagrangian solver, second-order curves with the DP (exact Gauss-Newton, and estimated from one random output
direction per sample), the seed's dead-zone search (``--method rdoq-deadzone``: 10 dead-zone ratios per group and
bit-width, first- or second-order curves; simulation only), and first-order curves for weights *and* activations
(``budget=separate``: weights average b, activations average b, each RD-allocated; ``budget=joint``: one
budget of b bits on average over weight and activation elements together, as in the seed). The two
"+ affine correction" rows add ``-o act_correction=affine`` (each output channel's mean and spread matched
to FP's on the calibration data; deployable) to uniform with MSE ranges and to RDOQ ("rdoq dp + affine
correction" is what ``qcore run --plugin rdoq`` does by default); every other RDOQ row sets
``-o act_correction=none``, so it measures the allocation alone.
Every run: first and last layer pinned at 8 bits (counted in the average), 512 calibration images (the
first 64 for RD curves), the full 10,000-image test split.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

#: RDOQ's own default adds the affine output correction; the rows that measure the allocation alone turn it off.
_ALONE = ["-o", "act_correction=none"]
ROWS = {
    "uniform (minmax)": ["--plugin", "uniform"],
    "uniform (mse)": ["--plugin", "uniform", "--calibrator", "mse", "-o", "weight_range=mse"],
    "rdoq dp": ["--plugin", "rdoq", "-o", "solver=dp", *_ALONE],
    "rdoq lagrangian": ["--plugin", "rdoq", "-o", "solver=lagrangian", *_ALONE],
    "rdoq 2nd-order dp": ["--plugin", "rdoq", "-o", "engine=second-order", *_ALONE],
    "rdoq 2nd-order dp (1 projection)": ["--plugin", "rdoq", "-o", "engine=second-order", "-o", "projections=1",
                                         *_ALONE],
    "rdoq dead-zone dp": ["--method", "rdoq-deadzone", *_ALONE],
    "rdoq dead-zone 2nd-order dp": ["--method", "rdoq-deadzone", "-o", "engine=second-order", *_ALONE],
    "rdoq separate W+A": ["--plugin", "rdoq", "-o", "budget=separate", *_ALONE],
    "rdoq joint W+A": ["--plugin", "rdoq", "-o", "budget=joint", *_ALONE],
    "uniform (mse) + affine correction": ["--plugin", "uniform", "--calibrator", "mse", "-o", "weight_range=mse",
                                          "-o", "act_correction=affine"],
    "rdoq dp + affine correction": ["--plugin", "rdoq", "-o", "act_correction=affine"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("qcore-runs/rdoq-table"))
    p.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet", "zoo:fmnist_vit"])
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--device", default="cpu", help="cpu or cuda (passed to every qcore run)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, device {args.device}, {time.strftime('%Y-%m-%d')}")
    for model in args.models:
        print(f"\n{model}: top-1 % (w_bits_avg / a_bits_avg)\n")
        print("| method | " + " | ".join(f"{b} bits" for b in args.bits) + " |")
        print("|---|" + "---|" * len(args.bits))
        fp = None
        for row in args.rows:
            cells = []
            for b in args.bits:
                tag = row.replace(" ", "_").replace("(", "").replace(")", "")
                out = args.out / f"{model.replace(':', '-')}-{tag}-{b}"
                budget = ["--w-bits", str(b), "--a-bits", str(b)] if row.startswith("uniform") else [
                    "--target-bits", str(b), "--a-bits", str(b)]
                cmd = [sys.executable, "-m", "qcore", "run", "--model", model, *ROWS[row], *budget, "--out", str(out),
                       "--device", args.device]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                r = json.loads((out / "result.json").read_text())
                fp = r["fp"]
                cells.append(f"{r['quant']:.2f} ({r['w_bits_avg']:.2f}/{r['a_bits_avg']:.2f})")
            print(f"| {row} | " + " | ".join(cells) + " |")
        print(f"\nFP top-1: {fp:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
