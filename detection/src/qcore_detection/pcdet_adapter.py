"""OpenPCDet adapter: ``qcore run --task detection --model pcdet:CFG.yaml --weights CKPT --data DIR``.

OpenPCDet (``pcdet``) is an optional dependency the user installs (it is not on PyPI and compiles CUDA ops), so
it is imported lazily (:func:`require_pcdet`). Everything is built through pcdet's own API as its
``tools/test.py`` does: ``cfg_from_yaml_file`` into a copy of ``pcdet.config.cfg``, ``build_dataloader`` (with
``dist=False``), ``build_network``; evaluation is the loop of ``tools/eval_utils/eval_utils.py::eval_one_epoch``.

Choices (see :func:`load_pcdet`):

* **Splits and augmentation.** An OpenPCDet dataset derives both from its ``training`` flag: ``mode`` is
  ``'train'``/``'test'``, the split is ``DATA_SPLIT[mode]`` and the info files ``INFO_PATH[mode]`` (KITTI, nuScenes,
  Waymo, Lyft, ONCE, ...), and ``training=True`` also turns on ``DATA_AUGMENTOR`` (gt sampling, flips,
  rotations), class-balanced resampling (nuScenes CBGS) and the train voxel limits. ``set_split`` does not reload
  the info files (KITTI), so it cannot switch a dataset to another split. Calibration data therefore come from a
  ``training=False`` dataset built from a copy of ``DATA_CONFIG`` whose ``'test'`` entries of ``DATA_SPLIT`` and
  ``INFO_PATH`` are replaced by the ``'train'`` ones: the train split, processed exactly like the evaluation data
  (no augmentation, test voxel limits). ``calib_size`` samples are drawn without replacement with
  ``numpy.random.default_rng(seed)``.
* **Determinism.** Some datasets draw from numpy's global RNG even in test mode (nuScenes picks random sweeps;
  ``shuffle_points`` may be on for ``'test'``). Calibration batches are loaded lazily with the global numpy RNG
  seeded per batch (its state is restored afterwards), so batch ``i`` is the same every time it is read;
  evaluation seeds it once per pass (and pcdet's ``worker_init_fn`` seeds workers with ``seed``).
* **Checkpoints.** ``Detector3DTemplate.load_params_from_file`` calls ``torch.load(filename, map_location=...)``
  without ``weights_only``, i.e. it unpickles arbitrary objects on torch < 2.6. The adapter loads the checkpoint
  itself with ``torch.load(path, map_location="cpu", weights_only=True)`` and hands ``checkpoint["model_state"]``
  to the model's ``_load_state_dict(state, strict=False)``, the method ``load_params_from_file`` calls after
  loading (it adapts spconv 1.x weight layouts and skips mismatching keys); models without it get
  ``load_state_dict(state)``.
* **The model's dataset.** ``Detector3DTemplate`` keeps the dataset it was built from (``model.dataset``), which
  holds spconv's compiled voxel generators and a logger: neither can be deep-copied, and qcore deep-copies the FP
  model. The adapter makes copies of the model share that dataset (:func:`share_in_copies`): it is data the
  model was configured from, not model state.
* **Biases of spconv layers.** OpenPCDet builds ``SparseBasicBlock`` convolutions (with BatchNorm) and the head
  output convolutions with ``bias=True``; spconv's CPU kernels refuse a bias in eval mode. After loading the
  weights, the adapter moves those biases outside the convolutions
  (:func:`~qcore_detection.spconv_layers.move_bias_outside`, the embedded model's handling).
* **Early errors.** Before any data is read, an evaluation the adapter cannot read (Waymo's or Argo2's own
  metrics, ...) is refused (:func:`check_eval_metric`), and nuScenes' database tables are looked for
  (:func:`check_nuscenes_database`); on ``--device cpu``, one calibration batch is run before the FP evaluation so
  that a model whose forward needs CUDA (OpenPCDet's NMS is a compiled CUDA op) fails at once, with the fix.
* **First/last layers.** Detectors have one output layer per head branch (VoxelNeXt on nuScenes: 6 heads x 6
  branches = 36): all of them are the "last" layers ``-o first_last`` pins (:func:`head_output_layers`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch
from torch import Tensor, nn

from qcore import MissingDependencyError, QcoreError, module_device, track
from qcore_detection.setup import TARGETS, DetectionSetup
from qcore_detection.spconv_layers import is_spconv_layer, move_bias_outside, spconv_cpu_guard

if TYPE_CHECKING:
    from qcore import RunConfig

log = logging.getLogger(__name__)

#: how to install OpenPCDet (one line, shown when ``pcdet`` cannot be imported)
INSTALL_HINT = ("git clone https://github.com/open-mmlab/OpenPCDet && cd OpenPCDet && pip install -r requirements.txt "
                "&& python setup.py develop  (not on PyPI; compiles CUDA ops, needs a matching CUDA toolkit)")

#: numpy keys of a batch_dict that ``pcdet.models.load_data_to_gpu`` leaves as they are
PASSTHROUGH_KEYS: frozenset[str] = frozenset(
    {"frame_id", "metadata", "calib", "image_paths", "ori_shape", "img_process_infos"})

#: per-mode entries of ``DATA_CONFIG`` that choose a dataset's split (switched to ``'train'`` for calibration)
SPLIT_KEYS: tuple[str, ...] = ("DATA_SPLIT", "INFO_PATH")

_KITTI_MODERATE_3D = re.compile(r"^(?P<cls>.+)_3d/moderate_R40$")

#: datasets whose ``evaluation`` gives results :func:`normalize_metrics` reads whatever ``EVAL_METRIC`` says
#: (KITTI: its own AP; nuScenes: mAP/NDS); other datasets need ``EVAL_METRIC: kitti``
EVAL_ANY_METRIC: frozenset[str] = frozenset({"KittiDataset", "NuScenesDataset"})
#: datasets whose evaluation is their own format only (Argo2's av2 metrics, ONCE's AP): not readable
EVAL_UNSUPPORTED: frozenset[str] = frozenset({"Argo2Dataset", "ONCEDataset"})

#: modules of an OpenPCDet detector that hold its output heads
HEAD_MODULES: tuple[str, ...] = ("dense_head", "point_head", "roi_head")
#: OpenPCDet's names of head output branches: anchor heads (``conv_cls``, ``conv_box``, ``conv_dir_cls``), point
#: heads (``cls_layers``, ``box_layers``, ``part_reg_layers``), RoI heads (``cls_layers``, ``reg_layers``); the
#: branches of ``SeparateHead`` (CenterHead, VoxelNeXtHead) are the children of ``heads_list.<i>``
OUTPUT_BRANCHES: frozenset[str] = frozenset(
    {"conv_cls", "conv_box", "conv_dir_cls", "cls_layers", "box_layers", "reg_layers", "part_reg_layers"})

#: what an error raised by a forward that needs CUDA says (a compiled op's CHECK_CUDA, ``.cuda()`` without a
#: driver or a CUDA build, tensors left on two devices)
_NEEDS_CUDA = re.compile(r"cuda|nvidia driver|same device", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ import


def require_pcdet() -> ModuleType:
    """Import OpenPCDet (``pcdet`` with ``pcdet.config``, ``pcdet.datasets``, ``pcdet.models``) and return
    ``pcdet``; a :class:`~qcore.QcoreError` with the install hint when that fails."""
    try:
        import pcdet
        import pcdet.config
        import pcdet.datasets
        import pcdet.models
    except ImportError as exc:
        if exc.name in (None, "pcdet"):
            raise MissingDependencyError("OpenPCDet (pcdet)", INSTALL_HINT, "--model pcdet:CFG.yaml") from exc
        raise QcoreError(f"OpenPCDet (pcdet) is installed but fails to import ({exc}); build it completely: "
                         f"{INSTALL_HINT}") from exc
    return pcdet


# ------------------------------------------------------------------------------------------------ batches


def batch_to_torch(batch_dict: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A copy of ``batch_dict`` with its arrays as tensors on ``device``, converted as
    ``pcdet.models.load_data_to_gpu`` does (but onto any device, and without touching ``batch_dict``).

    numpy arrays become float32 tensors, except ``image_shape`` (int32), ``images`` ([B, H, W, C] -> float
    [B, C, H, W], as ``kornia.image_to_tensor``) and the keys in :data:`PASSTHROUGH_KEYS` (kept); tensors
    (``camera_imgs``, or batches converted before) are moved to ``device``; anything else (``batch_size``, lists
    of frame ids) and non-numeric arrays are kept.
    """
    device = torch.device(device)
    out: dict[str, Any] = {}
    for key, val in batch_dict.items():
        if isinstance(val, Tensor):
            out[key] = val.to(device)
        elif not isinstance(val, np.ndarray) or key in PASSTHROUGH_KEYS or val.dtype.kind in "OSUV":
            out[key] = val
        elif key == "images":
            out[key] = torch.from_numpy(val).permute(0, 3, 1, 2).float().contiguous().to(device)
        elif key == "image_shape":
            out[key] = torch.from_numpy(val).int().to(device)
        else:
            out[key] = torch.from_numpy(val).float().to(device)
    return out


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's and Python's global RNGs inside the block and restore their states after it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class PcdetBatches(Sequence[dict[str, Any]]):
    """Batches of chosen samples of an OpenPCDet dataset, loaded on access (``dataset[i]`` then
    ``dataset.collate_batch``) and converted with :func:`batch_to_torch` to CPU tensors.

    Batch ``i`` is loaded with numpy's global RNG seeded from ``(seed, i)``, so it is the same every time.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset, self.indices, self.batch_size, self.seed = dataset, list(indices), int(batch_size), int(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        chosen = self.indices[index * self.batch_size:(index + 1) * self.batch_size]
        with _seeded_numpy(self.seed * 1_000_003 + index):
            batch = self.dataset.collate_batch([self.dataset[i] for i in chosen])
        return batch_to_torch(batch, "cpu")


def _select_samples(dataset: Any, indices: Sequence[int]) -> None:
    """Keep only ``indices`` of ``dataset`` (in that order) by cutting its info list(s) (``infos``,
    ``kitti_infos``, ``once_infos``, ...: every list attribute named ``*infos`` as long as the dataset), so that
    ``len(dataset)`` and the ground truth ``dataset.evaluation`` reads agree with the kept samples."""
    n = len(dataset)
    names = [k for k, v in vars(dataset).items() if k.endswith("infos") and isinstance(v, list) and len(v) == n]
    for name in names:
        infos = getattr(dataset, name)
        setattr(dataset, name, [infos[i] for i in indices])
    if len(dataset) != len(indices):
        raise QcoreError(f"cannot take a subset of {type(dataset).__name__} (no info list found): run without "
                         f"--eval-size to evaluate the whole split")


# ------------------------------------------------------------------------------------------------ targets


def _run(model: nn.Module, batch_dict: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Run ``model`` on a converted copy of ``batch_dict`` (on the model's device); returns that copy (which the
    modules filled) and the model's output."""
    device = module_device(model)
    batch = batch_to_torch(batch_dict, device)
    with spconv_cpu_guard(device):
        out = model(batch)
    return batch, out


