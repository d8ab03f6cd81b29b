"""Time RD-curve generation with each engine on a zoo model and compare the curves, in one run.

    python bench/rd_curves.py --model fmnist_resnet --device cpu --samples 64 --group 8
    python bench/rd_curves.py --model tv:resnet50 --device cuda --engines reference fast --samples 32 --group 64

The second line is issue 17's GPU target (fast engine >= 20x the reference on a ResNet-50-size model); no GPU
number has been measured yet (see BENCHMARKS.md).

Prints one line per engine (seconds, candidates, candidates/s) and the largest relative difference between
the reference and fast curves, per entry (where the reference distortion is above 1e-12) and relative to each
curve's largest value (entries far below a curve's scale sit at the fp32 noise floor of the logits). The model is the
zoo model with BatchNorm folded, as ``qcore run`` sees it; all Conv/Linear layers are measured (no pins).

``--projections 0 1`` measures the second-order engine exact (0) and with 1 random output direction per sample.
``--deadzones 10`` measures every engine on the seed's dead-zone search (10 ratios per group and bit-width).
It also prints the FLOP ceiling of the fast engine: conv/linear FLOPs of the reference (a whole forward per
candidate) over those of the fast engine (the candidate's rows of the layer, then the downstream part), summed
over all candidates; on a compute-bound machine the fast engine cannot beat the reference by more than that.
``--repeat 3`` times every engine three times and keeps the fastest of each (``timeit``'s rule: the minimum is
the run least disturbed by the rest of the machine); the spread is printed and kept in the JSON.
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

# E402: the imports below need the src folders put on sys.path above (runs from a source checkout)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qcore import discover_layers, fold_batchnorm, measure_layers, torch_layer_info  # noqa: E402
from qcore_classification.data import load_data  # noqa: E402
from qcore_classification.loaders import load_zoo  # noqa: E402
from qcore_rdoq.curves import FastEngine, first_order_curves  # noqa: E402
from qcore_rdoq.groups import weight_groups  # noqa: E402
from qcore_rdoq.second_order import second_order_curve_set  # noqa: E402


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def fast_flop_ceiling(model, batch, layers, group: int) -> float:
    """Reference FLOPs / fast-engine FLOPs over every candidate (one candidate per group and bit-width)."""
    eng = FastEngine(model, lambda m, b: m(b), [batch])
    full = _flops(lambda: model(batch))
    ref = fast = 0
    for name, info in layers.items():
        n = len(weight_groups(info, group))
        split = eng.split(name)
        x, needed = split.capture(batch)
        module = model.get_submodule(name)
        y = module(x)
        layer = _flops(lambda m=module, x=x: m(x))
        down = _flops(lambda s=split, y=y, v=needed: s.run(y, v))
        ref += n * full
        fast += n * (down + layer * group / info.out_channels)  # only the group's output channels are computed
    return ref / fast


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist_resnet",
                   help="a zoo model (fmnist_resnet, fmnist_vit) or tv:ARCH, a torchvision architecture with seeded "
                        "random weights and Gaussian inputs (e.g. tv:resnet50 for issue 17's GPU target: timing "
                        "and fast-vs-reference agreement need no trained weights)")
    p.add_argument("--input-size", type=int, default=224, help="input side for tv: models (default 224)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64, help="curve calibration samples")
    p.add_argument("--batch", type=int, default=64, help="calibration batch size")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--chunk", type=int, default=0, help="candidates per pass; 0 = auto")
    p.add_argument("--engines", nargs="*", default=["reference", "fast", "second-order"],
                   choices=["reference", "fast", "second-order"])
    p.add_argument("--projections", nargs="+", type=int, default=[0, 1],
                   help="second-order runs: 0 = exact, K = K random output directions per sample")
    p.add_argument("--deadzones", type=int, default=1, help="dead-zone ratios per group and bit (seed: 10)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time every engine this many times and report the fastest (a shared VM's speed varies "
                        "by tens of percent between runs; short runs suffer most)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    dev = torch.device(args.device)
    if args.model.startswith("tv:"):  # a torchvision architecture, seeded random weights, Gaussian inputs
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, args.model[3:])(weights=None).eval()
        fold_batchnorm(model)
        model.to(dev)
        x = torch.randn(args.samples, 3, args.input_size, args.input_size)
        batches = [b.to(dev) for b in x.split(args.batch)]
    else:
        loaded = load_zoo(args.model, None)
        model = loaded.model.eval()
        fold_batchnorm(model)
        model.to(dev)
        data = load_data(None, loaded.input, args.samples, 1, args.batch, seed=0)
        batches = [b.to(dev) for b in data.calibration]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    fwd = lambda m, b: m(b)  # noqa: E731
    bits = list(range(0, 11))
    ratios = [i / args.deadzones for i in range(args.deadzones)]
    results, curves_by = {}, {}

    def curves(eng: str, bs: list, ls: dict, bits: list[int], k: int = 0) -> np.ndarray:
        """All ratios' curves side by side, ``[groups, ratios * bits]``."""
        if eng == "second-order":
            per = second_order_curve_set(model, bs, ls, args.group, bits, ratios, projections=k)
        else:
            per = [first_order_curves(model, fwd, bs, ls, args.group, bits, eng, args.chunk, deadzone=r)
                   for r in ratios]
        assert all(c.engine == eng for c in per), "an engine fell back"
        return np.concatenate([c.dist for c in per], axis=1)

    runs = [(e, 0) for e in args.engines if e != "second-order"]
    runs += [("second-order", k) for k in args.projections] if "second-order" in args.engines else []
    for eng, k in runs:
        label = eng if eng != "second-order" or not k else f"second-order ({k} proj.)"
        curves(eng, batches[:1], dict(list(layers.items())[:1]), [4], k)  # warm-up
        times = []
        for _ in range(args.repeat):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            c = curves(eng, batches, layers, bits, k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = min(times)
        curves_by[label] = c
        n = c.size
        results[label] = {"seconds": dt, "all_seconds": times, "candidates": n, "per_second": n / dt}
        spread = f" (of {', '.join(f'{t:.2f}' for t in times)})" if len(times) > 1 else ""
        print(f"{label:>22}: {dt:8.2f} s for {n} candidates ({n / dt:8.1f}/s){spread}")
    if "reference" in curves_by and "fast" in curves_by:
        ref, fast = curves_by["reference"], curves_by["fast"]
        mask = ref > 1e-12
        rel = float(np.max(np.abs(fast[mask] - ref[mask]) / ref[mask]))
        speed = results["reference"]["seconds"] / results["fast"]["seconds"]
        curve_rel = float(np.max(np.abs(fast - ref).max(axis=1) / np.maximum(ref.max(axis=1), 1e-30)))
        results["max_rel_diff_fast_vs_reference"] = rel
        results["max_curve_rel_diff"] = curve_rel
        results["speedup_fast_vs_reference"] = speed
        print(f"max relative difference fast vs reference: {rel:.2e} per entry, {curve_rel:.2e} relative to each "
              f"curve's largest value; speed-up {speed:.1f}x")
    for label in [k for k in curves_by if k.startswith("second-order")]:
        if "reference" not in curves_by:
            break
        speed = results["reference"]["seconds"] / results[label]["seconds"]
        ref, so = curves_by["reference"], curves_by[label]
        ratio = so[ref > 1e-12] / ref[ref > 1e-12]
        results[label] |= {"speedup_vs_reference": speed, "median_ratio_to_reference": float(np.median(ratio)),
                           "p5_p95_ratio_to_reference": [float(np.percentile(ratio, 5)),
                                                         float(np.percentile(ratio, 95))]}
        print(f"{label}: speed-up {speed:.1f}x over reference; its estimates / the measured curves: median "
              f"{np.median(ratio):.3f}, 5-95 % {np.percentile(ratio, 5):.2f}-{np.percentile(ratio, 95):.2f} (an "
              "approximation, compared by accuracy in bench/rdoq_table.py)")
    ceiling = fast_flop_ceiling(model, batches[0], layers, args.group)
    results["fast_flop_ceiling"] = ceiling
    print(f"fast engine FLOP ceiling (reference conv/linear FLOPs / fast FLOPs): {ceiling:.1f}x")
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"model {args.model} (BN folded, {len(layers)} layers, group {args.group}, bits 0..10, "
          f"{args.deadzones} dead-zone ratio(s)), "
          f"{sum(b.shape[0] for b in batches)} samples, {machine}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "machine": machine,
                                         "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
