"""Classification data: the embedded Fashion-MNIST subset, Fashion-MNIST IDX folders, torchvision's
Fashion-MNIST download, and ImageNet-style folders (``train/`` and ``val/`` of class sub-folders).

Calibration samples always come from the training split (seeded), evaluation from the test/val split.
Inputs are adapted to the model by :func:`adapt`: grey images are repeated to 3 channels for RGB models,
RGB is averaged to grey for 1-channel models, images are resized to the model's input size, then
normalised with the model's mean and std.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qcore import QcoreError
from qcore_classification import fashion_mnist as fm
from qcore_classification.loaders import InputSpec

log = logging.getLogger(__name__)


def adapt(x: Tensor, spec: InputSpec) -> Tensor:
    """Turn pixels in [0, 1] (``[B, C, H, W]`` float) into the model's normalised input."""
    if x.shape[1] != spec.channels:
        if spec.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif spec.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise QcoreError(f"cannot adapt {x.shape[1]}-channel images to a {spec.channels}-channel model")
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean) / std


@dataclass
class ClassificationData:
    """Calibration inputs (already adapted, in batches) and an evaluation stream of ``(inputs, labels)``."""

    calibration: list[Tensor]
    eval_stream: Iterable[tuple[Tensor, Tensor]]
    num_classes: int
    description: dict[str, str]

    def evaluation(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from self.eval_stream


@dataclass
class _AdaptedBatches:
    """uint8 images adapted to the model one batch at a time (a 224x224 RGB copy of 10k images would need
    gigabytes)."""

    images: np.ndarray
    labels: np.ndarray
    spec: InputSpec
    batch: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.labels), self.batch):
            yield (adapt(_uint8_to_unit(self.images[i:i + self.batch]), self.spec),
                   torch.from_numpy(self.labels[i:i + self.batch]))


def _uint8_to_unit(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


def _batches(x: Tensor, size: int) -> list[Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _pick(n_pool: int, n: int, seed: int) -> np.ndarray:
    if n >= n_pool:
        return np.arange(n_pool)
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=n, replace=False))


def _from_splits(calib: fm.Split, test: fm.Split, spec: InputSpec, calib_size: int, eval_size: int | None,
                 batch: int, seed: int, desc: dict[str, str]) -> ClassificationData:
    idx = _pick(len(calib), calib_size, seed)  # all of a smaller pool: the pipeline warns and records the count
    calib_x = adapt(_uint8_to_unit(calib.images[idx]), spec)
    n_eval = len(test) if eval_size is None else min(eval_size, len(test))
    desc = dict(desc)
    desc["calibration"] += f": {len(idx)} images (seed {seed})"
    desc["evaluation"] += f": {n_eval} images" + ("" if n_eval == len(test) else f" (first {n_eval} of {len(test)})")
    return ClassificationData(_batches(calib_x, batch), _AdaptedBatches(test.images[:n_eval], test.labels[:n_eval],
                                                                       spec, batch), 10, desc)


def fashion_mnist_embedded(spec: InputSpec, calib_size: int, eval_size: int | None, batch: int,
                           seed: int) -> ClassificationData:
    """The subset shipped in the package: 10k test images, a 2,048-image calibration pool from train."""
    parts = fm.read_embedded()
    return _from_splits(parts["calib"], parts["test"], spec, calib_size, eval_size, batch, seed, {
        "calibration": "embedded Fashion-MNIST train-split sample", "evaluation": "embedded Fashion-MNIST test split"})


def fashion_mnist_idx(directory: Path, spec: InputSpec, calib_size: int, eval_size: int | None, batch: int,
                      seed: int) -> ClassificationData:
    """Fashion-MNIST from its IDX files (e.g. Debian's dataset-fashion-mnist)."""
    train, test = fm.read_idx_split(directory, "train"), fm.read_idx_split(directory, "test")
    return _from_splits(train, test, spec, calib_size, eval_size, batch, seed, {
        "calibration": f"Fashion-MNIST train split ({directory})",
        "evaluation": f"Fashion-MNIST test split ({directory})"})


def fashion_mnist_download(root: Path, spec: InputSpec, calib_size: int, eval_size: int | None, batch: int,
                           seed: int) -> ClassificationData:
    """Fashion-MNIST through torchvision's downloader (needs the network the first time)."""
    from torchvision.datasets import FashionMNIST

    try:
        train = FashionMNIST(str(root), train=True, download=True)
        test = FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:
        raise QcoreError(f"could not download Fashion-MNIST into {root} ({type(exc).__name__}); offline? use "
                         "--data embedded or a folder with the IDX files") from None
    as_split = lambda d: fm.Split(d.data.numpy(), d.targets.numpy().astype(np.int64))  # noqa: E731
    return _from_splits(as_split(train), as_split(test), spec, calib_size, eval_size, batch, seed, {
        "calibration": "Fashion-MNIST train split (torchvision)",
        "evaluation": "Fashion-MNIST test split (torchvision)"})


