"""RD-curve engines on the embedded LiDAR detector (zoo:voxelnext_lite), timed in one run, interleaved.

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 python bench/rd_curves_detection.py --projections 8 [--json out.json]
    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 python bench/rd_curves_detection.py --model voxelnext_nuscenes_like

``--model voxelnext_nuscenes_like`` does the same on the nuScenes-like detector (18 3-D sparse convolutions, 30
groups of 16 output channels, 210 candidates; calibration scenes from its world's train split); the default
reference layers exist in both models.

The RDOQ seed's setting: weights of the 30 3-D sparse convolutions, groups of 16 output channels (95 groups),
bits 2..8, distortion target the dense BEV features after the backbone, 4 calibration scenes of the synthetic
train split (seed 0: what ``qcore run --task detection --plugin rdoq -o curve_samples=4`` measures on). The
reference engine reruns the whole detector per candidate, so its cost per candidate does not depend on the
layer: it is timed on the candidates of ``--ref-layers`` (twice, before and after the second-order engine, to
bracket the machine's load) and extrapolated to all 665 candidates. The replay engine is timed on the same
layers (its cost depends on how much of the network follows the layer: an early and a late layer by default),
and its curves are compared with the reference's. The second-order engine (``projections`` random directions of
the whole target, one backward pass each) runs on all 30 layers; its curves are compared with the reference's
on the subset. Its directions are drawn per scene (``--directions sample``, the default, as ``qcore run`` does
through the detection task's ``split``: each scene one forward pass and K backward passes) or over the batch of
all the scenes at once (``--directions batch``, the engine before 2026-12-02: the cross terms between scenes
add noise at the same cost), or per half / quadrant of every scene (``--directions half`` / ``quadrant``, what
``qcore run -o curve_tiles=2`` / ``4`` does: the cross terms between a scene's tiles drop out as well).
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
from qcore_detection.spconv_layers import spconv_cpu_guard, spconv_layer_info
from qcore_detection.synthetic import SyntheticSplit
from qcore_detection.voxelize import collate
from qcore_detection.zoo import MODELS, load_detector, make_target, scene_tiles
from qcore_rdoq.curves import first_order_curves
from qcore_rdoq.groups import weight_groups
from qcore_rdoq.second_order import projected_curve_set

THREE_D = ("backbone.conv_input.*", "backbone.conv[1-6].*")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--bits", type=int, nargs=2, default=(2, 8))
    p.add_argument("--projections", type=int, nargs="+", default=[8])
    p.add_argument("--ref-layers", nargs="+", default=["backbone.conv1.0.conv2", "backbone.conv5.1.conv1"])
    p.add_argument("--directions", nargs="+", choices=("sample", "batch", "half", "quadrant"), default=["sample"],
                   help="one or more of: "
                        "second-order random directions per scene (what qcore run does through the task's split), "
                        "per batch of all the scenes (before 2026-12-02), or per half / quadrant of every scene "
                        "(qcore run -o curve_tiles=2 / 4)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", default="voxelnext_lite", choices=list(MODELS), help="zoo detector (--model zoo:NAME)")
    args = p.parse_args()
    model, record = load_detector(MODELS[args.model])
    scenes = SyntheticSplit("train", args.scenes, seed=0, world=str(record.get("world", "classic")))
    batches = [collate([scenes[i] for i in range(args.scenes)], record["voxel_config"])]
    tiles = {"sample": 1, "half": 2, "quadrant": 4}
    # a tile carries its count, as the task's split gives it: its BEV target is then on the scene's scale
    so_batches = {d: [{**collate([t], record["voxel_config"]), "curve_tiles": tiles[d]} for i in range(args.scenes)
                      for t in scene_tiles(scenes[i], tiles[d])] if d in tiles else batches for d in args.directions}
    fwd = make_target("bev")
    layers = {n: spconv_layer_info(m, n) for n, m in model.named_modules()
              if spconv_layer_info(m, n) is not None and any(fnmatch.fnmatch(n, pat) for pat in THREE_D)}
    measure_layers(model, layers, lambda m: fwd(m, batches[0]))
    bits = list(range(args.bits[0], args.bits[1] + 1))
    groups = sum(len(weight_groups(i, args.group)) for i in layers.values())
    subset = {n: layers[n] for n in args.ref_layers}
    sub_cands = sum(len(weight_groups(i, args.group)) for i in subset.values()) * len(bits)
    out: dict = {"model": args.model, "directions": args.directions,
                 "layers": len(layers), "groups": groups, "bits": bits, "candidates": groups * len(bits),
                 "subset": args.ref_layers, "subset_candidates": sub_cands, "scenes": args.scenes,
                 "machine": f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"}

    def timed(fn):  # noqa: ANN001, ANN202
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        return res, time.perf_counter() - t0, time.process_time() - c0

    ref1, t_ref1, c_ref1 = timed(lambda: first_order_curves(model, fwd, batches, subset, args.group, bits,
                                                            "reference"))
    print(f"reference, {sub_cands} candidates: {t_ref1:.1f} s (CPU {c_ref1:.1f} s)", flush=True)
    gn = {}
    for d, k in ((d, k) for d in args.directions for k in args.projections):
        curves, t, cpu = timed(lambda k=k, d=d: projected_curve_set(
            model, fwd, so_batches[d], layers, args.group, bits, [0.0], k,
            grad_context=lambda: spconv_cpu_guard("cpu"))[0])
        gn[d, k] = (curves, t, cpu)
        out[f"second_order_{d}_{k}_seconds"] = round(t, 1)
        out[f"second_order_{d}_{k}_cpu_seconds"] = round(cpu, 1)
        print(f"second-order, directions per {d}, {k} projections, all {len(layers)} layers: {t:.1f} s "
              f"(CPU {cpu:.1f} s)", flush=True)
    ref2, t_ref2, c_ref2 = timed(lambda: first_order_curves(model, fwd, batches, subset, args.group, bits,
                                                            "reference"))
    print(f"reference again: {t_ref2:.1f} s (CPU {c_ref2:.1f} s)", flush=True)
    rep, t_rep, c_rep = timed(lambda: first_order_curves(model, fwd, batches, subset, args.group, bits, "replay"))
    print(f"replay, same {sub_cands} candidates: {t_rep:.1f} s (CPU {c_rep:.1f} s)", flush=True)
    per_cand = (t_ref1 + t_ref2) / 2 / sub_cands
    ref_total = per_cand * groups * len(bits)
    # CPU time (this process's, one thread) as well as wall: on a shared machine the wall ratio moves with the
    # load between the timed stretches; the CPU-time ratio is what the engines cost on an idle machine
    cpu_per_cand = (c_ref1 + c_ref2) / 2 / sub_cands
    cpu_ref_total = cpu_per_cand * groups * len(bits)
    rel = np.abs(rep.dist - ref1.dist) / ref1.dist
    out |= {"reference_subset_seconds": [round(t_ref1, 1), round(t_ref2, 1)],
            "reference_per_candidate_s": round(per_cand, 3), "reference_all_extrapolated_s": round(ref_total, 1),
            "reference_subset_cpu_seconds": [round(c_ref1, 1), round(c_ref2, 1)],
            "reference_per_candidate_cpu_s": round(cpu_per_cand, 3),
            "reference_all_extrapolated_cpu_s": round(cpu_ref_total, 1),
            "replay_subset_seconds": round(t_rep, 1), "replay_subset_cpu_seconds": round(c_rep, 1),
            "replay_vs_reference_subset": round(t_ref1 / t_rep, 2),
            "replay_max_rel_diff": float(rel.max()),
            "reference_repeat_max_rel_diff": float((np.abs(ref2.dist - ref1.dist) / ref1.dist).max())}
    print(f"reference per candidate {per_cand:.2f} s (CPU {cpu_per_cand:.2f} s) -> all {groups * len(bits)} "
          f"candidates ~{ref_total:.0f} s (CPU ~{cpu_ref_total:.0f} s); "
          f"replay {t_ref1 / t_rep:.2f}x on the subset, max rel. diff to reference {rel.max():.2e}")
    names = list(layers)
    for (d, k), (curves, t, cpu) in gn.items():
        at, rows = 0, []
        for n in names:
            ng = len(weight_groups(layers[n], args.group))
            if n in subset:
                rows.append(curves.dist[at:at + ng])
            at += ng
        ratio = np.concatenate(rows) / ref1.dist
        out[f"second_order_{d}_{k}_vs_reference"] = round(ref_total / t, 1)
        out[f"second_order_{d}_{k}_vs_reference_cpu"] = round(cpu_ref_total / cpu, 1)
        out[f"second_order_{d}_{k}_ratio_to_measured"] = [float(np.median(ratio)), float(np.percentile(ratio, 5)),
                                                      float(np.percentile(ratio, 95))]
        print(f"second-order ({d}, {k} projections) {ref_total / t:.1f}x the extrapolated reference in wall time, "
              f"{cpu_ref_total / cpu:.1f}x in CPU time; estimate / measured "
              f"on the subset: median {np.median(ratio):.2f}, 5-95 % {np.percentile(ratio, 5):.2f}-"
              f"{np.percentile(ratio, 95):.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