def _dense_head_outputs(model: nn.Module) -> Tensor | None:
    """The raw outputs an OpenPCDet dense head kept in ``forward_ret_dict`` during the last forward pass:
    ``pred_dicts`` (``CenterHead``: dense [B, k, H, W] per branch; ``VoxelNeXtHead``: sparse [N_active, k]) with
    all branches of all head groups concatenated along dim 1, or ``cls_preds``/``box_preds``/``dir_cls_preds``
    (anchor heads, [B, H, W, k]) concatenated along the last dim. None if the head keeps neither."""
    head = getattr(model, "dense_head", None)
    stored = getattr(head, "forward_ret_dict", None)
    if not isinstance(stored, dict):
        return None
    groups = stored.get("pred_dicts")
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        parts = [t for g in groups for t in g.values() if isinstance(t, Tensor)]
        return torch.cat(parts, dim=1) if parts else None
    if isinstance(stored.get("cls_preds"), Tensor) and isinstance(stored.get("box_preds"), Tensor):
        parts = [stored[k] for k in ("cls_preds", "box_preds", "dir_cls_preds") if isinstance(stored.get(k), Tensor)]
        return torch.cat(parts, dim=-1)
    return None


def densify(sparse: Any) -> Tensor:
    """A spconv ``SparseConvTensor`` (indices (b, *spatial)) as a dense ``[B, C, *spatial_shape]`` tensor, zeros
    where no site is active (what ``SparseConvTensor.dense()`` gives, without its deprecated indexing)."""
    features = sparse.features
    dense = features.new_zeros(int(sparse.batch_size), *(int(n) for n in sparse.spatial_shape), features.shape[1])
    dense[tuple(sparse.indices.long().t())] = features
    return dense.movedim(-1, 1)