def image_folder(directory: Path, spec: InputSpec, calib_size: int, eval_size: int | None, batch: int,
                 seed: int, workers: int = 2) -> ClassificationData:
    """ImageNet-style folders: ``train/`` (calibration) and ``val/`` (evaluation), standard preprocessing:
    resize to size / crop_pct, centre crop to the model's size, normalise with the model's mean/std."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    for split in ("train", "val"):
        if not (directory / split).is_dir():
            raise QcoreError(f"{directory} has no {split}/ folder; an ImageNet-style --data needs train/ and val/ "
                             "with one sub-folder per class")
    tf = transforms.Compose([transforms.Resize(int(round(spec.size / spec.crop_pct))),
                             transforms.CenterCrop(spec.size), transforms.ToTensor(),
                             transforms.Normalize(spec.mean, spec.std)])
    if spec.channels == 1:
        tf = transforms.Compose([transforms.Grayscale(1), tf])
    train, val = (_image_folder(directory / split, tf) for split in ("train", "val"))
    if train.classes != val.classes:
        raise QcoreError(f"{directory}: train/ and val/ have different class folders")
    idx = _pick(len(train), calib_size, seed)
    calib = [x for x, _ in _ReadImages(DataLoader(Subset(train, idx.tolist()), batch_size=batch,
                                                  num_workers=workers))]
    n_eval = len(val) if eval_size is None else min(eval_size, len(val))
    stream = _ReadImages(DataLoader(Subset(val, list(range(n_eval))), batch_size=batch, num_workers=workers))
    desc = {"calibration": f"{directory}/train: {len(idx)} images (seed {seed})",
            "evaluation": f"{directory}/val: {n_eval} images"}
    return ClassificationData(calib, stream, len(train.classes), desc)


def _read_image(path: str) -> Any:
    """torchvision's image loader, with an unreadable file named in a :class:`QcoreError`."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError (an OSError), cut-off files
        raise QcoreError(f"cannot read image {path} ({type(exc).__name__}); remove or replace it") from None


def _image_folder(root: Path, tf: Any) -> Any:
    """An ``ImageFolder`` of ``root``, whose class sub-folders must exist and hold images."""
    from torchvision import datasets

    if not any(p.is_dir() for p in root.iterdir()):
        raise QcoreError(f"{root} has no class folders; an ImageNet-style --data needs one sub-folder of images per "
                         "class in train/ and val/")
    try:
        return datasets.ImageFolder(str(root), transform=tf, loader=_read_image)
    except FileNotFoundError as exc:  # torchvision: a class folder without a single image file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise QcoreError(f"{root}: {first.split('. Supported')[0].replace('Found no valid file', 'no image')} "
                         "(.jpg, .png, ...); put images in every class folder or remove the empty ones") from None


@dataclass
class _ReadImages:
    """A ``DataLoader`` whose unreadable images end in one line naming the file (a worker process re-raises
    the :class:`QcoreError` of :func:`_read_image` with its whole traceback in the message)."""

    loader: Iterable[Any]

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        except QcoreError as exc:
            last = (str(exc).strip().splitlines() or [""])[-1]
            raise QcoreError(last.split("QcoreError: ", 1)[-1]) from None


def load_data(data: str | None, spec: InputSpec, calib_size: int, eval_size: int | None, batch: int,
              seed: int) -> ClassificationData:
    """Resolve ``--data``: None/"embedded", "torchvision:DIR", a Fashion-MNIST IDX folder, or an ImageNet folder."""
    if data in (None, "embedded"):
        return fashion_mnist_embedded(spec, calib_size, eval_size, batch, seed)
    if data.startswith("torchvision:"):
        return fashion_mnist_download(Path(data.split(":", 1)[1]), spec, calib_size, eval_size, batch, seed)
    path = Path(data)
    if path.exists() and not path.is_dir():
        raise QcoreError(f"--data {path} is a file, not a folder; pass an ImageNet-style folder (train/, val/), a "
                         "folder with the Fashion-MNIST IDX files, or omit --data for the embedded set")
    if not path.is_dir():
        raise QcoreError(f"data folder {path} does not exist; pass an ImageNet-style folder (train/, val/), a folder "
                         "with the Fashion-MNIST IDX files, or omit --data for the embedded set")
    if fm.has_idx_files(path):
        return fashion_mnist_idx(path, spec, calib_size, eval_size, batch, seed)
    return image_folder(path, spec, calib_size, eval_size, batch, seed)
