"""PTMQ (one multi-bit model) vs QDrop (one model per setting) vs uniform, on a zoo model.

    python bench/ptmq_table.py [--model zoo:fmnist_resnet] [--bits 3 4 6 8] [--iters 300] [--out DIR]

Runs, each as the ``qcore`` command line (so every number has its exact command):

* ``qcore run --plugin ptmq -o iters=N`` once, then ``qcore eval model.qcore --w-bits B --a-bits B`` per setting
  (the same file, switched; nothing recalibrated);
* ``qcore run --plugin qdrop --w-bits B --a-bits B -o iters=N`` per setting (a separate calibration each);
* ``qcore run --plugin uniform --w-bits B --a-bits B`` per setting.

Every run: 512 embedded train-split calibration images, seed 0, the full 10,000-image Fashion-MNIST test split;
first and last layer (weights and inputs) at 8 bits, BN folded, the inputs of every conv/linear quantized per tensor
(affine), weights per output channel (affine for ptmq/qdrop), the inputs of GELU-fed layers equalized (qcore's and
ptmq's default ``-o equalize=gelu``; none on the ResNet); deployable integer grids (simulated). Finished runs
are kept under ``--out`` and skipped when the script is run again (a killed table resumes). Prints a Markdown table
(top-1 and calibration seconds) and writes ``table.json`` and ``table.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QCORE = [sys.executable, "-m", "qcore"]


def _run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Run ``qcore ...``; its stdout, and the wall seconds."""
    env = {**os.environ, "QCORE_PROGRESS": "0"}
    t0 = time.perf_counter()
    p = subprocess.run(QCORE + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    log.write_text(f"$ qcore {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    if p.returncode != 0:
        raise SystemExit(f"qcore {' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p.stdout, wall


def qcore_run(out: Path, args: list[str]) -> dict[str, Any]:
    """``qcore run ARGS --out OUT`` unless OUT/result.json exists; the result plus its command and wall time."""
    res = out / "result.json"
    cmd = ["run", *args, "--out", str(out)]
    if not res.is_file():
        _, wall = _run(cmd, out.with_suffix(".log"))
        (out / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    result = json.loads(res.read_text())
    wall_file = out / "wall_seconds.txt"
    result["wall_seconds"] = float(wall_file.read_text()) if wall_file.is_file() else None
    result["command"] = "qcore " + " ".join(cmd)
    return result


def qcore_eval(path: Path, bits: int, cache: Path) -> dict[str, Any]:
    """``qcore eval PATH --w-bits B --a-bits B`` (kept in ``cache``)."""
    cmd = ["eval", str(path), "--w-bits", str(bits), "--a-bits", str(bits)]
    if not cache.is_file():
        stdout, wall = _run(cmd, cache.with_suffix(".log"))
        got = json.loads(stdout)
        got["wall_seconds"] = round(wall, 1)
        cache.write_text(json.dumps(got, indent=1))
    got = json.loads(cache.read_text())
    got["command"] = "qcore " + " ".join(cmd)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:fmnist_resnet")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6, 8])
    ap.add_argument("--iters", type=int, default=300, help="reconstruction steps per block (ptmq and qdrop)")
    ap.add_argument("--out", type=Path, default=Path("qcore-runs/ptmq-table"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["uniform", "qdrop", "ptmq"], help="rows to leave out")
    ap.add_argument("--ptmq-variant", action="append", default=[], metavar="KEY=VALUE",
                    help="add a second ptmq row run with these -o options (repeatable), e.g. low_bits=3,4")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tag = a.model.replace(":", "-")
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    cal: dict[str, float] = {}
    fp = None
    cache = ["-o", f"cache={a.out / 'recon-cache'}"]
    ptmq_rows = [("ptmq", [])] if "ptmq" not in a.skip else []
    if a.ptmq_variant:
        ptmq_rows.append(("ptmq " + " ".join(a.ptmq_variant), [x for kv in a.ptmq_variant for x in ("-o", kv)]))
    for row, opts in ptmq_rows:
        run_dir = a.out / (f"ptmq-{tag}" + "".join("-" + kv.replace("=", "").replace(",", "") for kv in opts[1::2]))
        r = qcore_run(run_dir, ["--plugin", "ptmq", "--model", a.model, "-o", f"iters={a.iters}", *cache, *opts])
        fp = r["fp"]
        cal[row] = r["seconds"]["calibrate"]
        rows[row] = {}
        for b in a.bits:
            e = qcore_eval(run_dir / "model.qcore", b, run_dir.with_name(f"{run_dir.name}-eval-w{b}a{b}.json"))
            rows[row][b] = {"top1": e["quant"], "command": e["command"], "seconds": e["seconds"]}
        rows[row]["run"] = {"command": r["command"], "quant_w4a4_in_run": r["quant"],  # type: ignore[index]
                            "measured": r.get("measured", {}).get("ptmq", {}).get("recon", {})}
    # ptmq reconstructs at the qdrop calibrator's 1e-3 rounding rate; the qdrop method defaults to 0.005: match ptmq
    for name, extra in (("qdrop", ["-o", f"iters={a.iters}", "-o", "round_lr=0.001", *cache]), ("uniform", [])):
        if name in a.skip:
            continue
        rows[name], cal[name] = {}, 0.0
        for b in a.bits:
            r = qcore_run(a.out / f"{name}-{tag}-w{b}a{b}", ["--plugin", name, "--model", a.model, "--w-bits", str(b),
                                                              "--a-bits", str(b), *extra])
            fp = r["fp"]
            rows[name][b] = {"top1": r["quant"], "command": r["command"], "seconds": r["seconds"]["calibrate"]}
            cal[name] += r["seconds"]["calibrate"]
    head = "| method | models | " + " | ".join(f"W{b}A{b}" for b in a.bits) + " | calibration (s, total) |"
    lines = [f"{a.model}, FP top-1 {fp}; {a.iters} steps per block (ptmq, qdrop); "
             f"{platform.machine()} CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
             "", head, "|" + "---|" * (len(a.bits) + 3)]
    labels = {"ptmq": ("ptmq (one model, switched)", "1"), "qdrop": ("qdrop (one model per setting)", str(len(a.bits))),
              "uniform": ("uniform (min/max)", str(len(a.bits)))}
    for name, per in rows.items():
        label, n = labels.get(name, (f"{name} (one model, switched)", "1"))
        cells = [f"{per[b]['top1']:.2f}" for b in a.bits]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {cal[name]:.0f} |")
    table = "\n".join(lines)
    print(table)
    (a.out / "table.md").write_text(table + "\n")
    (a.out / "table.json").write_text(json.dumps({"model": a.model, "fp": fp, "iters": a.iters, "rows": rows,
                                                  "calibration_seconds": cal, "date": time.strftime("%Y-%m-%d %H:%M")},
                                                 indent=1, default=str))


if __name__ == "__main__":
    main()
