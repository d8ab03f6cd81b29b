"""Shared pieces of the peer comparison (``bench/peers/``): one data export, one FP model loader, one evaluation
loop and one result.json schema for every toolkit, so that every row sees the same weights, the same 512
calibration images and the same 10,000 test images.

Runs in qcore's venv (``python bench/peers/common.py export OUT.npz``, which needs qcore_classification to pick the
calibration images exactly as ``qcore run`` does) and in every peer venv (loading, evaluation, results: only torch,
numpy, safetensors and, for the ViT, timm). The model architectures come from ``qcore_classification.zoo.models``
(the peer venvs see the repository's sources through a .pth file written by ``setup_venvs.sh``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("peers")

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "classification" / "src" / "qcore_classification" / "zoo" / "weights"
MODELS = ("fmnist_resnet", "fmnist_vit", "fmnist_tv_resnet18", "fmnist_tv_mobilenetv2")
CALIB_SIZE = 512
SEED = 0


# ----------------------------------------------------------------------------------------------------- data

def data_file(out: Path, model: str) -> Path:
    """The export for ``model``'s input under ``out``: ``data.npz`` for the 1x28x28 zoo models (the file name of the
    first tables), ``data-3x32.npz`` for the 32 px RGB torchvision ones (same images, same picks)."""
    from qcore_classification.zoo.models import INPUTS

    channels, size = INPUTS[model]
    return out / ("data.npz" if (channels, size) == (1, 28) else f"data-{channels}x{size}.npz")


def export_data(path: Path, calib_size: int = CALIB_SIZE, seed: int = SEED, model: str = "fmnist_resnet",
                eval_size: int | None = None) -> dict[str, str]:
    """Write the calibration and evaluation tensors to ``path`` (.npz), picked and normalised by qcore's own
    classification data path (``fashion_mnist_embedded``, the default of ``qcore run`` on zoo models), adapted to
    ``model``'s input (the same images for every model; 32 px RGB models get them resized and repeated).

    Arrays: ``calib`` float32 [N, C, S, S], ``test_x`` float32 [10000, C, S, S], ``test_y`` int64 [10000],
    all already normalised with the zoo models' mean and std (``eval_size``: only the first that many test images,
    for tests). Returns the data description qcore records.
    """
    from qcore_classification.data import fashion_mnist_embedded
    from qcore_classification.loaders import load_zoo

    spec = load_zoo(model, None).input
    data = fashion_mnist_embedded(spec, calib_size, eval_size, 256, seed)
    calib = torch.cat(data.calibration).numpy().astype(np.float32)
    xs, ys = zip(*data.evaluation(), strict=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, calib=calib, test_x=torch.cat(xs).numpy().astype(np.float32),
             test_y=torch.cat(ys).numpy().astype(np.int64), description=json.dumps(data.description))
    return data.description


@dataclass
class Data:
    """The exported tensors."""

    calib: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    description: dict[str, str]

    def calib_batches(self, batch: int = 64) -> list[torch.Tensor]:
        """The calibration images in batches of ``batch``."""
        return list(self.calib.split(batch))


def load_data(path: Path) -> Data:
    """Read an export written by :func:`export_data`."""
    with np.load(path) as z:
        return Data(torch.from_numpy(z["calib"]), torch.from_numpy(z["test_x"]), torch.from_numpy(z["test_y"]),
                    json.loads(str(z["description"])))


# ---------------------------------------------------------------------------------------------------- model

def load_model(name: str) -> nn.Module:
    """The zoo model ``name`` in eval mode with its shipped safetensors weights, as float32 (the torchvision zoo
    models are stored in float16; that stored model is the FP reference)."""
    from safetensors.torch import load_file

    from qcore_classification.zoo.models import ARCHITECTURES

    model = ARCHITECTURES[name](10)
    model.load_state_dict(load_file(str(WEIGHTS / f"{name}.safetensors")))
    return model.float().eval()


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers in definition order (what qcore quantizes)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def first_last(model: nn.Module) -> tuple[str, str]:
    """The first (stem / patch embedding) and last (classifier) Conv2d/Linear layer names."""
    names = quantizable_layers(model)
    return names[0], names[-1]


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], data: Data, batch: int = 500) -> float:
    """Top-1 in percent over all evaluation images."""
    correct = 0
    for x, y in zip(data.test_x.split(batch), data.test_y.split(batch), strict=True):
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        correct += int((out.argmax(1) == y).sum())
    return 100.0 * correct / len(data.test_y)


# --------------------------------------------------------------------------------------------------- result

@dataclass
class Result:
    """One row of a peer table; every toolkit writes these keys (``result.json``)."""

    model: str
    toolkit: str
    version: str
    method: str
    w_bits: int
    a_bits: int
    first_last: str = ""          # e.g. "8-bit (W8A8)", "same bits", "FP (not quantized)"
    residual_adds: str = ""       # "quantized" / "not quantized"
    weights: str = ""             # e.g. "per-channel symmetric"
    activations: str = ""         # e.g. "per-tensor affine, inputs of every Conv/Linear"
    deployable: str = ""          # "deployable (...)" or "simulated"
    top1: float | None = None
    fp_top1: float | None = None
    calibration_seconds: float | None = None
    error: str | None = None
    notes: str = ""
    machine: str = field(default_factory=lambda: f"{platform.machine()} {torch.get_num_threads()} torch thread(s)")
    torch: str = torch.__version__
    measured: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def write_result(out: Path, result: Result) -> None:
    """Write ``out/result.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=1) + "\n")


