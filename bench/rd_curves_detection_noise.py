"""How far the projected second-order curves' plan is from the exact curves' plan on a zoo detector, with the
random directions drawn per batch of scenes or per scene, over several seeds.

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 python bench/rd_curves_detection_noise.py --model voxelnext_nuscenes_like \\
        --seeds 0 1 2 [--projections 8 12] [--exact-cache DIR] [--json out.json]

The RDOQ seed's setting (weights of the 3-D sparse convolutions, groups of 16 output channels, bits 2..8,
distortion target the dense BEV features, 4 calibration scenes of the train split, seed 0). The exact curves come
from the replay engine (the reference engine's curves, tests hold them equal). For every seed of the random
directions and both ways of drawing them (``batch``: one set of K directions over the whole batch's target, the
engine before 2026-12-02; ``sample``: K per scene, what ``qcore run`` does through the detection task's ``split``),
(``batch`` only at the smallest ``--projections``) the script prints the estimate / exact ratio over all curve
entries and the *plan excess*: the exact distortion
(sum of the exact curves, RDOQ's additive model) of the DP plan chosen from the estimated curves at 3 and 4
average bits, relative to the exact optimum (the plan chosen from the exact curves). No evaluation of mAP: that is
bench/detection_table.py's job. ``--exact-cache`` reads the exact curves from a curve-cache entry that ``qcore run
-o engine=replay`` wrote on the same model, setting and scenes (its first ``--scenes`` calibration scenes) instead
of measuring them again (~4 min on the loaded 2-core VM). ``--tiles half quadrant`` adds the directions drawn per
half / quadrant of every scene (``qcore run -o curve_tiles=2`` / ``4``) at every ``--projections``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from qcore import measure_layers
from qcore.knapsack import solve_dp
from qcore_detection.spconv_layers import spconv_cpu_guard, spconv_layer_info
from qcore_detection.synthetic import SyntheticSplit
from qcore_detection.voxelize import collate
from qcore_detection.zoo import MODELS, load_detector, make_target, scene_tiles
from qcore_rdoq.cache import decode_entry
from qcore_rdoq.curves import first_order_curves
from qcore_rdoq.groups import weight_groups
from qcore_rdoq.second_order import projected_curve_set

THREE_D = ("backbone.conv_input.*", "backbone.conv[1-6].*")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="voxelnext_nuscenes_like", choices=list(MODELS))
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--projections", type=int, nargs="+", default=[8])
    p.add_argument("--exact-cache", type=Path, default=None,
                   help="read the exact curves from this rdoq curve-cache entry folder (one .rdc file per layer, as "
                        "qcore run -o engine=replay wrote them for this model, setting and data) instead of "
                        "measuring them with the replay engine")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--targets", type=float, nargs="+", default=[3.0, 4.0])
    p.add_argument("--tiles", nargs="*", choices=("half", "quadrant"), default=[],
                   help="also draw the directions per half / quadrant of every scene (qcore run -o curve_tiles=2 / 4)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model, record = load_detector(MODELS[args.model])
    vcfg = record["voxel_config"]
    scenes = SyntheticSplit("train", args.scenes, seed=0, world=str(record.get("world", "classic")))
    whole = [collate([scenes[i] for i in range(args.scenes)], vcfg)]
    per_scene = [collate([scenes[i]], vcfg) for i in range(args.scenes)]
    count = {"half": 2, "quadrant": 4}
    per_tile = {d: [{**collate([t], vcfg), "curve_tiles": count[d]} for i in range(args.scenes)
                    for t in scene_tiles(scenes[i], count[d])] for d in args.tiles}
    fwd = make_target("bev")
    layers = {n: spconv_layer_info(m, n) for n, m in model.named_modules()
              if spconv_layer_info(m, n) is not None and any(fnmatch.fnmatch(n, pat) for pat in THREE_D)}
    measure_layers(model, layers, lambda m: fwd(m, whole[0]))
    bits = list(range(2, 9))
    t0 = time.perf_counter()
    groups = [g for n in layers for g in weight_groups(layers[n], args.group)]
    if args.exact_cache is not None:
        exact_dist = np.concatenate([decode_entry((args.exact_cache / f"{n}.rdc").read_bytes(),
                                                  (len(weight_groups(layers[n], args.group)), len(bits)))
                                     for n in layers])
    else:
        exact_dist = first_order_curves(model, fwd, whole, layers, args.group, bits, "replay").dist
    t_exact = time.perf_counter() - t0
    print(f"exact (replay) curves, {exact_dist.shape[0]} groups x {len(bits)} bits: {t_exact:.1f} s"
          f"{' (read from the cache)' if args.exact_cache else ''}", flush=True)
    sizes = np.array([(g.stop - g.start) * model.get_submodule(g.layer).weight[0].numel()  # weights per group
                      for g in groups], dtype=np.float64)
    rates = np.array(bits, dtype=np.float64)

    def exact_distortion(dist: np.ndarray, target: float) -> float:
        choice = solve_dp(sizes, dist, rates, target * sizes.sum()).choice
        return float(exact_dist[np.arange(len(choice)), choice].sum())

    optimum = {t: exact_distortion(exact_dist, t) for t in args.targets}
    out: dict = {"model": args.model, "groups": int(exact_dist.shape[0]), "bits": bits, "scenes": args.scenes,
                 "projections": args.projections, "exact_seconds": round(t_exact, 1),
                 "machine": f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
                 "runs": []}
    settings = [("batch", k) for k in args.projections if k == min(args.projections)]
    settings += [("sample", k) for k in args.projections]
    settings += [(d, k) for d in args.tiles for k in args.projections]
    for directions, k in settings:
        batches = whole if directions == "batch" else per_scene if directions == "sample" else per_tile[directions]
        for seed in args.seeds:
            t0 = time.perf_counter()
            est = projected_curve_set(model, fwd, batches, layers, args.group, bits, [0.0], k,
                                      seed=seed, grad_context=lambda: spconv_cpu_guard("cpu"))[0]
            seconds = time.perf_counter() - t0
            ratio = est.dist / exact_dist
            excess = {t: exact_distortion(est.dist, t) / optimum[t] - 1 for t in args.targets}
            run = {"directions": directions, "projections": k, "seed": seed, "seconds": round(seconds, 1),
                   "ratio_median_5_95": [float(np.median(ratio)), *map(float, np.percentile(ratio, [5, 95]))],
                   "plan_excess": {str(t): round(float(e), 4) for t, e in excess.items()}}
            out["runs"].append(run)
            lo, hi = np.percentile(ratio, [5, 95])
            print(f"directions per {directions}, {k} projections, seed {seed}: {seconds:.1f} s; estimate / exact "
                  f"median {np.median(ratio):.2f} (5-95 % {lo:.2f}-{hi:.2f}); plan excess "
                  + ", ".join(f"{t:g} bits {100 * e:+.1f} %" for t, e in excess.items()), flush=True)
    for directions, k in settings:
        runs = [r for r in out["runs"] if r["directions"] == directions and r["projections"] == k]
        print(f"per {directions}, {k} projections: mean time {np.mean([r['seconds'] for r in runs]):.1f} s; "
              "mean plan excess " +
              ", ".join(f"{t:g} bits {100 * np.mean([r['plan_excess'][str(t)] for r in runs]):.1f} %"
                        for t in args.targets))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
