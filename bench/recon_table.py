"""Block reconstruction against the other methods at low bit-widths: W3A3 and W2A4 rows for uniform, ACIQ
(deployable), RDOQ, BRECQ, QDrop and RDOQ + QDrop on the embedded ResNet and ViT, plus the compositions
``--plugin aciq --calibrator qdrop`` and ``--plugin uniform --calibrator brecq`` at W4A4.

    OMP_NUM_THREADS=1 python bench/recon_table.py --state qcore-runs/recon_table [--models resnet vit]
                                                  [--rows GLOB ...] [--list] [--markdown-only]

Every row is one real ``qcore run ...`` in a subprocess (the command is in the table), timed wall-clock. After
each row the measurements go into ``STATE/recon_table.json`` (written atomically) and the Markdown table into
``STATE/recon_table.md``, so a killed table, started again with the same command, skips the finished rows and
continues; the row that was running restarts, and its reconstruction resumes from the per-block cache
(``QCORE_CACHE_DIR=STATE/cache``, fresh for the table so that RDOQ's curves and every block are computed, and
timed, inside the rows), which the JSON records (``resumed_units``: the wall time of such a row is partial).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {"resnet": "zoo:fmnist_resnet", "vit": "zoo:fmnist_vit"}
#: the methods of each bit-width row: (name, qcore run arguments, deployable); the reconstruction rows at
#: ``round_lr=0.005``, the rate that met the W2A4 and ViT W4A4 targets at the CPU-sized 300 steps
METHODS: list[tuple[str, list[str], str]] = [
    ("qdrop", ["--plugin", "qdrop", "-o", "round_lr=0.005"], "yes"),
    ("uniform", ["--plugin", "uniform"], "yes"),
    ("aciq", ["--plugin", "aciq", "-o", "act_granularity=tensor", "-o", "alloc_acts=false"], "yes"),
    ("rdoq", ["--plugin", "rdoq"], "yes"),
    ("brecq", ["--plugin", "brecq", "-o", "round_lr=0.005"], "yes"),
    ("rdoq+qdrop", ["--plugin", "rdoq", "--calibrator", "qdrop", "-o", "round_lr=0.005"], "yes"),
]
BITS = [("W2A4", 2, 4), ("W3A3", 3, 3)]
#: compositions at W4A4 (the issue's list), run on each model after its W2A4 rows
COMPOSITIONS: list[tuple[str, list[str], str]] = [
    ("aciq+qdrop", ["--plugin", "aciq", "--calibrator", "qdrop"], "no (per-channel A)"),
    ("uniform+brecq", ["--plugin", "uniform", "--calibrator", "brecq", "--w-bits", "4", "--a-bits", "4"], "yes"),
]


def rows(models: list[str]) -> list[dict[str, Any]]:
    """Every row, in the order they run: per model the W2A4 rows, the W4A4 compositions, the W3A3 rows."""
    out = []
    for m in models:
        def bit_rows(label: str, w: int, a: int, m: str = m) -> list[dict[str, Any]]:
            res = []
            for name, args, deploy in METHODS:
                budget = ["--target-bits", str(w)] if name.startswith("rdoq") else ["--w-bits", str(w)]
                res.append({"id": f"{m}/{label}/{name}", "model": m, "bits": label, "method": name,
                            "deployable": deploy, "args": args + budget + ["--a-bits", str(a)]})
            return res
        out += bit_rows(*BITS[0])
        out += [{"id": f"{m}/W4A4/{name}", "model": m, "bits": "W4A4", "method": name, "deployable": deploy,
                 "args": list(args)} for name, args, deploy in COMPOSITIONS]
        out += bit_rows(*BITS[1])
    return out


def command(row: dict[str, Any]) -> list[str]:
    """The ``qcore run`` arguments of a row (without --out)."""
    model = [] if row["model"] == "resnet" else ["--model", MODELS[row["model"]]]
    return ["qcore", "run", *row["args"], *model]


def git_commit() -> str:
    """HEAD of the checkout running the table, with ``+dirty`` when tracked files are modified."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def qcore_exe() -> str:
    """The ``qcore`` script of the running interpreter's environment (else the one on PATH)."""
    here = Path(sys.executable).parent / "qcore"
    found = str(here) if here.exists() else shutil.which("qcore")
    if not found:
        raise SystemExit("recon_table: no `qcore` command next to this Python or on PATH; pip install -e ./core")
    return found


