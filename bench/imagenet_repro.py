"""Reproduce the BRECQ / QDrop ImageNet settings with qcore's real pipeline and put the published numbers beside them.

For users who have ImageNet (an ImageNet-style folder: ``train/`` and ``val/``, one sub-folder per class) and the
torchvision weights of ResNet-18 and MobileNetV2::

    python bench/imagenet_repro.py --data /imagenet --weights-dir /ckpt --device cuda --out qcore-runs/repro
    python bench/imagenet_repro.py --data /imagenet --weights-dir /ckpt --methods qdrop --settings r18-w4a4
    # a quick smoke run: few steps, few images
    python bench/imagenet_repro.py --data /imagenet --weights-dir /ckpt --iters 200 --calib-size 256 --eval-size 5000

``--weights-dir`` holds ``resnet18.pth`` and ``mobilenet_v2.pth`` (state dicts of torchvision's ``resnet18`` and
``mobilenet_v2``). Without it, qcore asks torchvision for its pretrained (``DEFAULT``) weights, which are
downloaded when the network allows it (and the run fails with a message when it does not).

Every row is one ``qcore run`` (the exact command is in the table) with the papers' settings: ``--plugin qdrop`` or
``--plugin brecq``, ``-o iters=20000`` steps per block (``--iters``; BRECQ adds iters/4 activation steps) at the
papers' AdaRound rate ``-o round_lr=0.001`` (the methods' own default, 0.005, is sized for 300 steps), 1024
calibration images from ``train/`` (``--calib-size``), reconstruction batch 32, first and last layer at 8 bits,
evaluation on ``val/`` (``--eval-size N``: the first N images). AdaRound's lambda is 0.1 for MobileNetV2: qcore-recon
sets it for every block holding a depthwise convolution. Settings:

    r18-w4a4  r18-w2a4  r18-w3a3  (ResNet-18)      mbv2-w4a4  mbv2-w2a4  (MobileNetV2)

The table (``OUT/results.md``, rewritten after every row, also printed) has each row's command, FP and quantized
top-1, wall time and the published numbers (``shared/methods/brecq_qdrop.md``). **The published numbers used
BRECQ's own checkpoints** (ResNet-18 FP 71.08; QDrop's notes 71.06), not torchvision's (ResNet-18 69.76): compare
the drop from FP, not the absolute top-1. qcore also differs in details (no calibration augmentation, MSE initial
ranges, activation placement; plugins/recon/README.md). At 20,000 steps per block the papers' code needs roughly
0.5-1.5 GPU-hours for ResNet-18 (an estimate from the method notes; qcore has not timed it on a GPU).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: setting -> (torchvision model, weight bits, activation bits)
SETTINGS = {
    "r18-w4a4": ("resnet18", 4, 4),
    "r18-w2a4": ("resnet18", 2, 4),
    "r18-w3a3": ("resnet18", 3, 3),
    "mbv2-w4a4": ("mobilenet_v2", 4, 4),
    "mbv2-w2a4": ("mobilenet_v2", 2, 4),
}
DEFAULT_SETTINGS = ["r18-w4a4", "r18-w2a4", "r18-w3a3", "mbv2-w4a4"]
METHODS = ["qdrop", "brecq"]

#: published top-1 (BRECQ's checkpoints), from shared/methods/brecq_qdrop.md sections 3-4
PUBLISHED = {
    ("brecq", "r18-w4a4"): "69.60 (paper)",
    ("brecq", "r18-w2a4"): "64.80 (paper)",
    ("qdrop", "r18-w4a4"): "69.10 (paper) / 69.13 (README)",
    ("qdrop", "r18-w2a4"): "64.66 (paper) / 64.38 (README)",
    ("qdrop", "r18-w3a3"): "65.56 (paper) / 65.68 (README)",
    ("qdrop", "mbv2-w4a4"): "67.83 (README)",
    ("qdrop", "mbv2-w2a4"): "54.29 (README)",
}
PUBLISHED_FP = {"resnet18": "71.08 (BRECQ ckpt; torchvision 69.76)"}
NOT_PUBLISHED = "not in the notes"


def command(args: argparse.Namespace, method: str, setting: str, out: Path) -> list[str]:
    """The ``qcore run`` command of one row."""
    model, w, a = SETTINGS[setting]
    cmd = ["qcore", "run", "--plugin", method, "--model", f"tv:{model}", "--data", str(args.data),
           "--w-bits", str(w), "--a-bits", str(a), "-o", f"iters={args.iters}", "-o", "round_lr=0.001",
           "-o", "recon_batch=32", "-o", "first_last=8", "--calib-size", str(args.calib_size), "--seed", str(args.seed)]
    if args.weights_dir is not None:
        cmd += ["--weights", str(args.weights_dir / f"{model}.pth")]
    if args.eval_size is not None:
        cmd += ["--eval-size", str(args.eval_size)]
    if args.input_size is not None:
        cmd += ["--input-size", str(args.input_size)]
    if args.device:
        cmd += ["--device", args.device]
    return cmd + ["--out", str(out)]


def write_table(path: Path, args: argparse.Namespace, argv: list[str], rows: list[dict]) -> str:
    lines = [
        "# BRECQ / QDrop ImageNet reproduction with qcore",
        "",
        f"`{shlex.join(['python', 'bench/imagenet_repro.py', *argv])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M')}; weights: "
        + (str(args.weights_dir) if args.weights_dir else "torchvision DEFAULT (downloaded)")
        + f"; {args.iters} steps per block, {args.calib_size} calibration images, evaluation on "
        + (f"the first {args.eval_size} val images" if args.eval_size else "all val images") + ".",
        "",
        "Published numbers used BRECQ's own checkpoints (ResNet-18 FP 71.08), torchvision's ResNet-18 is 69.76: "
        "compare the drop from FP.",
        "",
        "| method | setting | command | FP top-1 | top-1 | published top-1 | published FP | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r.get("top1") is not None else "failed"
        fp = f"{r['fp']:.2f}" if r.get("fp") is not None else "-"
        lines.append(f"| {r['method']} | {r['setting']} | `{r['command']}` | {fp} | {top1} | {r['published']} | "
                     f"{PUBLISHED_FP.get(SETTINGS[r['setting']][0], NOT_PUBLISHED)} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ImageNet-style folder with train/ and val/")
    p.add_argument("--weights-dir", type=Path, help="folder with resnet18.pth and mobilenet_v2.pth (state dicts); "
                   "default: torchvision's pretrained download")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS)
    p.add_argument("--iters", type=int, default=20000, help="reconstruction steps per block (papers: 20000)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from train/ (papers: 1024)")
    p.add_argument("--eval-size", type=int, help="evaluate on the first N val images (default: all)")
    p.add_argument("--input-size", type=int, help="input resolution (default: the model's, 224)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: qcore's, cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("qcore-runs/imagenet-repro"),
                   help="folder for the runs and results.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "results.md"
    rows: list[dict] = []
    failed = 0
    for setting in args.settings:
        for method in args.methods:
            run_dir = args.out / f"{method}-{setting}"
            cmd = command(args, method, setting, run_dir)
            print(f"[imagenet_repro] {shlex.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "qcore", *cmd[1:]])
            row = {"method": method, "setting": setting, "command": shlex.join(cmd),
                   "seconds": time.perf_counter() - t0,
                   "published": PUBLISHED.get((method, setting), NOT_PUBLISHED)}
            result = run_dir / "result.json"
            if proc.returncode == 0 and result.exists():
                r = json.loads(result.read_text())
                row["top1"], row["fp"] = r["quant"], r["fp"]
            else:
                failed += 1
                print(f"[imagenet_repro] failed (exit {proc.returncode}): {method} {setting}", file=sys.stderr)
            rows.append(row)
            text = write_table(table, args, argv, rows)
    print(text)
    print(f"[imagenet_repro] table: {table}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