def bev_target(model: nn.Module, batch_dict: dict[str, Any]) -> Tensor:
    """Dense BEV features of the backbone for ``batch_dict``: ``encoded_spconv_tensor`` densified
    (``[B, C, *spatial]``; VoxelNeXt: a 2-D sparse tensor -> [B, C, H, W]) if the model sets it, else
    ``spatial_features_2d``. Runs the model on a copy of the batch; the result is on the model's device."""
    batch, _ = _run(model, batch_dict)
    encoded = batch.get("encoded_spconv_tensor")
    if encoded is not None:
        return densify(encoded)
    if isinstance(batch.get("spatial_features_2d"), Tensor):
        return batch["spatial_features_2d"]
    raise QcoreError(f"{type(model).__name__} sets neither encoded_spconv_tensor nor spatial_features_2d: the "
                     f"'bev' distortion target needs one of them")


def head_target(model: nn.Module, batch_dict: dict[str, Any]) -> Tensor:
    """The dense head's raw outputs for ``batch_dict``: qcore's ``VoxelNeXtLite`` (``head_outputs``), or an
    OpenPCDet head that keeps them in ``dense_head.forward_ret_dict`` (``VoxelNeXtHead``, ``CenterHead``, anchor
    heads; see :func:`_dense_head_outputs`). Runs the model on a copy of the batch."""
    batch, _ = _run(model, batch_dict)
    if "head_outputs" in batch:
        from qcore_detection.model import head_outputs

        return head_outputs(batch)
    outputs = _dense_head_outputs(model)
    if outputs is None:
        raise QcoreError(f"the 'head' distortion target is only supported for models whose dense head stores its "
                         f"raw outputs (VoxelNeXtHead, CenterHead, anchor heads); {type(model).__name__} does not: "
                         f"use the option target=bev")
    return outputs


