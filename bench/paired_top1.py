"""Paired bootstrap of the top-1 difference between two ``qcore run`` outputs on the same evaluation images.

    OMP_NUM_THREADS=1 python bench/paired_top1.py RUN_A RUN_B [--resamples 10000] [--seed 0]

Each RUN is a ``qcore run --out`` folder (``model.qcore`` and ``result.json``) of a classification model
(``result.json``'s ``model``; the full evaluation split of its default data: the 10,000 Fashion-MNIST test images
for the zoo models). Both saved models are re-applied to a fresh FP model (:func:`qcore.load`), evaluated image by
image, and the difference ``top-1(B) - top-1(A)`` is reported with a 95 % percentile interval from resampling the
images with replacement (the same resample for both: paired). This is the evaluation-data noise of one pair of
runs, not the seed noise of the methods (compare seeds for that).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import qcore
from qcore_classification.data import load_data


def _correct(run: Path, host: object) -> tuple[str, np.ndarray, float]:
    result = json.loads((run / "result.json").read_text())
    model_name = result["model"]
    prefix, _, name = model_name.partition(":")
    config = qcore.RunConfig(model=model_name)
    loaded = host.model_loader("classification", prefix).load(name, None, config)  # type: ignore[attr-defined]
    model = qcore.load(run / "model.qcore", loaded.model, host=host).eval()
    data = load_data(None, loaded.input, 64, None, 256, 0)
    hits = []
    with torch.no_grad():
        for x, y in data.evaluation():
            hits.append((model(x).argmax(dim=1) == y).numpy())
    return model_name, np.concatenate(hits), float(result["quant"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    host = qcore.load_host()
    name_a, a, top_a = _correct(args.run_a, host)
    name_b, b, top_b = _correct(args.run_b, host)
    if name_a != name_b or a.shape != b.shape:
        raise SystemExit(f"the runs are not comparable: {name_a} ({a.size} images) vs {name_b} ({b.size})")
    rng = np.random.default_rng(args.seed)
    diff = b.astype(np.float64) - a.astype(np.float64)
    idx = rng.integers(0, diff.size, size=(args.resamples, diff.size))
    boot = 100.0 * diff[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"A {args.run_a.name}: top-1 {100 * a.mean():.2f} (result.json {top_a:.2f})")
    print(f"B {args.run_b.name}: top-1 {100 * b.mean():.2f} (result.json {top_b:.2f})")
    print(f"B - A: {100 * diff.mean():+.2f} [95 % paired bootstrap {lo:+.2f}, {hi:+.2f}], images {diff.size}, "
          f"disagreeing {int((a != b).sum())}")


if __name__ == "__main__":
    main()
