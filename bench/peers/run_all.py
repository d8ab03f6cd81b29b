"""Run every peer toolkit and qcore's same-setting rows on the same model, data and bits, and write one markdown
table per model (``OUT/peers_tables.md``) for BENCHMARKS.md.

Run from the repository root in qcore's venv (it exports the data with qcore's own data path and runs the qcore
rows itself)::

    bash bench/peers/setup_venvs.sh                      # once: one venv per peer under .venvs-peers/
    OMP_NUM_THREADS=1 python bench/peers/run_all.py      # every peer + qcore, zoo:fmnist_resnet
    python bench/peers/run_all.py --model fmnist_vit --peer brevitas --only W4A4
    python bench/peers/run_all.py --model fmnist_tv_mobilenetv2 --only W4A4 --skip "gptq"
    python bench/peers/run_all.py --table-only           # rebuild the tables from the result.json files

Each peer runs in a subprocess with its own venv (``.venvs-peers/<peer>/bin/python bench/peers/<peer>/run.py``); a peer
whose venv is missing or whose script dies before writing results gets an ``error`` row with the reason, so the
table says which peers could not run and why. Results: ``OUT/<model>/<peer>/<method>-WxAy/result.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

log = logging.getLogger("peers.run_all")
PEERS = ("brevitas", "nncf", "torchao", "modelopt", "aimet")


def _python(peer: str) -> Path:
    return Path(sys.executable) if peer == "qcore" else HERE.parents[1] / ".venvs-peers" / peer / "bin" / "python"


def run_peer(peer: str, model: str, data: Path, out: Path, fp_top1: float, only: list[str],
             skip: list[str] | None = None) -> None:
    """Run one peer's script; on a missing venv or a crash before any row, write an error row."""
    dest = out / model / peer
    dest.mkdir(parents=True, exist_ok=True)
    py = _python(peer)
    cmd = [str(py), str(HERE / peer / "run.py"), "--model", model, "--data", str(data), "--out", str(dest),
           "--fp-top1", str(fp_top1)] + [a for s in only for a in ("--only", s)] + \
        [a for s in skip or () for a in ("--skip", s)]
    logfile = dest / "run.log"
    if not py.exists():
        reason = f"no venv at {py.parent.parent}: run bash bench/peers/setup_venvs.sh {peer}"
        rc = None
    else:
        t0 = time.perf_counter()
        with logfile.open("w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        log.info("%s on %s: exit %s after %.0f s (log %s)", peer, model, rc, time.perf_counter() - t0, logfile)
        tail = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
        reason = tail[-1][:300] if tail else f"exit {rc}, no output"
    if rc != 0 and not list(dest.glob("*/result.json")):
        common.write_result(dest / "failed", common.Result(model, peer, "", "(script)", 0, 0, fp_top1=fp_top1,
                                                           error=reason))


def _fp_top1(model: str, data: Path, out: Path) -> float:
    """The FP model's top-1 on ``data``, measured once per model and kept in ``out/<model>/fp.json`` (every later
    run_all.py call on the same export reuses it instead of another pass over the 10,000 test images)."""
    cache = out / model / "fp.json"
    key = {"data": data.name, "data_mtime": data.stat().st_mtime, "weights_mtime":
           (common.WEIGHTS / f"{model}.safetensors").stat().st_mtime}
    if cache.exists():
        kept = json.loads(cache.read_text())
        if {k: kept.get(k) for k in key} == key:
            return float(kept["fp_top1"])
    fp_top1 = round(common.evaluate(common.load_model(model), common.load_data(data)), 2)
    log.info("%s FP top-1 %.2f", model, fp_top1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**key, "fp_top1": fp_top1}) + "\n")
    return fp_top1


def _bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}" if r["w_bits"] else "-"


def _provenance(rows: list[dict]) -> str:
    """Where and when the rows were measured: the machines and the first/last ``measured`` stamp of the
    result.json files (rows written before the stamp existed are counted as undated)."""
    stamps = sorted(r["measured"] for r in rows if r.get("measured"))
    machines = sorted({r.get("machine", "?") for r in rows})
    when = (f"{stamps[0]} to {stamps[-1]}" if stamps[0] != stamps[-1] else stamps[0]) if stamps else "undated"
    undated = len(rows) - len(stamps)
    return (f"{len(rows)} rows measured on {' / '.join(machines)}, {when}"
            + (f", {undated} undated" if stamps and undated else ""))


def table(out: Path, model: str) -> str:
    """The markdown table of every result.json under ``out/model``."""
    rows = [json.loads(p.read_text()) for p in sorted((out / model).glob("*/*/result.json"))]
    order = {p: i for i, p in enumerate(("qcore",) + PEERS)}
    rows.sort(key=lambda r: (r["w_bits"] == 8 and r["a_bits"] == 8, -r["w_bits"], -r["a_bits"],
                             order.get(r["toolkit"].replace("-torch", ""), 9), -(r["top1"] or -1)))
    fp = next((r["fp_top1"] for r in rows if r.get("fp_top1") is not None), None)
    lines = [f"zoo:{model} (FP top-1 {fp}; {_provenance(rows)}):", "",
             "| W/A | toolkit | method | top-1 | Δ FP | calib s | first/last | residual adds | weights | "
             "activations | deployable? |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else f"failed: {' '.join(str(r['error']).split())}"
        delta = f"{r['top1'] - r['fp_top1']:+.2f}" if r["top1"] is not None and r["fp_top1"] else ""
        tk = f"{r['toolkit']} {r['version']}".strip()
        lines.append(f"| {_bits(r)} | {tk} | {r['method']} | {top1} | {delta} | {r['calibration_seconds'] or ''} | "
                     f"{r['first_last']} | {r['residual_adds']} | {r['weights']} | {r['activations']} | "
                     f"{r['deployable']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", choices=common.MODELS, help="default: fmnist_resnet")
    ap.add_argument("--peer", action="append", choices=("qcore",) + PEERS, help="default: all and qcore")
    ap.add_argument("--only", action="append", default=[], help="rows whose 'method-WxAy' contains this")
    ap.add_argument("--skip", action="append", default=[], help="leave out rows whose 'method-WxAy' contains this")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    models = args.model or ["fmnist_resnet"]
    if not args.table_only:
        for model in models:
            data = common.data_file(args.out, model)
            if not data.exists():
                log.info("exporting the calibration/evaluation tensors to %s", data)
                common.export_data(data, model=model)
            fp_top1 = _fp_top1(model, data, args.out)
            for peer in args.peer or ("qcore",) + PEERS:
                run_peer(peer, model, data, args.out, fp_top1, args.only, args.skip)
    text = "\n".join(table(args.out, m) for m in models if (args.out / m).is_dir())
    (args.out / "peers_tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
