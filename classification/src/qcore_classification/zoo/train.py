"""Train a zoo model on the full Fashion-MNIST and write it as safetensors plus a JSON record.

Usage (the zoo's shipped weights were made with exactly this, see the JSON next to each file)::

    python -m qcore_classification.zoo.train --arch fmnist_resnet --data /usr/share/datasets/fashion-mnist \
        --out classification/src/qcore_classification/zoo/weights --epochs 40 --seed 0

The torchvision models of the zoo (``fmnist_tv_*``) were trained on a CPU budget: a seeded subset of the train split
(``--train-size``) for a few epochs, stored in float16 (``--fp16``; the recorded top-1 is that of the stored
float16 weights run in float32, which is the FP reference every benchmark uses)::

    python -m qcore_classification.zoo.train --arch fmnist_tv_mobilenetv2 --data /usr/share/datasets/fashion-mnist \
        --out classification/src/qcore_classification/zoo/weights --epochs 1 --train-size 16000 --fp16 --seed 0
    python -m qcore_classification.zoo.train --arch fmnist_tv_resnet18 --data /usr/share/datasets/fashion-mnist \
        --out classification/src/qcore_classification/zoo/weights --epochs 1 --train-size 30000 --fp16 --seed 0

A second stage continues from shipped weights (``--init``: a fresh warm-up and cosine schedule; ``--train-skip``
picks images the first stage did not see, ``--train-size`` omitted with ``--train-skip 0``: the whole train split);
the JSON record then lists both stages (``stages``: command, recipe, data, images seen, wall and CPU seconds)::

    python -m qcore_classification.zoo.train --arch fmnist_tv_resnet18 --data /usr/share/datasets/fashion-mnist \
        --out <folder> --epochs 1 --fp16 --seed 1 --init <stage-1 folder>/fmnist_tv_resnet18.safetensors

Augmentation: random shifts by up to 2 pixels (zero padding) and horizontal flips, applied to whole batches
on the training device; models with another input (``zoo.models.INPUTS``: 3 channels, 32 px) get the augmented
28 px batch resized and repeated to their input exactly as ``qcore_classification.data.adapt`` does.
Optimiser: SGD with Nesterov momentum (ResNet) or AdamW (ViT), cosine schedule with
warm-up, label smoothing 0.1. Works on CPU; a GPU makes it fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qcore import QcoreError
from qcore_classification.fashion_mnist import MEAN, STD, read_idx_split
from qcore_classification.zoo.models import ARCHITECTURES, INPUTS

log = logging.getLogger("qcore_classification.zoo.train")

RECIPES = {
    "fmnist_resnet": {"opt": "sgd", "lr": 0.1, "wd": 5e-4, "epochs": 40, "batch": 128},
    "fmnist_vit": {"opt": "adamw", "lr": 2e-3, "wd": 0.05, "epochs": 100, "batch": 256},
    "fmnist_tv_resnet18": {"opt": "sgd", "lr": 0.05, "wd": 5e-4, "epochs": 2, "batch": 128},
    "fmnist_tv_mobilenetv2": {"opt": "sgd", "lr": 0.05, "wd": 4e-5, "epochs": 2, "batch": 128},
}


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)).to(device=device, dtype=torch.float32).unsqueeze(1) / 255.0
    return (x - MEAN) / STD


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), value=(0.0 - MEAN) / STD)
    dx = torch.randint(0, 5, (b,), generator=gen, device=x.device)
    dy = torch.randint(0, 5, (b,), generator=gen, device=x.device)
    ar = torch.arange(28, device=x.device)
    rows = (dy[:, None] + ar[None, :])[:, :, None].expand(b, 28, 28)
    cols = (dx[:, None] + ar[None, :])[:, None, :].expand(b, 28, 28)
    out = pad[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _fit(x: torch.Tensor, arch: str) -> torch.Tensor:
    """Normalised 1x28x28 batches -> the architecture's input (``INPUTS``): bilinear antialiased resize, then the
    grey channel repeated; the same numbers as ``data.adapt`` (resizing commutes with the per-pixel normalisation
    because the interpolation weights sum to one)."""
    channels, size = INPUTS[arch]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / x.shape[0]


def _previous_stages(init: Path, arch: str) -> list[dict]:
    """The training stages that made the weights ``init``, read from the JSON record next to it
    (``<stem>.json``, as this script writes it); one ``{"unrecorded": ...}`` entry when there is none."""
    rec_path = init.with_suffix(".json")
    if not rec_path.exists():
        return [{"unrecorded": f"weights {init.name} without a JSON record"}]
    rec = json.loads(rec_path.read_text())
    if rec.get("arch") != arch:
        raise QcoreError(f"--init {init} was trained as {rec.get('arch')!r}, not {arch!r}: pass weights of --arch")
    if "stages" in rec:
        return list(rec["stages"])
    return [{key: rec.get(key) for key in ("command", "recipe", "data", "train_seconds", "device", "threads",
                                          "test_top1_fp32_cpu", "storage")}
            | {"images_seen": _images_seen(rec)}]


def _images_seen(rec: dict) -> int | None:
    """Images (with repetition) a record without ``stages`` trained on: subset size times epochs."""
    import re

    m = re.search(r"\(([\d,]+)", rec.get("data", ""))
    return int(m.group(1).replace(",", "")) * int(rec["recipe"]["epochs"]) if m else None


def subset_indices(n_all: int, seed: int, train_skip: int = 0, train_size: int | None = None) -> torch.Tensor | None:
    """The training images a run uses: positions ``train_skip .. train_skip + train_size`` of the seed's random order
    of the ``n_all`` images (``None``: all of them in file order, the recipe without a subset)."""
    if not train_skip and (train_size is None or train_size >= n_all):
        return None
    stop = n_all if train_size is None else min(n_all, train_skip + train_size)
    return torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[train_skip:stop]


def train(arch: str, data: Path, out: Path, epochs: int | None, seed: int, device: str,
          train_size: int | None = None, fp16: bool = False, init: Path | None = None, train_skip: int = 0,
          lr: float | None = None) -> dict:
    """Train ``arch`` and write ``out/<arch>.safetensors`` and ``out/<arch>.json``; return the record.

    ``train_size``: train on a seeded subset of that many training images (CPU budget); ``train_skip``: the subset
    starts after the first ``train_skip`` images of the same seeded order (so ``--train-size 30000`` and then
    ``--train-skip 30000`` see disjoint halves); ``fp16``: store the weights as float16 and report the top-1 of the
    stored weights (cast back to float32); ``init``: continue from these weights (safetensors) with a fresh warm-up
    and cosine schedule, the record then lists every stage (``stages``: the earlier ones from the JSON record next
    to ``init``, then this one); ``lr``: override the recipe's peak learning rate.
    """
    from safetensors.torch import load_file, save_file

    recipe = dict(RECIPES[arch])
    if epochs is not None:
        recipe["epochs"] = epochs
    if lr is not None:
        recipe["lr"] = lr
    if train_skip < 0 or (train_skip and train_skip >= 60000):
        raise QcoreError(f"--train-skip {train_skip} is outside the 60,000 training images: pass 0..59999")
    previous = _previous_stages(init, arch) if init is not None else []
    torch.manual_seed(seed)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    train_split, test_split = read_idx_split(data, "train"), read_idx_split(data, "test")
    xtr, ytr = _to_tensor(train_split.images, dev), torch.from_numpy(train_split.labels).to(dev)
    keep = subset_indices(xtr.shape[0], seed, train_skip, train_size)
    if keep is not None:
        xtr, ytr = xtr[keep.to(dev)], ytr[keep.to(dev)]
    xte, yte = _to_tensor(test_split.images, dev), torch.from_numpy(test_split.labels).to(dev)
    xte = torch.cat([_fit(x, arch) for x in xte.split(1000)])
    model = ARCHITECTURES[arch](10)
    if init is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in load_file(str(init)).items()})
    model = model.to(dev)
    channels_last = arch.startswith("fmnist_tv_")  # the torchvision CNNs: about 25 % less CPU per step, same math
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe["opt"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9,
                                                     nesterov=True, weight_decay=recipe["wd"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    steps_per_epoch = math.ceil(xtr.shape[0] / recipe["batch"])
    total = recipe["epochs"] * steps_per_epoch
    warm = min(2 * steps_per_epoch, max(1, total // 10))  # 2 epochs, or a tenth of a short run
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))  # 1-step runs too
    history = []
    t0, cpu0 = time.time(), time.process_time()
    for epoch in range(recipe["epochs"]):
        model.train()
        perm = torch.randperm(xtr.shape[0], generator=gen, device=dev)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * recipe["batch"]:(i + 1) * recipe["batch"]]
            xb = _fit(_augment(xtr[idx], gen), arch)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if (i + 1) % 50 == 0:
                log.debug("%s epoch %d step %d/%d loss %.4f", arch, epoch + 1, i + 1, steps_per_epoch,
                          running / (i + 1))
        last = epoch == recipe["epochs"] - 1  # the last epoch's top-1 is the final evaluation below (one pass less)
        acc = evaluate(model, xte, yte) if (epoch % 5 == 4 and not last) else None
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "test_top1": acc,
                        "seconds": round(time.time() - t0, 1)})
        log.info("%s epoch %d loss %.4f test top-1 %s", arch, epoch + 1, running / steps_per_epoch, acc)
    model = model.float().cpu().to(memory_format=torch.contiguous_format)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fp16:  # float parameters and buffers as float16; the FP reference is this stored model
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)
    train_seconds, cpu_seconds = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    top1 = evaluate(model, xte.cpu(), yte.cpu())
    history[-1]["test_top1"] = top1
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{arch}.safetensors"), metadata={"arch": arch, "num_classes": "10"})
    subset = (f"images {train_skip:,}..{train_skip + xtr.shape[0]:,} of 60,000 in seed-{seed} order"
              if train_skip else f"{xtr.shape[0]:,} of 60,000, seed {seed}")
    record = {
        "arch": arch, "seed": seed, "recipe": recipe, "test_top1_fp32_cpu": top1,
        "command": "python -m qcore_classification.zoo.train " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "train_seconds": train_seconds, "cpu_seconds": cpu_seconds, "history": history,
        "data": f"Fashion-MNIST train split ({xtr.shape[0]:,}"
                f"{'' if train_size is None and not train_skip else f' = {subset}'}) "
                "for training; test split (10,000) for the reported top-1",
        "input": "x".join(map(str, (INPUTS[arch][0], INPUTS[arch][1], INPUTS[arch][1]))),
        "storage": "float16" if fp16 else "float32",
        "threads": torch.get_num_threads(),
    }
    stage = {key: record[key] for key in ("command", "recipe", "data", "train_seconds", "cpu_seconds", "device",
                                          "threads", "test_top1_fp32_cpu", "storage")}
    stage |= {"images_seen": xtr.shape[0] * recipe["epochs"], "steps": total,
              "init": None if init is None else f"{init.name} (the previous stage's stored weights)"}
    record["stages"] = previous + [stage]
    seen = [st.get("images_seen") for st in record["stages"]]
    record["images_seen_total"] = sum(seen) if all(isinstance(n, int) for n in seen) else None
    (out / f"{arch}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True, action="append",
                   help="architecture to train (repeat for several)")
    p.add_argument("--data", type=Path, required=True, help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, required=True, help="folder for <arch>.safetensors and <arch>.json")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--fp16", action="store_true", help="store float16 weights (top-1 is that of the stored model)")
    p.add_argument("--train-skip", type=int, default=0,
                   help="start the subset after this many images of the seeded order (new images for --init)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from these safetensors weights (fresh warm-up + cosine stage; the record lists "
                        "every stage, the earlier ones read from the JSON next to FILE)")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    args = p.parse_args(argv)
    if args.init is not None and len(args.arch) > 1:
        p.error("--init continues one model: pass a single --arch")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for arch in args.arch:
        rec = train(arch, args.data, args.out, args.epochs, args.seed, args.device, args.train_size, args.fp16,
                    args.init, args.train_skip, args.lr)
        log.info("%s: test top-1 %.2f%% in %.0f s", arch, rec["test_top1_fp32_cpu"], rec["train_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
