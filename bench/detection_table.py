"""Quantization of the embedded LiDAR detector (zoo:voxelnext_lite) on the fixed synthetic validation split:
uniform at several bit-widths and RDOQ at a 4-bit average on the weights of all 3-D sparse convolutions (the
RDOQ seed's setting), as a Markdown table.

    python bench/detection_table.py [--eval-size 100] [--calib-size 16] [--rows ...] [--resamples 1000]

Every cell is one in-process ``qcore run --task detection`` (CPU; spconv's CPU path runs single-threaded). Each
quantized model and the FP model then predict the evaluation scenes once more, and every difference (against FP,
and for the PAIRS below) gets a 95 % paired-bootstrap interval over scenes
(:func:`qcore_detection.metric.paired_bootstrap`); a difference whose interval contains 0 is printed as a tie.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from qcore import RunConfig, load_host, module_device, run
from qcore_detection.metric import paired_bootstrap
from qcore_detection.synthetic import SyntheticSplit
from qcore_detection.train import predict
from qcore_detection.zoo import MODELS, VAL_SEED, load_detector

THREE_D = "backbone.conv_input.*,backbone.conv[1-6].*"
ROWS: dict[str, dict[str, Any]] = {
    "uniform W8A8 (all 42 spconv layers)": {"plugin": "uniform", "w_bits": 8, "a_bits": 8},
    "uniform W4A8 (all 42, first/last 8)": {"plugin": "uniform", "w_bits": 4, "a_bits": 8},
    "uniform W4A4 (all 42, first/last 8)": {"plugin": "uniform", "w_bits": 4, "a_bits": 4},
    "aciq W4A4 (all 42, first/last 8; per-channel A, simulation)": {"plugin": "aciq", "w_bits": 4, "a_bits": 4},
    "uniform W4, 30 3-D convs, weights only": {
        "plugin": "uniform", "w_bits": 4, "a_bits": 8,
        "options": {"include": THREE_D, "act_targets": "none", "first_last": "same"}},
    "rdoq 4-bit average, 30 3-D convs, weights only": {
        "plugin": "rdoq", "target_bits": 4.0,
        "options": {"include": THREE_D, "act_targets": "none", "first_last": "same", "engine": "reference",
                    "curve_samples": 4, "group": 16, "min_bits": 2, "max_bits": 8, "act_correction": "none"}},
    "uniform W3, 30 3-D convs, weights only": {
        "plugin": "uniform", "w_bits": 3, "a_bits": 8,
        "options": {"include": THREE_D, "act_targets": "none", "first_last": "same"}},
    "rdoq 3-bit average, 30 3-D convs, weights only": {
        "plugin": "rdoq", "target_bits": 3.0,
        "options": {"include": THREE_D, "act_targets": "none", "first_last": "same", "engine": "reference",
                    "curve_samples": 4, "group": 16, "min_bits": 2, "max_bits": 8, "act_correction": "none"}},
}

#: method comparisons at the same setting (the first row minus the second), besides every row against FP
PAIRS = [
    ("aciq W4A4 (all 42, first/last 8; per-channel A, simulation)", "uniform W4A4 (all 42, first/last 8)"),
    ("rdoq 4-bit average, 30 3-D convs, weights only", "uniform W4, 30 3-D convs, weights only"),
    ("rdoq 3-bit average, 30 3-D convs, weights only", "uniform W3, 30 3-D convs, weights only"),
]


def _verdict(ci: Any) -> str:
    return f"{ci} {'tie' if ci.tie else 'differs'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--resamples", type=int, default=1000, help="paired-bootstrap resamples of the scenes")
    args = p.parse_args()
    host = load_host()
    _, record = load_detector(MODELS["voxelnext_lite"])
    vcfg, classes = record["voxel_config"], record["class_names"]
    val = list(SyntheticSplit("val", args.eval_size, seed=VAL_SEED))  # the task's evaluation scenes
    out = []
    preds: dict[str, list[dict[str, Any]]] = {}
    gts: list[dict[str, Any]] = []
    for label in args.rows:
        spec = dict(ROWS[label])
        cfg = RunConfig(task="detection", eval_size=args.eval_size, calib_size=args.calib_size,
                        options=dict(spec.pop("options", {})), **spec)
        t0 = time.perf_counter()
        outcome = run(cfg, host)
        r = outcome.result
        if not preds and outcome.fp_model is not None:
            preds["FP"], gts = predict(outcome.fp_model, val, vcfg, 4, module_device(outcome.fp_model))
        preds[label], _ = predict(outcome.model, val, vcfg, 4, module_device(outcome.model))
        out.append({"row": label, "fp": r["fp_metrics"], "quant": r["quant_metrics"], "w_bits_avg": r["w_bits_avg"],
                    "a_bits_avg": r["a_bits_avg"], "seconds": round(time.perf_counter() - t0, 1),
                    "stages": r["seconds"]})
        print(f"done {label}: {r['quant']:.2f} (FP {r['fp']:.2f}) in {out[-1]['seconds']} s", flush=True)
        if args.json:  # after every row, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(out, indent=1))
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {args.eval_size} val scenes, {args.calib_size} calibration scenes\n")
    print("| run | mAP | vs FP: difference [95 % interval] | AP car | AP pedestrian | AP cyclist | W avg | A avg | "
          "seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    fp = out[0]["fp"]
    print(f"| FP | {fp['mAP']:.2f} | | {fp['AP/car']:.2f} | {fp['AP/pedestrian']:.2f} | {fp['AP/cyclist']:.2f} | "
          "32 | 32 | |")
    for o in out:
        q = o["quant"]
        ci = paired_bootstrap(preds[o["row"]], preds["FP"], gts, classes, resamples=args.resamples)
        o["vs_fp"] = ci.__dict__
        ab = "-" if o["a_bits_avg"] is None else f"{o['a_bits_avg']:.2f}"
        print(f"| {o['row']} | {q['mAP']:.2f} | {_verdict(ci)} | {q['AP/car']:.2f} | {q['AP/pedestrian']:.2f} | "
              f"{q['AP/cyclist']:.2f} | {o['w_bits_avg']:.2f} | {ab} | {o['seconds']:.0f} |")
    print("\n| comparison (first minus second) | difference [95 % interval] |\n|---|---|")
    for a, b in PAIRS:
        if a in preds and b in preds:
            ci = paired_bootstrap(preds[a], preds[b], gts, classes, resamples=args.resamples)
            print(f"| {a} vs {b} | {_verdict(ci)} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
