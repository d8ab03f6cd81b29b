"""OMPQ against baselines through the same ILP and the same reconstruction, at equal average weight bits.

    OMP_NUM_THREADS=1 python bench/ompq_table.py [--models zoo:fmnist_resnet] [--wbits 3 4] [--abits 4 8]
        [--recon qdrop mse] [--jsonl bench/ompq_rows.jsonl] [--table-only]

For each model, activation bits A and weight bits W:

1. ``uniform``: every free layer at W bits (``--plugin qdrop --w-bits W``: the fixed allocator); its element-weighted
   mean weight bits (first/last layer at 8 included) is the target T of every other row, so all rows spend the same
   weight bits (never more than uniform);
2. ``ompq`` (orthogonality, the default: beta chosen on calibration data; ``ompq-beta1``: beta fixed at 1, the
   seed's CLI default), ``size`` (every layer equally important: same objective without ORM),
   ``hawq`` (Hessian trace x weight error), ``rdoq-sum`` (RDOQ's RD curves summed per layer, qcore-rdoq's
   ``layer_curves``): ``--plugin ompq --target-bits T -o criterion=...``;
3. ``rdoq``: RDOQ's own allocator (bits per channel group) at T, ``-o act_correction=none``, the same grids.

Each row is run with reconstruction (``--calibrator qdrop``, qcore-recon's 300 steps per block) and without
(``--calibrator mse``: MSE ranges, round to nearest). 512 embedded train-split calibration images (seed 0), the
10,000-image Fashion-MNIST test split; weights per channel affine, activations per tensor affine at A bits, first
and last layer (weights and inputs) at 8 bits, BN folded; deployable (integer grids). Each finished row is appended
to ``--jsonl`` at once; a re-run skips the rows already there, then prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from qcore import RunConfig, load_host, run

CRITERIA = ["ompq", "size", "hawq", "rdoq-sum"]


def _key(model: str, a: int, w: int, row: str, recon: str, seed: int = 0) -> str:
    return f"{model}|A{a}|W{w}|{row}|{recon}" + (f"|seed{seed}" if seed else "")


def _run(host: Any, row: str, model: str, a: int, w: int, target: float | None, recon: str,
         seed: int = 0) -> dict[str, Any]:
    common = dict(model=model, a_bits=a, calibrator=recon, seed=seed)
    if row == "uniform":
        # ompq reconstructs at the qdrop calibrator's 1e-3; the qdrop method defaults to 0.005: use ompq's rate
        opts = {"round_lr": 0.001} if recon in ("qdrop", "brecq", "adaround") else {}
        cfg = RunConfig(plugin="qdrop", w_bits=w, options=opts, **common)
    elif row == "rdoq":
        cfg = RunConfig(plugin="rdoq", target_bits=target,
                        options={"act_correction": "none", "weight_symmetric": False}, **common)
    else:
        crit = {"ompq": "orm", "rdoq-sum": "rdoq", "ompq-beta1": "orm"}.get(row, row)
        opts: dict[str, Any] = {"criterion": crit}
        if row == "ompq-beta1":  # the fixed beta = 1 (the seed's CLI default) instead of the calibration-chosen one
            opts["ompq_beta"] = 1.0
        cfg = RunConfig(plugin="ompq", target_bits=target, options=opts, **common)
    t0 = time.perf_counter()
    c0 = time.process_time()
    r = run(cfg, host).result
    om = r.get("measured", {}).get("ompq", {})
    return {"model": model, "a_bits": a, "w": w, "row": row, "recon": recon, "fp": r["fp"], "quant": r["quant"],
            "w_bits_avg": r["w_bits_avg"], "a_bits_avg": r["a_bits_avg"], "size_mb": r["size_mb"],
            "bops_g": r["bops"] / 1e9, "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1), "seed": seed, "beta": om.get("beta"),
            "beta_scores": dict(zip(map(str, om["beta_search"]["grid"]), om["beta_search"]["scores"], strict=True))
            if "beta_search" in om else None,
            "search_seconds": om.get("search_seconds"), "bits": om.get("bits"), "date": time.strftime("%Y-%m-%d")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet"])
    p.add_argument("--wbits", nargs="+", type=int, default=[3, 4])
    p.add_argument("--abits", nargs="+", type=int, default=[4])
    p.add_argument("--recon", nargs="+", default=["qdrop", "mse"])
    p.add_argument("--rows", nargs="+", default=["uniform", *CRITERIA, "rdoq"])
    p.add_argument("--jsonl", type=Path, default=Path("bench/ompq_rows.jsonl"))
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (calibration images, QDrop draws)")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    done: dict[str, dict[str, Any]] = {}
    if args.jsonl.exists():
        for line in args.jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[_key(r["model"], r["a_bits"], r["w"], r["row"], r["recon"], r.get("seed", 0))] = r
    if not args.table_only:
        host = load_host()
        # cheapest evidence first: uniform and ompq with the first calibrator, then every row with the others,
        # then the remaining rows (a run cut short still has the comparisons that matter most)
        first, rest = args.recon[0], args.recon[1:]
        phases = [(first, [r for r in args.rows if r in ("uniform", "ompq")]), *[(r, args.rows) for r in rest],
                  (first, args.rows)]
        for model in args.models:
            for a in args.abits:
                for recon, rows in phases:
                    for w in args.wbits:
                        uk = _key(model, a, w, "uniform", recon, args.seed)
                        if uk not in done:
                            done[uk] = _run(host, "uniform", model, a, w, None, recon, args.seed)
                            with args.jsonl.open("a") as f:
                                f.write(json.dumps(done[uk]) + "\n")
                        target = done[uk]["w_bits_avg"]
                        for row in rows:
                            k = _key(model, a, w, row, recon, args.seed)
                            if row == "uniform" or k in done:
                                continue
                            done[k] = _run(host, row, model, a, w, target, recon, args.seed)
                            with args.jsonl.open("a") as f:
                                f.write(json.dumps(done[k]) + "\n")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for model in args.models:
        for a in args.abits:
            sub = [r for r in done.values()
                   if r["model"] == model and r["a_bits"] == a and r.get("seed", 0) == args.seed]
            if not sub:
                continue
            print(f"\n{model} (FP top-1 {sub[0]['fp']:.2f}), A{a}\n")
            print("| allocator | recon | " + " | ".join(f"W{w}: top-1 (bits, MiB, G BOPs)" for w in args.wbits)
                  + " | search s |")
            print("|---|---|" + "---|" * len(args.wbits) + "---|")
            for recon in args.recon:
                for row in args.rows:
                    cells = []
                    search = []
                    for w in args.wbits:
                        r = done.get(_key(model, a, w, row, recon, args.seed))
                        cells.append("-" if r is None else
                                     f"{r['quant']:.2f} ({r['w_bits_avg']:.3f}, {r['size_mb']:.4f}, {r['bops_g']:.3f})")
                        if r is not None and r.get("search_seconds") is not None:
                            search.append(f"{r['search_seconds']:.1f}")
                    print(f"| {row} | {recon} | " + " | ".join(cells) + f" | {'/'.join(search) or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