TARGET_FUNCTIONS: dict[str, Callable[[nn.Module, dict[str, Any]], Tensor]] = {"bev": bev_target, "head": head_target}


def make_target(kind: str = "bev") -> Callable[[nn.Module, dict[str, Any]], Tensor]:
    """The ``target(model, batch_dict) -> Tensor`` function of distortion target ``kind`` (one of
    :data:`~qcore_detection.setup.TARGETS`): :func:`bev_target` or :func:`head_target`."""
    if kind not in TARGET_FUNCTIONS:
        raise QcoreError(f"unknown detection target {kind!r}; expected one of {TARGETS}")
    return TARGET_FUNCTIONS[kind]


# ------------------------------------------------------------------------------------------------ evaluation


def normalize_metrics(result_dict: dict[str, Any]) -> dict[str, float]:
    """The float metrics of an OpenPCDet ``dataset.evaluation`` result with the headline ``mAP`` (percent).

    * nuScenes (``format_nuscene_results``: ``mAP``, ``NDS`` as fractions, error metrics ``mATE`` ...): ``mAP`` and
      ``NDS`` are scaled to percent; the errors are kept as they are.
    * KITTI-style (``get_official_eval_result``, also Waymo/Lyft with ``EVAL_METRIC: kitti``; percent):
      ``mAP`` is the mean over classes of the moderate 3D AP with 40 recall points (``<cls>_3d/moderate_R40``),
      also given as ``AP/<cls>``.

    Other results raise a :class:`~qcore.QcoreError` naming their keys.
    """
    metrics: dict[str, float] = {}
    for key, val in result_dict.items():
        try:
            arr = np.asarray(val, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.size == 1:
            metrics[str(key)] = float(arr.reshape(-1)[0])
    if "mAP" in metrics and "NDS" in metrics:
        metrics["mAP"] *= 100.0
        metrics["NDS"] *= 100.0
        return metrics
    moderate = {m["cls"]: v for k, v in metrics.items() if (m := _KITTI_MODERATE_3D.match(k))}
    if moderate:
        for cls, v in moderate.items():
            metrics[f"AP/{cls}"] = v
        metrics["mAP"] = float(np.mean(list(moderate.values())))
        return metrics
    raise QcoreError(f"OpenPCDet's evaluation returned no metric qcore uses as headline (keys: "
                     f"{sorted(metrics) or 'none'}); supported: nuScenes (mAP, NDS) and KITTI-style "
                     f"(<class>_3d/moderate_R40; set MODEL.POST_PROCESSING.EVAL_METRIC: kitti)")


def evaluate_pcdet(model: nn.Module, dataset: Any, loader: Any, class_names: Sequence[str],
                   device: torch.device | str, output_dir: Path | None = None, *, eval_metric: str = "kitti",
                   seed: int = 0) -> dict[str, float]:
    """Evaluate ``model`` as ``tools/eval_utils/eval_utils.py::eval_one_epoch`` does: forward every batch of
    ``loader`` (eval mode, no grad), ``dataset.generate_prediction_dicts(batch_dict, pred_dicts, class_names,
    output_path=None)``, then ``dataset.evaluation(det_annos, class_names, eval_metric=..., output_path=...)``.

    :param output_dir: where the dataset's evaluation writes its files (nuScenes: results and metrics JSON); a
        temporary folder, deleted afterwards, when None.
    :param eval_metric: ``cfg.MODEL.POST_PROCESSING.EVAL_METRIC``.
    :param seed: numpy's global RNG is seeded with it for the pass (and restored after).
    :returns: the float metrics with ``mAP`` in percent (see :func:`normalize_metrics`).
    """
    model.eval()
    det_annos: list[dict[str, Any]] = []
    with _seeded_numpy(seed):
        for batch in track(loader, desc="pcdet eval", unit="batch", total=len(loader)):
            batch = batch_to_torch(batch, device)
            with torch.no_grad(), spconv_cpu_guard(device):
                pred_dicts, _ = model(batch)
            det_annos += dataset.generate_prediction_dicts(batch, pred_dicts, class_names, output_path=None)
    log.info("pcdet evaluation: %d samples, %.2f predicted objects per sample", len(det_annos),
             sum(len(a["name"]) for a in det_annos) / max(1, len(det_annos)))
    with contextlib.ExitStack() as stack:
        out = output_dir if output_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        try:
            result_str, result_dict = dataset.evaluation(det_annos, list(class_names), eval_metric=eval_metric,
                                                         output_path=out)
        except AssertionError as exc:
            if "database version not found" in str(exc).lower():
                raise QcoreError(f"{type(dataset).__name__}.evaluation failed ({exc}): the nuScenes devkit reads its "
                                 f"database tables (the {_nuscenes_version(dataset)}/*.json files of the nuScenes "
                                 f"download) from that folder: put them there") from exc
            raise QcoreError(f"{type(dataset).__name__}.evaluation failed ({exc or 'assertion'}); some official "
                             f"evaluations (nuScenes) need predictions for the whole split: run without "
                             f"--eval-size") from exc
    if result_str:
        log.info("%s", result_str)
    return normalize_metrics(result_dict or {})


# ------------------------------------------------------------------------------------------------ checks


def check_eval_metric(dataset_name: str, eval_metric: str) -> None:
    """Refuse, before anything is built, an evaluation whose result :func:`normalize_metrics` cannot read: KITTI
    and nuScenes datasets always work, Argo2 and ONCE never, any other dataset (Waymo, Lyft, Pandaset, custom)
    with ``EVAL_METRIC: kitti`` only."""
    if dataset_name in EVAL_ANY_METRIC or (eval_metric == "kitti" and dataset_name not in EVAL_UNSUPPORTED):
        return
    if dataset_name in EVAL_UNSUPPORTED:
        raise QcoreError(f"{dataset_name}'s evaluation is not supported (qcore reads nuScenes mAP/NDS and KITTI-style "
                         f"3-D AP): evaluate a model of a KITTI, nuScenes, Waymo or Lyft config")
    raise QcoreError(f"{dataset_name} with EVAL_METRIC {eval_metric!r} is not supported (qcore reads nuScenes "
                     f"mAP/NDS and KITTI-style 3-D AP): set MODEL.POST_PROCESSING.EVAL_METRIC: kitti in the config")


def _nuscenes_version(dataset: Any) -> str:
    return str(getattr(dataset, "dataset_cfg", {}).get("VERSION", "v1.0-trainval"))


def check_nuscenes_database(dataset: Any) -> None:
    """nuScenes' official evaluation (``NuScenesDataset.evaluation``) opens the devkit's database: check, before
    the FP pass, that the devkit is installed and its tables (``<DATA_PATH>/<VERSION>/<VERSION>/*.json``: the
    dataset's ``root_path`` already ends in ``VERSION``) are there. Other datasets are not checked."""
    if type(dataset).__name__ != "NuScenesDataset":
        return
    import importlib.util

    if importlib.util.find_spec("nuscenes") is None:
        raise MissingDependencyError("nuscenes-devkit", "pip install nuscenes-devkit", "nuScenes evaluation")
    version = _nuscenes_version(dataset)
    tables = Path(dataset.root_path) / version
    if not tables.is_dir():
        raise QcoreError(f"nuScenes database tables {tables} not found; the official evaluation reads them: put "
                         f"the {version}/ folder of JSON tables from the nuScenes download (metadata) under "
                         f"{dataset.root_path}")


def check_device(model: nn.Module, batch_dict: dict[str, Any], device: str) -> None:
    """On a CPU ``device``, run ``model`` on one batch and turn a failure that says the forward needs CUDA (a
    compiled CUDA op such as OpenPCDet's ``iou3d_nms`` NMS, a ``.cuda()`` call) into a one-line
    :class:`~qcore.QcoreError` with the fix; other failures pass unchanged. Nothing is run on other devices."""
    if torch.device(device).type != "cpu":
        return
    try:
        with torch.no_grad():
            _run(model, batch_dict)
    except Exception as exc:
        if not _NEEDS_CUDA.search(str(exc)):
            raise
        first = str(exc).strip().splitlines()[0]
        raise QcoreError(f"{type(model).__name__} needs CUDA in its forward ({type(exc).__name__}: {first}); "
                         f"OpenPCDet's post-processing (NMS) and some heads run compiled CUDA ops: run with "
                         f"--device cuda on a machine with a GPU") from exc


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s convolutions, linear layers and spconv convolutions, in registration order."""
    dense = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, m in model.named_modules() if n and (isinstance(m, dense) or is_spconv_layer(m))]


def head_output_layers(names: Sequence[str]) -> tuple[str, ...]:
    """The output layer of every head branch among the layer ``names`` (registration order), for ``-o
    first_last``: under ``dense_head``/``point_head``/``roi_head``, each branch is a child of ``heads_list.<i>``
    (``SeparateHead`` of CenterHead/VoxelNeXtHead: ``hm``, ``center``, ``dim``, ...) or a module named in
    :data:`OUTPUT_BRANCHES`; its last layer is the output layer. VoxelNeXt (nuScenes): 36 layers
    ``dense_head.heads_list.{0..5}.{hm,center,center_z,dim,rot,vel}.1``; PV-RCNN: ``dense_head.conv_cls``,
    ``conv_box``, ``conv_dir_cls``, the last of ``point_head.cls_layers``, ``roi_head.cls_layers`` and
    ``roi_head.reg_layers``."""
    branches: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        if parts[0] not in HEAD_MODULES:
            continue
        for i, part in enumerate(parts):
            end = i + 2 if part == "heads_list" and i + 2 < len(parts) else i if part in OUTPUT_BRANCHES else None
            if end is not None:
                branches[".".join(parts[:end + 1])] = name  # a later layer of the branch replaces an earlier one
                break
    return tuple(branches.values())


def share_in_copies(obj: Any) -> Any:
    """Make ``copy.deepcopy`` of anything holding ``obj`` share ``obj`` instead of copying it (an instance-level
    ``__deepcopy__`` returning ``obj``); returns ``obj``. Used for the dataset an OpenPCDet detector keeps."""
    try:
        object.__setattr__(obj, "__deepcopy__", lambda memo: obj)
    except (AttributeError, TypeError) as exc:
        raise QcoreError(f"cannot share {type(obj).__name__} between copies of the model ({exc})") from exc
    return obj


def adapt_model(model: nn.Module) -> list[str]:
    """What :func:`load_pcdet` does to a built OpenPCDet detector, after loading its weights, so that qcore can
    copy it and run it on CPU: its ``dataset`` is shared by copies (:func:`share_in_copies`) and the biases of
    its spconv layers move outside the convolutions (:func:`~qcore_detection.spconv_layers.move_bias_outside`).
    Apply it to a freshly built FP model before ``qcore.load_quantized(path, model)`` of a ``.qcore`` file
    written from a ``pcdet:`` run. Returns the layers whose bias moved (none the second time)."""
    if getattr(model, "dataset", None) is not None:
        share_in_copies(model.dataset)
    moved = move_bias_outside(model)
    if moved:
        log.info("%d spconv layers with a bias run bias-free, the bias added to their outputs (e.g. %s)",
                 len(moved), moved[0])
    return moved


# ------------------------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    """``os.chdir`` into ``folder`` for the block (``contextlib.chdir`` needs Python 3.11)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _base_configs(tree: Any) -> list[str]:
    """All ``_BASE_CONFIG_`` values in a parsed yaml (pcdet's ``merge_new_config`` honours them at any level)."""
    if not isinstance(tree, dict):
        return []
    found = [str(tree["_BASE_CONFIG_"])] if "_BASE_CONFIG_" in tree else []
    for val in tree.values():
        found += _base_configs(val)
    return found


def _config_dir(cfg_file: Path, bases: list[str]) -> Path:
    """The folder the relative ``_BASE_CONFIG_`` paths resolve from: the current one or the nearest parent of
    ``cfg_file`` (OpenPCDet's configs name them relative to its ``tools/``, where its scripts run)."""
    for folder in (Path.cwd(), *cfg_file.parents):
        if all((folder / b).is_file() for b in bases):
            return folder
    raise QcoreError(f"{cfg_file} names base config(s) {bases} that are not found from the current folder or any "
                     f"folder above the config: keep the config inside OpenPCDet's tools/cfgs tree or make "
                     f"_BASE_CONFIG_ an absolute path")


def load_config(pcdet: ModuleType, cfg_file: Path) -> tuple[Any, Path]:
    """Read an OpenPCDet model config with ``pcdet.config.cfg_from_yaml_file`` into a copy of
    ``pcdet.config.cfg`` (so runs in one process do not mix configs). Returns the config and the folder its
    relative paths (``_BASE_CONFIG_``, ``DATA_PATH``) are read from."""
    import yaml

    cfg_file = cfg_file.resolve()
    try:
        tree = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise QcoreError(f"cannot read OpenPCDet config {cfg_file}: {exc}") from exc
    bases = _base_configs(tree)
    folder = _config_dir(cfg_file, bases) if bases else Path.cwd()
    cfg = copy.deepcopy(pcdet.config.cfg)
    try:
        with _working_dir(folder):
            pcdet.config.cfg_from_yaml_file(str(cfg_file), cfg)
    except (OSError, yaml.YAMLError) as exc:
        raise QcoreError(f"cannot read OpenPCDet config {cfg_file}: {exc}") from exc
    missing = [k for k in ("CLASS_NAMES", "DATA_CONFIG", "MODEL") if k not in cfg]
    if missing:
        raise QcoreError(f"{cfg_file} is not an OpenPCDet model config (no {', '.join(missing)}): pass a model "
                         f"config such as tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml")
    return cfg, folder


def train_split_config(data_config: Any) -> Any:
    """A copy of ``DATA_CONFIG`` whose ``'test'`` entries of ``DATA_SPLIT``/``INFO_PATH`` are the ``'train'``
    ones: a ``training=False`` dataset built from it reads the train split without augmentation."""
    switched = copy.deepcopy(data_config)
    keys = [k for k in SPLIT_KEYS if isinstance(switched.get(k), dict) and "train" in switched[k]]
    if not keys:
        raise QcoreError("cannot select the train split for calibration: DATA_CONFIG has neither DATA_SPLIT nor "
                         "INFO_PATH with a 'train' entry")
    for k in keys:
        switched[k]["test"] = copy.deepcopy(switched[k]["train"])
    return switched


def _split_name(data_config: Any, mode: str) -> str:
    split = data_config.get("DATA_SPLIT")
    if isinstance(split, dict) and mode in split:
        return str(split[mode])
    info = data_config.get("INFO_PATH")
    return str(list(info[mode])) if isinstance(info, dict) and mode in info else mode


def load_weights(model: nn.Module, weights: Path) -> None:
    """Load an OpenPCDet checkpoint (``{"model_state": ..., ...}`` or a bare state dict) safely:
    ``torch.load(weights, map_location="cpu", weights_only=True)``, then the model's ``_load_state_dict(state,
    strict=False)`` (what ``load_params_from_file`` does after its unrestricted ``torch.load``) or, for models
    without it, ``load_state_dict(state)``."""
    try:
        with warnings.catch_warnings():  # a raw pickle is refused below; torch's note on its protocol is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals, corrupt archives, random bytes: all one error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QcoreError(f"cannot load {weights} with torch.load(weights_only=True) ({first}); qcore loads weights "
                         f"only: re-save them with torch.save({{'model_state': model.state_dict()}}, path)") from exc
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise QcoreError(f"{weights} holds no state dict (expected an OpenPCDet checkpoint with 'model_state')")
    if callable(getattr(model, "_load_state_dict", None)):
        full, updated = model._load_state_dict(state, strict=False)
        if not updated:
            raise QcoreError(f"no weight of {weights} fits the model built from the config: check that the "
                             f"checkpoint belongs to this config")
        skipped = [k for k in full if k not in updated]
        if skipped:
            log.warning("%d of %d model tensors not in %s (kept as initialised), e.g. %s", len(skipped), len(full),
                        weights, ", ".join(skipped[:5]))
        log.info("loaded %d/%d tensors from %s", len(updated), len(full), weights)
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise QcoreError(f"{weights} does not fit the model built from the config: {exc}") from exc


