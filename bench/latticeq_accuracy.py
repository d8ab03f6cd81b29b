"""LatticeQ against uniform, ACIQ, RDOQ and QDrop at the seed's settings (W4A8B8, W4A4B4, W3A8B8) on the zoo models.

    OMP_NUM_THREADS=1 python bench/latticeq_accuracy.py [--models zoo:fmnist_resnet] [--settings W4A8B8 W4A4B4 W3A8B8]
        [--rows uniform latticeq aciq rdoq aciq-bits latticeq+recon scalar-grid qdrop] [--jsonl FILE] [--device cpu]
        [--lattice-option weighting=input ...]

Cells run row by row (all settings of a row, then the next row); with ``--jsonl`` the cells already in the file
are kept and not re-run (resume).

Every cell is one in-process ``qcore run`` (512 embedded train-split calibration images, seed 0; all 10,000
Fashion-MNIST test images). Every Conv2d/Linear weight and every such layer's input is quantized; first and
last layer at 8 bits (weights and input; counted in the averages); BatchNorm folded (the seed quantizes unfolded
weights, which is easier); residual sums, pooling, attention matmuls and softmax are not quantized.

* ``uniform``: ``--plugin uniform --w-bits W --a-bits A`` (per-channel symmetric min/max weights, per-tensor
  affine min/max activations; deployable);
* ``aciq``: ``--plugin aciq --w-bits W --a-bits A`` (per-channel bits and activation scales: simulation);
* ``rdoq``: ``--plugin rdoq --target-bits T --a-bits A`` with ``T`` = the latticeq row's ``w_bits_avg`` (basis
  storage included), i.e. the same total weight bits; deployable;
* ``aciq-bits``: ``aciq`` with ``-o w_target=t``, ``t`` chosen so that the run's ``w_bits_avg`` (8-bit first/last
  layers included) equals the latticeq row's: ``t = (T - 8 f) / (1 - f)``, ``f`` the 8-bit layers' share of the
  weights, read off the ``aciq`` cell (``f = (avg - W) / (8 - W)``); ACIQ's per-channel allocation spends the
  extra bits; simulation;
* ``latticeq``: ``--plugin latticeq --w-bits W --a-bits A -o basis_bits=B`` (per-tensor quantile activation
  ranges; per channel, a basis only where it pays for its stored bits, ``-o select``'s default; not an integer
  grid, so "deployable no");
* ``latticeq+recon``: the same with ``-o recon=true`` (qcore-recon's QDrop engine, 300 steps per block);
* ``scalar-grid``: ``latticeq`` with ``-o restarts=0``: no basis search, every basis stays ``step * I`` of the
  MSE-optimal scalar grid, everything else (quantile activations, mean correction, basis bits counted) the same:
  what the lattice itself adds is the difference to the ``latticeq`` row;
* ``qdrop``: ``--plugin qdrop --w-bits W --a-bits A`` (uniform grid + block reconstruction, deployable).

``--lattice-option KEY=VALUE`` (repeatable) adds ``-o KEY=VALUE`` to the three latticeq rows (e.g.
``weighting=input``, the output-aware loss); each cell records them (``lattice_options``) and a resumed file only
reuses latticeq-family cells (and the rdoq cells whose target they set) measured with the same options.

Prints one markdown table per model: top-1 (w_bits_avg / a_bits_avg) and seconds per cell.

``--paired`` also records which test images each cell gets right (evaluating the quantized model once more, with
a hook on its logits; the embedded test labels) and prints, for every cell with a ``uniform`` cell of the same
setting, the paired difference to uniform with its 95 % interval (mean of per-image differences +- 1.96 standard
errors; the same images for both, so much tighter than two separate binomial intervals).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcore import RunConfig, RunOutcome, load_host, run

ROWS = ["uniform", "latticeq", "aciq", "rdoq", "aciq-bits", "latticeq+recon", "scalar-grid", "qdrop"]
#: rows whose paired differences are also printed against every baseline row of the same setting (``--paired``)
LATTICE_ROWS, BASELINE_ROWS = ("latticeq", "latticeq+recon", "scalar-grid"), ("aciq", "rdoq", "aciq-bits", "qdrop")
#: rows whose cells do not depend on latticeq's options
PLAIN_ROWS = ("uniform", "aciq", "qdrop", "fp")


def config(row: str, model: str, w: int, a: int, b: int, lattice_bits: float | None, device: str,
           lattice_options: dict[str, Any] | None = None, seed: int = 0,
           pinned_share: float | None = None) -> RunConfig:
    """The run of one cell (``pinned_share``: the fraction of weights in the 8-bit first/last layers, for
    ``aciq-bits``)."""
    common: dict[str, Any] = {"model": model, "device": device, "seed": seed}
    if row == "aciq-bits":  # ACIQ's per-channel allocation at latticeq's average over the layers it allocates
        if lattice_bits is None or pinned_share is None:
            raise SystemExit("the aciq-bits row needs the latticeq and aciq rows first (latticeq's w_bits_avg is "
                             "the target; aciq's gives the 8-bit first/last layers' share of the weights)")
        w_target = (lattice_bits - 8 * pinned_share) / (1 - pinned_share)
        return RunConfig(plugin="aciq", w_bits=w, a_bits=a, options={"w_target": round(w_target, 4)}, **common)
    if row == "rdoq":
        if lattice_bits is None:
            raise SystemExit("the rdoq row needs the latticeq row first (its w_bits_avg is rdoq's target)")
        return RunConfig(plugin="rdoq", target_bits=lattice_bits, a_bits=a, **common)
    if row.startswith("latticeq") or row == "scalar-grid":
        opts: dict[str, Any] = {"basis_bits": b, **(lattice_options or {})}
        if row.endswith("+recon"):
            opts["recon"] = True
        if row == "scalar-grid":
            opts["restarts"] = 0
        return RunConfig(plugin="latticeq", w_bits=w, a_bits=a, options=opts, **common)
    if row == "qdrop":  # latticeq's reconstruction runs at the calibrator's 1e-3: give the baseline the same rate
        return RunConfig(plugin=row, w_bits=w, a_bits=a, options={"round_lr": 0.001}, **common)
    return RunConfig(plugin=row, w_bits=w, a_bits=a, **common)


def correct_images(outcome: RunOutcome, fp: bool = False) -> tuple[str, int]:
    """Which test images the quantized model (``fp``: the run's FP model) gets right, as a hex string of packed
    bits (evaluation order), and how many images."""
    from qcore_classification.fashion_mnist import read_embedded

    model = outcome.fp_model if fp else outcome.model
    preds: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _i, out: preds.append(out.argmax(dim=1).cpu()))
    try:
        outcome.ctx.task.evaluate(model)
    finally:
        hook.remove()
    p = torch.cat(preds).numpy()
    return np.packbits(p == read_embedded()["test"].labels[: len(p)]).tobytes().hex(), len(p)


def paired_difference(a: str, b: str, n: int) -> tuple[float, float]:
    """Top-1 of ``a`` minus ``b`` (points) over the same ``n`` images and the half-width of its 95 % interval."""
    ua = np.unpackbits(np.frombuffer(bytes.fromhex(a), dtype=np.uint8))[:n].astype(float)
    ub = np.unpackbits(np.frombuffer(bytes.fromhex(b), dtype=np.uint8))[:n].astype(float)
    d = ua - ub
    return 100 * float(d.mean()), 100 * 1.96 * float(d.std(ddof=1)) / float(np.sqrt(n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo:fmnist_resnet"])
    p.add_argument("--settings", nargs="+", default=["W4A8B8", "W4A4B4", "W3A8B8"])
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jsonl", type=Path, default=None, help="append every cell here as it finishes")
    p.add_argument("--paired", action="store_true",
                   help="record each cell's correct test images; print paired differences to uniform (zoo models)")
    p.add_argument("--lattice-option", action="append", default=[], metavar="KEY=VALUE",
                   help="-o KEY=VALUE for the latticeq rows (repeatable), e.g. weighting=input")
    p.add_argument("--seed", type=int, default=0,
                   help="calibration seed of every cell (default 0); a resumed file only reuses cells of this seed")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="also write each cell's full result.json here (MODEL_SETTING_ROW[_sSEED].json)")
    args = p.parse_args()
    lat_opts: dict[str, Any] = {}
    for item in args.lattice_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--lattice-option {item}: use KEY=VALUE")
        try:  # numbers and true/false as JSON, anything else as text
            lat_opts[key] = json.loads(value)
        except json.JSONDecodeError:
            lat_opts[key] = value
    host = load_host()
    rows = [r for r in ROWS if r in args.rows]
    settings = []
    for setting in args.settings:
        m = re.fullmatch(r"W(\d+)A(\d+)B(\d+)", setting)
        if not m:
            p.error(f"--settings {setting}: use the form W4A8B8")
        settings.append((setting, *(int(g) for g in m.groups())))
    done: list[dict[str, Any]] = []
    if args.jsonl and args.jsonl.exists():  # resume: keep the cells already measured
        done = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    # cells of the latticeq family (and rdoq, whose target is latticeq's bits) count only with the same options
    done = [c for c in done if c["row"] in PLAIN_ROWS or c.get("lattice_options", {}) == lat_opts]
    done = [c for c in done if c.get("seed", 0) == args.seed]
    results: list[dict[str, Any]] = list(done)
    # row by row (every setting of the cheap rows first), latticeq before rdoq (its bits are rdoq's target)
    order = sorted(rows, key=lambda r: (r in ("rdoq", "aciq-bits"), ROWS.index(r)))
    for model in args.models:
        for row in order:
            for setting, w, a, b in settings:
                if any(c["model"] == model and c["setting"] == setting and c["row"] == row for c in results):
                    continue
                lat = next((c["w_bits_avg"] for c in results if c["model"] == model and c["setting"] == setting
                            and c["row"] == "latticeq"), None)
                # share of the weights in the 8-bit first/last layers, from aciq's (integer-bit) average
                ref = next((c["w_bits_avg"] for c in results if c["model"] == model and c["setting"] == setting
                            and c["row"] == "aciq"), None)
                share = None if ref is None else (ref - w) / (8 - w)
                t0 = time.perf_counter()
                outcome = run(config(row, model, w, a, b, None if lat is None else round(lat, 3), args.device,
                                     lat_opts, args.seed, share), host)
                r = outcome.result
                cell = {"model": model, "setting": setting, "row": row, "fp": r["fp"], "quant": r["quant"],
                        "w_bits_avg": r["w_bits_avg"], "a_bits_avg": r["a_bits_avg"], "size_mb": r["size_mb"],
                        "deployable": r["quantized"]["deployable"], "seconds": round(time.perf_counter() - t0, 1),
                        "seed": args.seed}
                if args.results_dir:
                    args.results_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{model.replace(':', '_')}_{setting}_{row}" + (f"_s{args.seed}" if args.seed else "")
                    (args.results_dir / f"{name}.json").write_text(json.dumps(r, indent=1, default=str))
                if row not in PLAIN_ROWS:
                    cell["lattice_options"] = lat_opts
                if args.paired:
                    cell["correct"], cell["images"] = correct_images(outcome)
                    if not any(c["model"] == model and c["row"] == "fp" for c in results):
                        # the FP model's own images, once per model: FP - uniform bounds what any row can gain
                        fp_cell = {"model": model, "setting": "FP", "row": "fp", "fp": r["fp"], "quant": r["fp"],
                                   "seed": args.seed}
                        fp_cell["correct"], fp_cell["images"] = correct_images(outcome, fp=True)
                        results.append(fp_cell)
                        if args.jsonl:
                            with args.jsonl.open("a") as fh:
                                fh.write(json.dumps(fp_cell) + "\n")
                results.append(cell)
                print(json.dumps({k: v for k, v in cell.items() if k != "correct"}), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as fh:
                        fh.write(json.dumps(cell) + "\n")
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for model in args.models:
        sub = [c for c in results if c["model"] == model]
        print(f"\n{model} (FP top-1 {sub[0]['fp']:.2f}); cells: top-1 (W avg / A avg bits), seconds\n")
        print("| row | deployable | " + " | ".join(args.settings) + " |")
        print("|---|---|" + "---|" * len(args.settings))
        for row in rows:
            cells = [next((c for c in sub if c["row"] == row and c["setting"] == s), None) for s in args.settings]
            dep = next((c["deployable"] for c in cells if c), False)
            print(f"| {row} | {'yes' if dep else 'no'} | " + " | ".join(
                f"{c['quant']:.2f} ({c['w_bits_avg']:.2f}/{c['a_bits_avg']:.2f}), {c['seconds']:.0f} s" if c else "-"
                for c in cells) + " |")
        # every row against uniform; the latticeq rows also against each baseline measured at their setting
        paired = [(c, u) for c in sub if c["row"] != "uniform" and "correct" in c
                  for u in sub if u["setting"] == c["setting"] and "correct" in u
                  and (u["row"] == "uniform" or (c["row"] in LATTICE_ROWS and u["row"] in BASELINE_ROWS))]
        fp = next((c for c in sub if c["row"] == "fp"), None)
        if fp:
            paired += [(fp, u) for u in sub if u["row"] == "uniform" and "correct" in u]
        if paired:
            print(f"\n{model}: paired differences on the same test images (points, 95 % interval)\n")
            for c, u in paired:
                d, half = paired_difference(c["correct"], u["correct"], min(c["images"], u["images"]))
                print(f"* {c['row']} - {u['row']} {u['setting']}: {d:+.2f} +- {half:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
