"""Time RD-curve generation with each engine on a zoo model and compare the curves, in one run.

    python bench/rd_curves.py --model fmnist_resnet --device cpu --samples 64 --group 8

Prints one line per engine (seconds, candidates, candidates/s) and the largest relative difference between
the reference and fast curves, per entry (where the reference distortion is above 1e-12) and relative to each
curve's largest value (entries far below a curve's scale sit at the fp32 noise floor of the logits). The model is the
zoo model with BatchNorm folded, as ``qcore run`` sees it; all Conv/Linear layers are measured (no pins).
Runs from a source checkout (no install needed): the packages' src folders are put on sys.path.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for src in ("core/src", "classification/src", "plugins/rdoq/src"):
    sys.path.insert(0, str(ROOT / src))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qcore.fold import fold_batchnorm  # noqa: E402
from qcore.layers import discover, measure_layers, torch_layer_info  # noqa: E402
from qcore_classification.data import load_data  # noqa: E402
from qcore_classification.loaders import load_zoo  # noqa: E402
from qcore_rdoq.curves import first_order_curves  # noqa: E402
from qcore_rdoq.second_order import second_order_curves  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist_resnet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64, help="curve calibration samples")
    p.add_argument("--batch", type=int, default=64, help="calibration batch size")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--chunk", type=int, default=0, help="candidates per pass; 0 = auto")
    p.add_argument("--engines", nargs="+", default=["reference", "fast", "second-order"],
                   choices=["reference", "fast", "second-order"])
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    dev = torch.device(args.device)
    loaded = load_zoo(args.model, None)
    model = loaded.model.eval()
    fold_batchnorm(model)
    model.to(dev)
    data = load_data(None, loaded.input, args.samples, 1, args.batch, seed=0)
    batches = [b.to(dev) for b in data.calibration]
    layers = discover(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    fwd = lambda m, b: m(b)  # noqa: E731
    bits = list(range(0, 11))
    results, curves_by = {}, {}
    def curves(eng: str, bs: list, ls: dict, bits: list[int]):
        if eng == "second-order":
            return second_order_curves(model, bs, ls, args.group, bits)
        return first_order_curves(model, fwd, bs, ls, args.group, bits, eng, args.chunk)

    for eng in args.engines:
        curves(eng, batches[:1], dict(list(layers.items())[:1]), [4])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = curves(eng, batches, layers, bits)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        curves_by[eng] = c
        n = c.dist.size
        results[eng] = {"seconds": dt, "candidates": n, "per_second": n / dt, "engine_used": c.engine}
        print(f"{eng:>10}: {dt:8.2f} s for {n} candidates ({n / dt:8.1f}/s), engine used: {c.engine}")
    if "reference" in curves_by and "fast" in curves_by:
        ref, fast = curves_by["reference"].dist, curves_by["fast"].dist
        mask = ref > 1e-12
        rel = float(np.max(np.abs(fast[mask] - ref[mask]) / ref[mask]))
        speed = results["reference"]["seconds"] / results["fast"]["seconds"]
        curve_rel = float(np.max(np.abs(fast - ref).max(axis=1) / np.maximum(ref.max(axis=1), 1e-30)))
        results["max_rel_diff_fast_vs_reference"] = rel
        results["max_curve_rel_diff"] = curve_rel
        results["speedup_fast_vs_reference"] = speed
        print(f"max relative difference fast vs reference: {rel:.2e} per entry, {curve_rel:.2e} relative to each "
              f"curve's largest value; speed-up {speed:.1f}x")
    if "reference" in curves_by and "second-order" in curves_by:
        speed = results["reference"]["seconds"] / results["second-order"]["seconds"]
        ref, so = curves_by["reference"].dist, curves_by["second-order"].dist
        ratio = np.median(so[ref > 1e-12] / ref[ref > 1e-12])
        results["speedup_second_order_vs_reference"] = speed
        results["median_ratio_second_order_to_reference"] = float(ratio)
        print(f"second-order: speed-up {speed:.1f}x over reference; median ratio of its estimates to the measured "
              f"curves {ratio:.3f} (an approximation, compared by accuracy in bench/rdoq_table.py)")
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"model {args.model} (BN folded, {len(layers)} layers, group {args.group}, bits 0..10), "
          f"{sum(b.shape[0] for b in batches)} samples, {machine}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "machine": machine,
                                         "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
