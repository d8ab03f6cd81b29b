"""Time activation RD curves: first-order (fast engine) against second-order (Gauss-Newton, one backward pass
per output), on both zoo models, and compare the curves.

    python bench/act_curves_time.py [--models fmnist_resnet fmnist_vit] [--samples 64]

Every Conv/Linear input (per tensor, affine, MSE clip), 2..10 bits, BN folded, CPU.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn

from qcore import discover_layers, fold_batchnorm, measure_layers, torch_layer_info
from qcore_classification.data import load_data
from qcore_classification.loaders import load_zoo
from qcore_rdoq.act_curves import activation_curves, second_order_activation_curves


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fmnist_resnet", "fmnist_vit"])
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    bits = list(range(2, 11))
    for name in args.models:
        loaded = load_zoo(name, None)
        model = loaded.model.eval()
        fold_batchnorm(model)
        batches = list(load_data(None, loaded.input, args.samples, 1, args.samples, seed=0).calibration)
        layers = discover_layers(model, torch_layer_info)
        measure_layers(model, layers, lambda m, b=batches: m(b[0]))
        first, t_first = activation_curves(model, forward, batches, layers, bits, "fast")
        second, t_second = second_order_activation_curves(model, forward, batches, layers, bits)
        ratio = second / np.maximum(first, 1e-30)
        print(f"{name}: {len(layers)} layers x {len(bits)} bits; first-order fast {t_first:.2f} s, second-order "
              f"{t_second:.2f} s ({t_first / t_second:.1f}x); 2nd/1st ratio median {np.median(ratio):.3f}, "
              f"at 8 bits median {np.median(ratio[:, bits.index(8)]):.3f}, min {ratio.min():.3f}, "
              f"max {ratio.max():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
