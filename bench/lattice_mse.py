"""LatticeQ's physical anchor: weight MSE of the lattice code vs the MSE-optimal scalar grid at equal rate
(basis storage included) and vs the Shannon bound, at 2, 3 and 4 bits.

    OMP_NUM_THREADS=1 python bench/lattice_mse.py [--models fmnist_resnet fmnist_vit] [--bits 2 3 4]
        [--steps 20 --restarts 1 --refine 8] [--basis-bits 8] [--dim 2] [--no-select]
        [--tensors NAME ...] [--device cpu] [--json FILE]

Sources: every Conv2d/Linear weight of the zoo models (BatchNorm folded, as ``qcore run`` quantizes them; every
layer, first and last included, at the bench's bit-width), and synthetic Gaussian and Laplacian weights
``[64, 576]`` (a 64->64 3x3 conv) and ``[16, 4608]`` (16 channels as long as a 512->512 3x3 conv's), seed 0.

Per tensor and bit-width ``M`` (per output channel, rows of ``L`` weights):

* **scalar**: the MSE-optimal symmetric per-channel grid with ``M`` bits (core's ``mse_range``; it is the lattice
  with basis ``step * I``, the search's start), rate ``M`` bits per weight (plus the 32-bit scale both pay);
* **lattice**: the ``lattice`` quantizer's n (3 on 3x3 kernel rows, ``--dim`` on 1x1 convs and linear layers, 1
  on the stem and where the basis would cost more than ``--max-overhead`` bits per weight), searched with
  ``lattice-search``'s defaults, including its rate-distortion choice per channel between the searched basis and
  the scalar grid (``--no-select``: every searched basis kept); rate ``M + extra / (C L)`` with ``extra`` the
  tensor's stored basis bits in its layout (``n^2 B`` per channel that keeps a basis, ``B`` = ``--basis-bits``,
  plus a 1-bit flag per channel when scalar and basis channels are mixed: ``LatticeFakeQuant.stored_extra_bits``);
* **scalar @ equal rate**: the scalar grid's distortion at the lattice's rate, interpolated linearly in dB
  between ``M`` and ``M + 1`` bits (both measured);
* **Shannon**: ``D(R) = sigma^2 2^(-2R)`` at the lattice's rate, ``sigma^2`` the mean per-channel variance.

Distortions are in dB relative to ``sigma^2`` (``10 log10(MSE / sigma^2)``, lower is better). "gain" is scalar @
equal rate minus lattice (positive: the lattice wins at equal rate); "shape gain" is the gain at equal *element*
bits (no basis storage), which is what the lattice geometry alone buys.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from qcore_latticeq.quantizer import LatticeFakeQuant, LatticeOptions, LatticeQuantizer
from qcore_latticeq.search import SearchSettings, search_bases

from qcore import LayerInfo, QuantSpec, discover_layers, fold_batchnorm, torch_layer_info
from qcore_classification.loaders import load_zoo


def measure(w: torch.Tensor, info: LayerInfo, bits: int, args: argparse.Namespace) -> dict[str, Any]:
    """Scalar and lattice distortions of one weight at ``bits`` (and the scalar grid at ``bits + 1``)."""
    n = LatticeQuantizer(LatticeOptions(args.dim, args.basis_bits, args.max_overhead)).dim_of(info)
    rows_all = w.detach().float().reshape(w.shape[0], -1)
    length = rows_all.shape[1]
    var = float(rows_all.var(dim=1, unbiased=False).mean())

    def quantizer(b: int) -> LatticeFakeQuant:
        spec = QuantSpec(bits=b, symmetric=True, granularity="channel", quantizer="lattice")
        return LatticeFakeQuant(spec, w.shape[0], 0, n, args.basis_bits).to(w.device)

    def mse(q: LatticeFakeQuant) -> float:
        return float((q(w) - w).pow(2).mean())

    out: dict[str, Any] = {"n": n, "L": length, "sigma2": var}
    with torch.no_grad():
        for b in (bits, bits + 1):
            q = quantizer(b)
            q.fit(q.rows_of(w))
            out[f"scalar_{b}"] = mse(q)
        q = quantizer(bits)
        rows = q.rows_of(w)
        q.fit(rows)
        t0 = time.perf_counter()
        if n > 1:
            basis, _ = search_bases(q, rows, SearchSettings(steps=args.steps, restarts=args.restarts,
                                                             refine=args.refine, seed=0, select=args.select))
            q.set_basis(basis)
        out["search_seconds"] = round(time.perf_counter() - t0, 2)
        out["lattice"] = mse(q)
        out["rows_with_basis"] = int(q.basis_rows().sum())
        out["rows"] = int(q.rows)
    extra = q.stored_extra_bits() / w.numel()
    rate = bits + extra

    def db(x: float) -> float:
        return 10 * math.log10(max(x, 1e-30) / var)

    s0, s1 = db(out[f"scalar_{bits}"]), db(out[f"scalar_{bits + 1}"])
    frac = min(extra, 1.0)  # beyond one extra bit, the M+1 point itself (the lattice is then far behind anyway)
    scalar_eq = s0 + (s1 - s0) * frac
    out.update({"bits": bits, "rate": rate, "scalar_db": s0, "lattice_db": db(out["lattice"]),
                "scalar_eq_db": scalar_eq, "shannon_db": -20 * math.log10(2) * rate,
                "gain_db": scalar_eq - db(out["lattice"]), "shape_gain_db": s0 - db(out["lattice"])})
    return out


def sources(args: argparse.Namespace) -> list[tuple[str, str, torch.Tensor, LayerInfo]]:
    """``(group, name, weight, info)`` for every tensor measured."""
    found = []
    gen = torch.Generator().manual_seed(0)
    for c, length in ((64, 576), (16, 4608)) if args.synthetic else ():
        cin = length // 9
        info = LayerInfo(name=f"{c}x{length}", kind="conv2d", out_channels=c, in_channels=cin, macs_per_out=length,
                         weight_numel=c * length)
        g = torch.randn(c, length, generator=gen)
        lap = torch.distributions.Laplace(0.0, 1.0 / math.sqrt(2)).sample((c, length))
        found.append(("gaussian", f"N(0,1) {c}x{length}", g.reshape(c, cin, 3, 3), info))
        found.append(("laplacian", f"Laplace {c}x{length}", lap.reshape(c, cin, 3, 3), info))
    for name in args.models:
        model = load_zoo(name, None).model.eval()
        fold_batchnorm(model)
        for layer, info in discover_layers(model, torch_layer_info).items():
            if args.tensors is not None and layer not in args.tensors:
                continue
            found.append((name, layer, model.get_submodule(layer).weight.detach(), info))
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["fmnist_resnet", "fmnist_vit"])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--steps", type=int, default=SearchSettings.steps)
    p.add_argument("--restarts", type=int, default=SearchSettings.restarts)
    p.add_argument("--refine", type=int, default=SearchSettings.refine)
    p.add_argument("--basis-bits", type=int, default=8)
    p.add_argument("--dim", type=int, default=LatticeOptions.dim)
    p.add_argument("--max-overhead", type=float, default=LatticeOptions.max_overhead)
    p.add_argument("--no-select", dest="select", action="store_false",
                   help="keep every searched basis (no rate-distortion choice against the scalar grid)")
    p.add_argument("--no-synthetic", dest="synthetic", action="store_false", help="zoo weights only")
    p.add_argument("--tensors", nargs="*", default=None,
                   help="only these zoo layers (e.g. layers.1.conv2 blocks.3.mlp.fc1); synthetic sources unaffected")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for group, name, w, info in sources(args):
        for b in args.bits:
            r = measure(w.to(args.device), info, b, args)
            rows.append({"group": group, "tensor": name, **r})
            print(f"{group} {name} {b} bits: n={r['n']} gain {r['gain_db']:+.2f} dB (shape {r['shape_gain_db']:+.2f}), "
                  f"{r['search_seconds']} s", file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; search steps={args.steps} restarts={args.restarts} "
          f"refine={args.refine}, select={args.select}, basis_bits={args.basis_bits}, dim={args.dim}, "
          f"max_overhead={args.max_overhead}; {time.perf_counter() - t0:.0f} s")
    print("\n| source | bits | tensors | rate (lattice) | scalar dB | lattice dB | scalar @ equal rate dB | "
          "Shannon dB | gain at equal rate | shape gain | lattice wins (equal rate) | channels with a basis |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups = list(dict.fromkeys(r["group"] if r["group"] in ("gaussian", "laplacian") else r["group"]
                                for r in rows))
    for g in groups:
        subsets = sorted({r["tensor"] for r in rows if r["group"] == g}) if g in ("gaussian", "laplacian") else [None]
        for t in subsets:
            for b in args.bits:
                sel = [r for r in rows if r["group"] == g and r["bits"] == b and (t is None or r["tensor"] == t)]
                if not sel:
                    continue

                def avg(k: str, sel: list[dict[str, Any]] = sel) -> float:
                    return sum(r[k] for r in sel) / len(sel)

                wins = sum(r["gain_db"] > 0 for r in sel)
                scalar_only = sum(r["n"] == 1 for r in sel)
                label = t or f"{g}: mean over all {len(sel)} tensors ({scalar_only} kept scalar, gain 0)"
                print(f"| {label} | {b} | {len(sel)} | {avg('rate'):.3f} | "
                      f"{avg('scalar_db'):.2f} | {avg('lattice_db'):.2f} | {avg('scalar_eq_db'):.2f} | "
                      f"{avg('shannon_db'):.2f} | {avg('gain_db'):+.2f} | {avg('shape_gain_db'):+.2f} | "
                      f"{wins}/{len(sel)} | {sum(r['rows_with_basis'] for r in sel)}/{sum(r['rows'] for r in sel)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