@dataclass
class Row:
    """One recipe of a peer: ``quantize(model, data)`` returns the quantized callable (timed as calibration)."""

    method: str
    w_bits: int
    a_bits: int
    quantize: Callable[[nn.Module, Data], Callable[[torch.Tensor], torch.Tensor]]
    describe: dict[str, str]


def run_rows(toolkit: str, version: str, rows: Iterable[Row], argv: list[str] | None = None) -> list[Result]:
    """The command line of every peer script: ``--model M --data D.npz --out DIR [--only METHOD]``.

    Each row gets a fresh FP model; its quantize() is timed as ``calibration_seconds``; the quantized model is
    evaluated on all test images; any exception is recorded in ``error`` (with the row's other keys) and the
    next row runs.
    """
    ap = argparse.ArgumentParser(description=f"{toolkit} rows of the peer comparison")
    ap.add_argument("--model", choices=MODELS, default="fmnist_resnet")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", action="append", default=[], help="run only rows whose 'method-WxAy' contains this")
    ap.add_argument("--skip", action="append", default=[], help="leave out rows whose 'method-WxAy' contains this")
    ap.add_argument("--fp-top1", type=float, help="FP top-1 measured once by run_all.py (default: measure it)")
    ap.add_argument("--limit", type=int, help="debugging only: evaluate on the first N test images")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(SEED)
    data = load_data(args.data)
    if args.limit:
        data.test_x, data.test_y = data.test_x[:args.limit], data.test_y[:args.limit]
        log.warning("evaluating on the first %d test images only (debugging)", args.limit)
    if args.fp_top1 is not None and not args.limit:
        fp_top1 = args.fp_top1
    else:
        fp_top1 = round(evaluate(load_model(args.model), data), 2)
    results = []
    for row in rows:
        tag = f"{row.method}-W{row.w_bits}A{row.a_bits}"
        if (args.only and not any(s in tag for s in args.only)) or any(s in tag for s in args.skip):
            continue
        res = Result(args.model, toolkit, version, row.method, row.w_bits, row.a_bits, fp_top1=fp_top1,
                     **row.describe)
        if args.limit:
            res.notes = f"DEBUG: first {args.limit} test images only"
        try:
            model = load_model(args.model)
            torch.manual_seed(SEED)
            t0 = time.perf_counter()
            qmodel = row.quantize(model, data)
            res.calibration_seconds = round(time.perf_counter() - t0, 1)
            res.top1 = round(evaluate(qmodel, data), 2)
        except Exception as exc:  # noqa: BLE001 - a failing recipe is a result too
            res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            log.error("%s %s failed:\n%s", toolkit, tag, traceback.format_exc())
        log.info("%s %s %s: top1 %s (%s s) %s", args.model, toolkit, tag, res.top1, res.calibration_seconds,
                 res.error or "")
        write_result(args.out / tag.replace("/", "_"), res)  # a method label may contain "/"
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> None:
    """``python bench/peers/common.py export OUT.npz``: write the shared data export (qcore's venv)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("what", choices=["export"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", choices=MODELS, default="fmnist_resnet", help="export for this model's input")
    args = ap.parse_args(argv)
    desc = export_data(args.out, model=args.model)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