def load_pcdet(cfg_file: Path, weights: Path | None, data_dir: Path | None, calib_size: int, eval_size: int | None,
               batch_size: int, seed: int, device: str, target: str = "bev", *, workers: int = 4,
               output_dir: Path | None = None) -> DetectionSetup:
    """An OpenPCDet detector with calibration and evaluation data, built through pcdet's own API.

    :param cfg_file: the model config (``tools/cfgs/<dataset>_models/<model>.yaml``); relative
        ``_BASE_CONFIG_`` paths are resolved from the current folder or the nearest folder above the config.
    :param weights: the checkpoint (loaded with ``weights_only=True``, see :func:`load_weights`).
    :param data_dir: replaces ``DATA_CONFIG.DATA_PATH`` (passed as ``root_path`` to ``build_dataloader``; the
        dataset classes append their own sub-folders, e.g. nuScenes its ``VERSION``). None: ``DATA_PATH``,
        relative to the folder of the config's ``_BASE_CONFIG_`` paths (OpenPCDet's ``tools/``).
    :param calib_size: samples of the train split for calibration (see the module docstring).
    :param eval_size: evaluate on the first ``eval_size`` samples of the test split (all when None).
    :param batch_size: of calibration and evaluation batches.
    :param seed: selects the calibration samples and seeds the data loading.
    :param device: where the model and evaluation run; calibration batches are CPU tensors.
    :param target: distortion target, ``"bev"`` or ``"head"`` (:data:`~qcore_detection.setup.TARGETS`).
    :param workers: data-loader workers of the evaluation loader.
    :param output_dir: where ``dataset.evaluation`` writes its files (a temporary folder when None).
    """
    target_fn = make_target(target)
    if calib_size < 1 or batch_size < 1 or (eval_size is not None and eval_size < 1):
        raise QcoreError("calib_size, batch_size and eval_size must be positive")
    cfg_file = Path(cfg_file).expanduser()
    if not cfg_file.is_file():
        raise QcoreError(f"OpenPCDet config {cfg_file} not found: pass --model pcdet:PATH/TO/MODEL.yaml")
    if weights is None:
        raise QcoreError("an OpenPCDet model needs its checkpoint: pass --weights PATH/TO/CKPT.pth")
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise QcoreError(f"checkpoint {weights} not found: pass --weights PATH/TO/CKPT.pth")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise QcoreError(f"data folder {data_dir} not found: pass --data with the dataset root OpenPCDet's "
                         f"DATA_PATH would name (e.g. data/nuscenes, data/kitti)")

    pcdet = require_pcdet()
    cfg, folder = load_config(pcdet, cfg_file)
    if data_dir is not None:
        root = Path(data_dir).expanduser().resolve()
    else:
        data_path = cfg.DATA_CONFIG.get("DATA_PATH")
        root = (folder / str(data_path)).resolve() if data_path else None
        if root is None or not root.is_dir():
            raise QcoreError(f"data folder {root or '(none)'} (DATA_CONFIG.DATA_PATH of {cfg_file.name}) not "
                             f"found: pass --data with the dataset root")
    cfg.DATA_CONFIG.DATA_PATH = str(root)
    class_names = list(cfg.CLASS_NAMES)
    eval_metric = str(cfg.MODEL.get("POST_PROCESSING", {}).get("EVAL_METRIC", "kitti"))
    check_eval_metric(str(cfg.DATA_CONFIG.get("DATASET", "")), eval_metric)

    def build(dataset_cfg: Any, what: str) -> tuple[Any, Any]:
        dataset, loader, _ = pcdet.datasets.build_dataloader(
            dataset_cfg=dataset_cfg, class_names=class_names, batch_size=batch_size, dist=False, root_path=root,
            workers=workers, seed=seed, logger=log, training=False)
        if len(dataset) == 0:
            raise QcoreError(f"the {what} split of {type(dataset).__name__} under {root} has no samples: check "
                             f"--data and that OpenPCDet's info files (create_*_infos) exist there")
        return dataset, loader

    eval_set, eval_loader = build(cfg.DATA_CONFIG, f"test ({_split_name(cfg.DATA_CONFIG, 'test')})")
    check_nuscenes_database(eval_set)
    if eval_size is not None and eval_size < len(eval_set):
        if type(eval_set).__name__ == "NuScenesDataset":
            log.warning("nuScenes' official evaluation needs the whole split; --eval-size %d will make it fail",
                        eval_size)
        _select_samples(eval_set, range(eval_size))
    train_cfg = train_split_config(cfg.DATA_CONFIG)
    calib_set, _ = build(train_cfg, f"train ({_split_name(cfg.DATA_CONFIG, 'train')})")
    n_calib = min(calib_size, len(calib_set))
    if n_calib < calib_size:
        log.warning("calib_size %d > %d samples in the train split: using all of them", calib_size, n_calib)
    chosen = np.sort(np.random.default_rng(seed).choice(len(calib_set), size=n_calib, replace=False)).tolist()
    calibration = PcdetBatches(calib_set, chosen, batch_size, seed)

    model = pcdet.models.build_network(model_cfg=cfg.MODEL, num_class=len(class_names), dataset=eval_set)
    load_weights(model, weights)
    adapt_model(model)
    model = model.to(device).eval()
    check_device(model, calibration[0], device)
    last_layers = head_output_layers(quantizable_names(model))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_pcdet(m, eval_set, eval_loader, class_names, module_device(m), output_dir,
                              eval_metric=eval_metric, seed=seed)

    dataset_name = type(eval_set).__name__
    log.info("pcdet %s: %d calibration samples (train split), %d evaluation samples", cfg_file.stem, n_calib,
             len(eval_set))
    return DetectionSetup(
        model=model, name=f"pcdet:{cfg_file.stem}", class_names=tuple(class_names), calibration=calibration,
        evaluate=evaluate, target=target_fn, metric="mAP",
        data={"calibration": f"{n_calib} samples of the train split ({_split_name(cfg.DATA_CONFIG, 'train')}) of "
                             f"{dataset_name} at {root}, drawn with seed {seed}, without augmentation",
              "evaluation": f"{'first ' if eval_size else ''}{len(eval_set)} samples of the test split "
                            f"({_split_name(cfg.DATA_CONFIG, 'test')}) of {dataset_name} at {root}",
              "weights": str(weights),
              "target": f"distortion target for allocators: {target}"},
        last_layers=last_layers)


def load(name: str, weights: Path | None, config: RunConfig) -> DetectionSetup:
    """``ModelLoader`` entry for ``--model pcdet:PATH.yaml``: :func:`load_pcdet` with ``--data``, calibration
    and evaluation sizes, batch size, seed and device of ``config`` and its options ``target`` (``bev``/``head``,
    default ``bev``) and ``workers`` (default 4). The dataset's evaluation files go to ``<out>/pcdet_eval``."""
    options = config.options or {}
    return load_pcdet(Path(name), weights, Path(config.data) if config.data else None, config.calib_size,
                      config.eval_size, config.batch_size, config.seed, config.device,
                      target=str(options.get("target", "bev")), workers=int(options.get("workers", 4)),
                      output_dir=Path(config.out) / "pcdet_eval" if config.out else None)
