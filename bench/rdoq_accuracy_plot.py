"""Accuracy against average weight bits for RDOQ and the uniform baseline over several targets, as a PNG
(the third RDOQ plot; the other two come with every run: ``qcore run --plugin rdoq -o plots=true``).

    python bench/rdoq_accuracy_plot.py --out bench/figures/rdoq_resnet_accuracy.png [--model zoo:fmnist_resnet]
                                       [--bits 3 4 5 6] [--device cpu]

Each point is one in-process ``qcore run``: uniform ``--w-bits b --a-bits b`` and rdoq ``--target-bits b
--a-bits b -o act_correction=none`` (the allocation alone, as in BENCHMARKS.md's tables; defaults otherwise:
first/last layer 8 bits counted in the average, per-tensor activations, 512 calibration images, the full test
split). Needs matplotlib (``pip install qcore-rdoq[plots]``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from qcore import RunConfig, load_host, run
from qcore_rdoq.plots import png, pyplot


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--model", default="zoo:fmnist_resnet")
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    host = load_host()
    series: dict[str, list[tuple[float, float]]] = {"uniform": [], "rdoq": []}
    fp = None
    for b in args.bits:
        for name in series:
            budget: dict = {"w_bits": b} if name == "uniform" else {
                "target_bits": float(b), "options": {"act_correction": "none"}}
            r = run(RunConfig(plugin=name, model=args.model, a_bits=b, device=args.device, **budget), host).result
            series[name].append((r["w_bits_avg"], r["quant"]))
            fp = r["fp"]
            print(f"{name} b={b}: {r['quant']:.2f} at {r['w_bits_avg']:.2f} weight bits", flush=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{name} (W b, A b)")
    ax.axhline(fp, color="gray", ls="--", label=f"FP {fp:.2f}")
    ax.set_xlabel("average weight bits (first/last layer at 8 included)")
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{args.model}: accuracy against bits ({platform.machine()}, {time.strftime('%Y-%m-%d')})")
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png(fig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
