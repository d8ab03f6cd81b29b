"""Sparse-conv MACs of the embedded detector from the rule book vs kernel volume x active outputs.

    python bench/detection_sparse_bops.py [--calib-size 4] [--batch-size 4] [--seed 0]

Loads ``zoo:voxelnext_lite`` with its calibration batches (synthetic train split), measures every spconv
layer's MACs on the first calibration batch as qcore's pipeline does (``measure_layers``; rule-book neighbour
pairs x C_in x C_out), and prints per layer and in total the fill ratio: rule-book MACs / (kernel volume x
active outputs x C_in x C_out), the count qcore used before. BOPs scale the same way (MACs x w_bits x a_bits).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from qcore import RunConfig, discover_layers, measure_layers
from qcore_detection.spconv_layers import spconv_layer_info
from qcore_detection.zoo import load_zoo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    setup = load_zoo("voxelnext_lite", None, RunConfig(task="detection", calib_size=args.calib_size,
                                                        batch_size=args.batch_size, eval_size=1, seed=args.seed))
    model = setup.model.eval()
    layers = discover_layers(model, spconv_layer_info)
    run = (lambda m: setup.target(m, setup.calibration[0]))  # noqa: E731
    with torch.no_grad():
        measure_layers(model, layers, run)  # rule-book pairs (what qcore's pipeline counts)
        pairs = {n: i.macs for n, i in layers.items()}
        for info in layers.values():  # kernel volume x active outputs, the previous count
            info.count_macs = None
        measure_layers(model, layers, run)
        dense = {n: i.macs for n, i in layers.items()}
    print(f"# {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}; first calibration batch of "
          f"{setup.calibration[0]['batch_size']} scenes ({setup.data['calibration']})")
    print(f"{'layer':44s} {'kind':9s} {'fill':>6s} {'GMAC pairs':>11s} {'GMAC dense':>11s}")
    for name, info in layers.items():
        print(f"{name:44s} {info.kind:9s} {pairs[name] / dense[name]:6.3f} {pairs[name] / 1e9:11.3f} "
              f"{dense[name] / 1e9:11.3f}")
    three_d = [n for n, i in layers.items() if i.kind.endswith("3d")]
    for label, names in (("all spconv layers", list(layers)), ("3-D layers", three_d),
                         ("conv_input + conv1", [n for n in layers if ".conv_input." in n or ".conv1." in n])):
        got, full = sum(pairs[n] for n in names), sum(dense[n] for n in names)
        print(f"{label}: fill {got / full:.3f} ({got / 1e9:.2f} vs {full / 1e9:.2f} GMAC per scene)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