def run_row(row: dict[str, Any], state: Path) -> dict[str, Any]:
    """Run one row's ``qcore run`` and return what the table records."""
    out = state / "runs" / row["id"].replace("/", "_")
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "QCORE_PROGRESS": "0",
           "QCORE_CACHE_DIR": str(state / "cache")}
    cmd = command(row)
    rec: dict[str, Any] = {"id": row["id"], "command": " ".join(cmd), "commit": git_commit(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t0, c0 = time.perf_counter(), _child_cpu()
    with subprocess.Popen([qcore_exe(), *cmd[1:], "--out", str(out)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate()
        finally:  # the table killed (SIGTERM, Ctrl-C): the run goes with it, and resumes next time
            if proc.poll() is None:
                proc.kill()
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["cpu_s"] = round(_child_cpu() - c0, 1)  # user + system: about the wall time on an idle core
    if proc.returncode != 0:
        rec["error"] = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        (state / "runs").mkdir(parents=True, exist_ok=True)
        (state / "runs" / (row["id"].replace("/", "_") + ".stderr")).write_text(stderr)
        return rec
    r = json.loads((out / "result.json").read_text())
    rec.update(fp=r["fp"], quant=r["quant"], w_bits_avg=r["w_bits_avg"], a_bits_avg=r["a_bits_avg"],
               stage_seconds=r["seconds"])
    for name in ("qdrop", "brecq", "adaround"):
        m = (r.get("measured") or {}).get(name)
        if isinstance(m, dict):
            rec["recon"] = {"calibrator": name, "seconds": m.get("seconds"), "iters_per_unit": m.get("iters_per_unit"),
                            "resumed_units": sorted({u for k, v in m.items() if isinstance(v, dict)
                                                     for u in v.get("resumed_units", [])}),
                            "passes": {k: {"loss_start": v.get("loss_start_per_unit"),
                                           "loss_end": v.get("loss_end_per_unit")}
                                       for k, v in m.items() if isinstance(v, dict) and "units" in v}}
    return rec


def _child_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def markdown(done: dict[str, dict[str, Any]], order: list[dict[str, Any]]) -> str:
    """The table of every finished row, in row order."""
    lines = ["| model | bits | method | command | deployable | top-1 | Δ FP | W/A avg | calibrate | wall | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in order:
        rec = done.get(row["id"])
        if rec is None:
            continue
        if "error" in rec:
            lines.append(f"| {row['model']} | {row['bits']} | {row['method']} | `{rec['command']}` | "
                         f"{row['deployable']} | error: {rec['error']} | | | | {rec['wall_s']:.0f} s | |")
            continue
        cal = rec["stage_seconds"].get("calibrate")
        resumed = " (resumed)" if rec.get("recon", {}).get("resumed_units") else ""
        wb = "-" if rec["w_bits_avg"] is None else f"{rec['w_bits_avg']:.2f}"
        ab = "-" if rec["a_bits_avg"] is None else f"{rec['a_bits_avg']:.2f}"
        lines.append(f"| {row['model']} | {row['bits']} | {row['method']} | `{rec['command']}` | {row['deployable']} "
                     f"| {rec['quant']:.2f} | {rec['quant'] - rec['fp']:+.2f} | {wb}/{ab} | "
                     f"{'' if cal is None else f'{cal:.0f} s'} | {_minutes(rec['wall_s'])}{resumed} | "
                     f"{_minutes(rec.get('cpu_s', 0.0))} |")
    return "\n".join(lines) + "\n"


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60)} s"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, default=Path("qcore-runs/recon_table"),
                   help="folder of the JSON, the Markdown table, each run's --out and the cache")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=["*"], help="globs over row ids, e.g. 'resnet/W2A4/*'")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown from the JSON, run nothing")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    order = [r for r in rows(args.models) if any(fnmatch.fnmatch(r["id"], g) for g in args.rows)]
    if args.list:
        for r in order:
            print(f"{r['id']}: {' '.join(command(r))}")
        return 0
    args.state.mkdir(parents=True, exist_ok=True)
    js = args.state / "recon_table.json"
    done: dict[str, dict[str, Any]] = json.loads(js.read_text()) if js.exists() else {}
    every = rows(list(MODELS))
    if not args.markdown_only:
        for r in order:
            if r["id"] in done and "error" not in done[r["id"]]:
                print(f"skip {r['id']} (done)", flush=True)
                continue
            rec = run_row(r, args.state)
            done[r["id"]] = rec
            _write(js, json.dumps(done, indent=1))
            _write(args.state / "recon_table.md", markdown(done, every))
            shown = rec.get("error") or f"{rec['quant']:.2f} (FP {rec['fp']:.2f})"
            print(f"done {r['id']}: {shown} in {rec['wall_s']:.0f} s", flush=True)
    _write(args.state / "recon_table.md", markdown(done, every))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '1')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print(markdown(done, every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
