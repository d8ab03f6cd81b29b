"""The OpenPCDet adapter against a fake ``pcdet`` package (CI has no OpenPCDet).

The fake mimics the real signatures and behaviour the adapter relies on (read from OpenPCDet's source):
``pcdet.config.cfg_from_yaml_file(cfg_file, config)`` (``_BASE_CONFIG_`` opened relative to the current folder),
``pcdet.datasets.build_dataloader(dataset_cfg, class_names, batch_size, dist, root_path=None, workers=4,
seed=None, logger=None, training=True, ...) -> (dataset, loader, sampler)``, datasets whose split and info files
follow ``'train' if training else 'test'``, that augment only when ``training`` and draw from numpy's global RNG
even in test mode, whose ``collate_batch`` gives numpy batch dicts and which implement
``generate_prediction_dicts`` and ``evaluation`` (nuScenes-style fractions ``mAP``/``NDS``), and
``pcdet.models.build_network(model_cfg, num_class, dataset)`` returning a small VoxelNeXt with pcdet's
``_load_state_dict``.

Where a real OpenPCDet model failed in qcore (issue 19) the fake behaves like it: the detector keeps its dataset
(``self.dataset``, holding an unpicklable voxel generator), builds ``SparseBasicBlock`` and head output convs with
``bias=True`` (spconv's CPU kernels refuse them in eval mode), names its modules ``backbone_3d.*`` and
``dense_head.heads_list.<i>.<branch>.*`` (one head per class group), and predicts through ``nms_gpu(boxes,
scores, thresh) -> (keep, None)`` (``pcdet.ops.iou3d_nms.iou3d_nms_utils``), whose compiled op refuses CPU
tensors and whose result is moved with ``.cuda()``; the module's fixture lets that op run on CPU, as the real
one runs on a GPU machine.
"""

from __future__ import annotations

import copy
import json
import sys
import types
import warnings
from collections import defaultdict
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
import yaml
from torch import nn

from qcore import QcoreError, RunConfig
from qcore_detection import pcdet_adapter as pa
from qcore_detection.head import decode_boxes
from qcore_detection.metric import detection_ap
from qcore_detection.model import sparse_height_compression
from qcore_detection.setup import DetectionSetup
from qcore_detection.spconv_layers import OUTSIDE_BIAS, spconv_cpu_guard
from qcore_detection.synthetic import CLASS_NAMES, Scene, SceneConfig, SensorConfig, SyntheticSplit
from qcore_detection.voxelize import VoxelConfig, voxel_indices, voxelize

RANGE = [-12.8, -12.8, -2.2, 12.8, 12.8, 2.6]  # 128 x 128 x 24 voxels of 0.2 m -> 16 x 16 BEV at stride 8
VOXEL = [0.2, 0.2, 0.2]
SCENES = SceneConfig(half_extent=11.0, object_counts=((2, 4), (1, 3), (1, 2)), walls=(0, 1), poles=(1, 3),
                     bushes=(1, 3))
SENSOR = SensorConfig(beams=16, azimuth_steps=256, max_range=16.0)
N_TRAIN, N_VAL = 6, 4


# ------------------------------------------------------------------------------------------------ fake pcdet


class AttrDict(dict):
    """What EasyDict gives pcdet: a dict with attribute access."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo: dict) -> AttrDict:
        return AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})


def _attr(x: Any) -> Any:
    if isinstance(x, dict):
        return AttrDict({k: _attr(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_attr(v) for v in x]
    return x


def _merge(config: AttrDict, new: dict) -> AttrDict:
    if "_BASE_CONFIG_" in new:
        with open(new["_BASE_CONFIG_"]) as f:  # relative to the current folder, as pcdet's merge_new_config
            config.update(_attr(yaml.safe_load(f)))
    for key, val in new.items():
        if not isinstance(val, dict):
            config[key] = _attr(val)
            continue
        if key not in config:
            config[key] = AttrDict()
        _merge(config[key], val)
    return config


def cfg_from_yaml_file(cfg_file: str, config: AttrDict) -> AttrDict:
    with open(cfg_file) as f:
        return _merge(config, yaml.safe_load(f))


@cache
def _scene(split: str, index: int) -> Scene:
    return SyntheticSplit(split, index + 1, scene_cfg=SCENES, sensor_cfg=SENSOR)[index]


class FakeDataset:
    """Synthetic scenes listed in JSON info files, processed like an OpenPCDet DatasetTemplate."""

    created: list[FakeDataset] = []

    def __init__(self, dataset_cfg: AttrDict, class_names: list[str], training: bool = True,
                 root_path: Path | None = None, logger: Any = None) -> None:
        self.dataset_cfg, self.class_names, self.training, self.logger = dataset_cfg, class_names, training, logger
        self.root_path = root_path if root_path is not None else Path(dataset_cfg.DATA_PATH)
        self.split = dataset_cfg.DATA_SPLIT[self.mode]
        self.infos: list[dict] = []
        for info_path in dataset_cfg.INFO_PATH[self.mode]:
            path = self.root_path / info_path
            if path.exists():  # as pcdet: missing info files are skipped
                self.infos += json.loads(path.read_text())
        self.voxel_cfg = VoxelConfig(tuple(dataset_cfg.POINT_CLOUD_RANGE), tuple(dataset_cfg.VOXEL_SIZE))
        self.data_processor = types.SimpleNamespace(voxel_generator=_VoxelGenerator())  # as pcdet's DataProcessor
        self.evaluations: list[dict] = []
        FakeDataset.created.append(self)

    @property
    def mode(self) -> str:
        return "train" if self.training else "test"

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index: int) -> dict:
        info = self.infos[index]
        scene = _scene(info["split"], info["index"])
        points, boxes = scene.points.copy(), scene.gt_boxes.copy()
        if self.training:  # augmentation (a flip of y), as the DataAugmentor pcdet builds only when training
            points[:, 1] *= -1
            boxes[:, 1] *= -1
            boxes[:, 6] *= -1
        points = points[voxel_indices(points, self.voxel_cfg)[1]]
        points = points[np.random.permutation(len(points))]  # shuffle_points, on in test mode too (nuScenes)
        voxels, coords, num = voxelize(points, self.voxel_cfg)
        return {"frame_id": scene.frame_id, "metadata": {"token": scene.frame_id}, "points": points,
                "voxels": voxels, "voxel_coords": coords, "voxel_num_points": num,
                "gt_boxes": np.c_[boxes, scene.gt_labels.astype(np.float32)].astype(np.float32)}

    @staticmethod
    def collate_batch(batch_list: list[dict]) -> dict:
        data = defaultdict(list)
        for sample in batch_list:
            for key, val in sample.items():
                data[key].append(val)
        ret: dict[str, Any] = {}
        for key, val in data.items():
            if key in ("voxels", "voxel_num_points"):
                ret[key] = np.concatenate(val)
            elif key in ("points", "voxel_coords"):
                ret[key] = np.concatenate([np.pad(v, ((0, 0), (1, 0)), constant_values=i) for i, v in enumerate(val)])
            elif key == "gt_boxes":
                gt = np.zeros((len(val), max(len(v) for v in val), val[0].shape[-1]), np.float32)
                for i, v in enumerate(val):
                    gt[i, :len(v)] = v
                ret[key] = gt
            else:
                ret[key] = np.stack(val)
        ret["batch_size"] = len(batch_list)
        return ret

    def generate_prediction_dicts(self, batch_dict: dict, pred_dicts: list[dict], class_names: list[str],
                                  output_path: Path | None = None) -> list[dict]:
        annos = []
        for i, p in enumerate(pred_dicts):
            labels = p["pred_labels"].cpu().numpy()
            annos.append({"name": np.array(class_names)[labels - 1], "score": p["pred_scores"].cpu().numpy(),
                          "boxes_lidar": p["pred_boxes"].cpu().numpy(), "pred_labels": labels,
                          "frame_id": batch_dict["frame_id"][i], "metadata": batch_dict["metadata"][i]})
        return annos

    def evaluation(self, det_annos: list[dict], class_names: list[str], **kwargs: Any) -> tuple[str, dict]:
        assert len(det_annos) == len(self.infos), "Samples in split doesn't match samples in predictions."
        output_path = Path(kwargs["output_path"])
        (output_path / "results.json").write_text(json.dumps([a["frame_id"] for a in det_annos]))
        self.evaluations.append({"eval_metric": kwargs["eval_metric"], "output_path": output_path,
                                 "frame_ids": [a["frame_id"] for a in det_annos]})
        scenes = [_scene(i["split"], i["index"]) for i in self.infos]
        ap = detection_ap([{"pred_boxes": a["boxes_lidar"], "pred_scores": a["score"], "pred_labels": a["pred_labels"]}
                           for a in det_annos], [{"gt_boxes": s.gt_boxes, "gt_labels": s.gt_labels} for s in scenes],
                          class_names)
        m = float(np.nan_to_num(ap["mAP"])) / 100
        return f"mAP: {m:.4f}", {"mAP": m, "NDS": 0.5 * m + 0.1, "mATE": np.float64(0.7)}


class _VoxelGenerator:
    """Stands for spconv's compiled ``Point2VoxelCPU3d`` that pcdet's DataProcessor keeps: cannot be pickled or
    deep-copied (a pybind object)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("cannot pickle 'cumm.core_cc.spconv.Point2VoxelCPU3d' object")


class FakeCompiledNms:
    """Stands for pcdet's compiled ``iou3d_nms_cuda`` extension: ``nms_gpu(boxes, keep, thresh) -> int`` fills
    ``keep`` with the rows kept (boxes sorted by falling score) and returns how many; its kernels are CUDA only,
    so CPU tensors are refused as the real extension's input check does. ``cpu_kernel`` lets tests run the
    pipeline on CPU as it would run on a GPU machine."""

    cpu_kernel = False
    calls = 0

    def nms_gpu(self, boxes: torch.Tensor, keep: torch.Tensor, thresh: float) -> int:
        if not boxes.is_cuda and not self.cpu_kernel:
            raise RuntimeError("boxes must be a CUDAtensor ")
        FakeCompiledNms.calls += 1
        lo, hi = boxes[:, :2] - boxes[:, 3:5] / 2, boxes[:, :2] + boxes[:, 3:5] / 2  # axis-aligned BEV IoU
        inter = (torch.minimum(hi[:, None], hi[None]) - torch.maximum(lo[:, None], lo[None])).clamp(min=0).prod(-1)
        area = (hi - lo).prod(-1)
        iou = inter / (area[:, None] + area[None] - inter).clamp(min=1e-6)
        removed = torch.zeros(len(boxes), dtype=torch.bool)
        n = 0
        for i in range(len(boxes)):
            if not removed[i]:
                keep[n] = i
                n += 1
                removed |= iou[i].cpu() > thresh
        return n


iou3d_nms_cuda = FakeCompiledNms()


def nms_gpu(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, pre_maxsize: int | None = None
            ) -> tuple[torch.Tensor, None]:
    """``pcdet.ops.iou3d_nms.iou3d_nms_utils.nms_gpu``'s documented contract: boxes (N, 7), scores (N) -> (indices
    of the kept boxes by falling score, None); runs the compiled op and moves its result with ``.cuda()``."""
    order = torch.argsort(scores, descending=True)[:pre_maxsize]
    keep = torch.zeros(len(order), dtype=torch.long)
    n = iou3d_nms_cuda.nms_gpu(boxes[order].contiguous(), keep, thresh)
    kept = keep[:n] if iou3d_nms_cuda.cpu_kernel else keep[:n].cuda()
    return order[kept], None


class SparseBasicBlock(spconv.SparseModule):
    """pcdet's residual block: its convolutions have ``bias=True`` when a norm follows (``bias = norm_fn is not
    None``), which spconv's CPU kernels refuse in eval mode."""

    def __init__(self, channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn1 = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: Any) -> Any:
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + x.features))


def _post_act(conv: nn.Module, channels: int) -> spconv.SparseSequential:
    return spconv.SparseSequential(conv, nn.BatchNorm1d(channels), nn.ReLU())


class Backbone3D(nn.Module):
    """A small ``VoxelResBackBone8xVoxelNeXt``: conv_input, conv1 (a block), conv2/conv3 (strided conv + block),
    height compression to BEV, conv_out and shared_conv; pcdet's module names."""

    def __init__(self, c: list[int], spatial_shape: list[int]) -> None:
        super().__init__()
        self.sparse_shape = spatial_shape
        self.conv_input = _post_act(spconv.SubMConv3d(4, c[0], 3, padding=1, bias=False, indice_key="subm1"), c[0])
        self.conv1 = spconv.SparseSequential(SparseBasicBlock(c[0], "res1"))
        self.conv2 = spconv.SparseSequential(_post_act(spconv.SparseConv3d(
            c[0], c[1], 3, stride=2, padding=1, bias=False, indice_key="spconv2"), c[1]),
            SparseBasicBlock(c[1], "res2"))
        self.conv3 = spconv.SparseSequential(_post_act(spconv.SparseConv3d(
            c[1], c[2], 3, stride=2, padding=1, bias=False, indice_key="spconv3"), c[2]),
            SparseBasicBlock(c[2], "res3"))
        self.conv_out = _post_act(spconv.SparseConv2d(c[2], c[3], 3, padding=1, bias=False, indice_key="out"), c[3])
        self.shared_conv = _post_act(spconv.SubMConv2d(c[3], c[3], 3, padding=1, bias=True, indice_key="bev"), c[3])

    def forward(self, batch_dict: dict) -> dict:
        x = spconv.SparseConvTensor(batch_dict["voxel_features"], batch_dict["voxel_coords"].int(), self.sparse_shape,
                                    batch_dict["batch_size"])
        x3 = self.conv3(self.conv2(self.conv1(self.conv_input(x))))
        bev = sparse_height_compression([(x3, 1)], tuple(x3.spatial_shape[1:]), batch_dict["batch_size"])
        batch_dict["encoded_spconv_tensor"] = self.shared_conv(self.conv_out(bev))
        batch_dict["encoded_spconv_tensor_stride"] = 4
        return batch_dict


class SeparateHead(nn.Module):
    """One head group: a branch per output (``hm``, ``center``, ``center_z``, ``dim``, ``rot``), each
    SubMConv2d + BN + ReLU then an output SubMConv2d with ``bias=True``; modules named as pcdet's."""

    def __init__(self, channels: int, num_cls: int, key: str) -> None:
        super().__init__()
        self.names = {"hm": num_cls, "center": 2, "center_z": 1, "dim": 3, "rot": 2}
        for name, out in self.names.items():
            self.__setattr__(name, spconv.SparseSequential(
                _post_act(spconv.SubMConv2d(channels, channels, 3, padding=1, bias=False, indice_key=key), channels),
                spconv.SubMConv2d(channels, out, 1, bias=True, indice_key=f"{key}_out")))

    def forward(self, x: Any) -> dict[str, torch.Tensor]:
        return {name: self.__getattr__(name)(x).features for name in self.names}


class DenseHead(nn.Module):
    """A ``VoxelNeXtHead``: one :class:`SeparateHead` per class group (``CLASS_NAMES_EACH_HEAD``), raw outputs kept
    in ``forward_ret_dict["pred_dicts"]``, predictions through top-k and the compiled NMS (``nms_gpu``)."""

    def __init__(self, channels: int, class_names: list[str], groups: list[list[str]], cell: float,
                 origin: tuple[float, float]) -> None:
        super().__init__()
        self.class_names, self.groups, self.cell, self.origin = class_names, groups, cell, origin
        self.heads_list = nn.ModuleList(SeparateHead(channels, len(g), f"head{i}") for i, g in enumerate(groups))
        self.forward_ret_dict: dict[str, Any] = {}

    def forward(self, batch_dict: dict) -> dict:
        x = batch_dict["encoded_spconv_tensor"]
        pred_dicts = [head(x) for head in self.heads_list]
        self.forward_ret_dict["pred_dicts"] = pred_dicts
        if not self.training:
            batch_dict["final_box_dicts"] = self.predict(pred_dicts, x.indices, batch_dict["batch_size"])
        return batch_dict

    def predict(self, pred_dicts: list[dict], indices: torch.Tensor, batch_size: int) -> list[dict]:
        out = []
        for b in range(batch_size):
            rows = torch.nonzero(indices[:, 0] == b).squeeze(1)
            boxes, scores, labels = [], [], []
            for group, pred in zip(self.groups, pred_dicts, strict=True):
                hm = torch.sigmoid(pred["hm"][rows])
                score, cls = hm.max(dim=1)
                top = torch.topk(score, min(20, len(score))).indices
                box = decode_boxes({k: v[rows][top] for k, v in pred.items()}, indices[rows][top],
                                   (self.cell, self.cell), self.origin)
                keep, _ = nms_gpu(box, score[top], thresh=0.1)
                boxes.append(box[keep])
                scores.append(score[top][keep])
                labels.append(torch.tensor([self.class_names.index(group[c]) + 1 for c in cls[top][keep].tolist()],
                                           dtype=torch.long))
            out.append({"pred_boxes": torch.cat(boxes), "pred_scores": torch.cat(scores),
                        "pred_labels": torch.cat(labels)})
        return out


class FakeDetector(nn.Module):
    """A ``Detector3DTemplate``-like VoxelNeXt: keeps the dataset it was built from (``self.dataset``, which holds
    an unpicklable voxel generator and a logger), modules ``vfe``, ``backbone_3d``, ``dense_head`` in
    ``module_list``; eval forward ``(pred_dicts, ret_dict)``; pcdet's checkpoint methods."""

    def __init__(self, model_cfg: AttrDict, num_class: int, dataset: FakeDataset) -> None:
        super().__init__()
        self.model_cfg, self.num_class, self.dataset = model_cfg, num_class, dataset
        self.class_names = dataset.class_names
        v = dataset.voxel_cfg
        self.vfe = nn.Identity()  # MeanVFE has no parameters
        self.backbone_3d = Backbone3D(list(model_cfg.CHANNELS), list(v.spatial_shape))
        self.dense_head = DenseHead(model_cfg.CHANNELS[3], list(dataset.class_names),
                                    list(model_cfg.CLASS_NAMES_EACH_HEAD), v.voxel_size[0] * 4,
                                    tuple(v.point_cloud_range[:2]))
        self.module_list = [self.vfe, self.backbone_3d, self.dense_head]

    def forward(self, batch_dict: dict) -> tuple[list[dict], dict]:
        n = batch_dict["voxel_num_points"].clamp(min=1).to(batch_dict["voxels"].dtype)[:, None]
        batch_dict["voxel_features"] = batch_dict["voxels"].sum(dim=1) / n
        for module in self.module_list[1:]:
            batch_dict = module(batch_dict)
        if self.training:  # pcdet: (ret_dict with the loss, tb_dict, disp_dict); the double has no loss
            return {"loss": torch.zeros(())}, {}, {}
        return batch_dict["final_box_dicts"], {}

    def load_params_from_file(self, filename: str, logger: Any, to_cpu: bool = False,
                              pre_trained_path: str | None = None) -> None:
        raise AssertionError("the adapter must not call the unrestricted torch.load of load_params_from_file")

    def _load_state_dict(self, model_state_disk: dict, *, strict: bool = True) -> tuple[dict, dict]:
        state_dict = self.state_dict()
        update = {k: v for k, v in model_state_disk.items() if k in state_dict and state_dict[k].shape == v.shape}
        state_dict.update(update)
        self.load_state_dict(state_dict)
        return state_dict, update


MODEL_CFG = {"NAME": "Tiny", "CHANNELS": [4, 8, 8, 8], "CLASS_NAMES_EACH_HEAD": [["car"], ["pedestrian", "cyclist"]],
             "POST_PROCESSING": {"EVAL_METRIC": "kitti"}}


def build_network(model_cfg: AttrDict, num_class: int, dataset: FakeDataset) -> FakeDetector:
    assert num_class == len(dataset.class_names)
    return FakeDetector(model_cfg, num_class, dataset)


BUILD_CALLS: list[dict] = []


def build_dataloader(dataset_cfg: AttrDict, class_names: list[str], batch_size: int, dist: bool,
                     root_path: Path | None = None, workers: int = 4, seed: int | None = None, logger: Any = None,
                     training: bool = True, merge_all_iters_to_one_epoch: bool = False,
                     total_epochs: int = 0) -> tuple[FakeDataset, torch.utils.data.DataLoader, None]:
    BUILD_CALLS.append({"training": training, "dist": dist, "root_path": root_path, "seed": seed})
    dataset = FakeDataset(dataset_cfg=dataset_cfg, class_names=class_names, root_path=root_path, training=training,
                          logger=logger)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=training,
                                         collate_fn=dataset.collate_batch, drop_last=False)
    return dataset, loader, None


def fake_modules() -> dict[str, types.ModuleType]:
    pcdet = types.ModuleType("pcdet")
    config = types.ModuleType("pcdet.config")
    config.cfg = AttrDict(ROOT_DIR=Path("/nonexistent/OpenPCDet"), LOCAL_RANK=0)
    config.cfg_from_yaml_file = cfg_from_yaml_file
    datasets = types.ModuleType("pcdet.datasets")
    datasets.build_dataloader = build_dataloader
    models = types.ModuleType("pcdet.models")
    models.build_network = build_network
    ops = types.ModuleType("pcdet.ops.iou3d_nms.iou3d_nms_utils")
    ops.nms_gpu = nms_gpu
    pcdet.config, pcdet.datasets, pcdet.models = config, datasets, models
    return {"pcdet": pcdet, "pcdet.config": config, "pcdet.datasets": datasets, "pcdet.models": models,
            "pcdet.ops.iou3d_nms.iou3d_nms_utils": ops}


# ------------------------------------------------------------------------------------------------ fixtures


def write_tree(root: Path) -> tuple[Path, Path, Path]:
    """OpenPCDet's layout: tools/cfgs/{dataset_configs,<x>_models}, data/<dataset>. Returns the model config,
    the checkpoint and the data folder."""
    data = root / "data" / "fake"
    data.mkdir(parents=True)
    (data / "train_infos.json").write_text(json.dumps([{"split": "train", "index": i} for i in range(N_TRAIN)]))
    (data / "val_infos.json").write_text(json.dumps([{"split": "val", "index": i} for i in range(N_VAL)]))
    cfgs = root / "tools" / "cfgs"
    (cfgs / "dataset_configs").mkdir(parents=True)
    (cfgs / "fake_models").mkdir()
    (cfgs / "dataset_configs" / "fake_dataset.yaml").write_text(yaml.safe_dump({
        "DATASET": "FakeDataset", "DATA_PATH": "../data/fake", "POINT_CLOUD_RANGE": RANGE, "VOXEL_SIZE": VOXEL,
        "DATA_SPLIT": {"train": "train", "test": "val"},
        "INFO_PATH": {"train": ["train_infos.json"], "test": ["val_infos.json"]}}))
    cfg_file = cfgs / "fake_models" / "tiny_voxelnext.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "CLASS_NAMES": list(CLASS_NAMES),
        "DATA_CONFIG": {"_BASE_CONFIG_": "cfgs/dataset_configs/fake_dataset.yaml"},
        "MODEL": MODEL_CFG}))
    torch.manual_seed(1)
    dataset = FakeDataset(AttrDict(DATA_SPLIT={"test": "val"}, INFO_PATH={"test": []}, DATA_PATH=str(data),
                                   POINT_CLOUD_RANGE=RANGE, VOXEL_SIZE=VOXEL), list(CLASS_NAMES), training=False)
    FakeDataset.created.clear()
    model = build_network(_attr(MODEL_CFG), len(CLASS_NAMES), dataset)
    for name, t in model.state_dict().items():  # non-trivial BN statistics and biases, so the loaded weights matter
        if name.endswith("running_mean") or name.endswith(".bias"):
            t.uniform_(-0.1, 0.1)
        elif name.endswith("running_var"):
            t.uniform_(0.5, 1.5)
    ckpt = root / "ckpt.pth"
    torch.save({"epoch": 3, "it": 10, "model_state": model.state_dict(), "optimizer_state": None,
                "version": "pcdet+0.6.0"}, ckpt, _use_new_zipfile_serialization=False)  # as pcdet's save_checkpoint
    return cfg_file, ckpt, data


@pytest.fixture(scope="module")
def fake_pcdet() -> Iterator[None]:
    """The fake pcdet, its NMS op running on CPU as the real one runs on a GPU machine."""
    with pytest.MonkeyPatch.context() as mp:
        for name, module in fake_modules().items():
            mp.setitem(sys.modules, name, module)
        mp.setattr(FakeCompiledNms, "cpu_kernel", True)
        yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_tree(tmp_path_factory.mktemp("openpcdet"))


#: what the module's setup was built from: its datasets (evaluation, calibration) and build_dataloader calls
BUILT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def setup(fake_pcdet: None, tree: tuple[Path, Path, Path]) -> DetectionSetup:
    cfg_file, ckpt, _ = tree
    FakeDataset.created.clear()
    BUILD_CALLS.clear()
    config = RunConfig(task="detection", model=f"pcdet:{cfg_file}", weights=ckpt, data=None, calib_size=3,
                       batch_size=2, eval_size=3, seed=5, options={"target": "bev", "workers": 0})
    loaded = pa.load(str(cfg_file), ckpt, config)
    BUILT.update(eval_set=FakeDataset.created[0], calib_set=FakeDataset.created[1], calls=list(BUILD_CALLS))
    return loaded


# ------------------------------------------------------------------------------------------------ tests


def test_missing_pcdet_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch, tree: tuple[Path, Path, Path]
                                                ) -> None:
    monkeypatch.setitem(sys.modules, "pcdet", None)
    with pytest.raises(QcoreError, match="OpenPCDet.*not installed.*git clone .*OpenPCDet.*setup.py develop"):
        pa.require_pcdet()
    cfg_file, ckpt, data = tree
    with pytest.raises(QcoreError, match="setup.py develop"):
        pa.load_pcdet(cfg_file, ckpt, data, 2, None, 2, 0, "cpu")
    # installed, but its compiled part fails to import
    for name, module in fake_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "pcdet.models", None)
    with pytest.raises(QcoreError, match="installed but fails to import"):
        pa.require_pcdet()


def test_missing_paths_and_bad_arguments_raise(fake_pcdet: None, tree: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    cfg_file, ckpt, data = tree
    cases = [
        ((tmp_path / "nope.yaml", ckpt, data), "config .*nope.yaml not found.*--model pcdet:"),
        ((cfg_file, None, data), "needs its checkpoint.*--weights"),
        ((cfg_file, tmp_path / "nope.pth", data), "checkpoint .*nope.pth not found"),
        ((cfg_file, ckpt, tmp_path / "nodata"), "data folder .*nodata not found.*--data"),
    ]
    for (c, w, d), message in cases:
        with pytest.raises(QcoreError, match=message):
            pa.load_pcdet(c, w, d, 2, None, 2, 0, "cpu", workers=0)
    with pytest.raises(QcoreError, match="unknown detection target"):
        pa.load_pcdet(cfg_file, ckpt, data, 2, None, 2, 0, "cpu", target="logits")
    with pytest.raises(QcoreError, match="positive"):
        pa.load_pcdet(cfg_file, ckpt, data, 0, None, 2, 0, "cpu")
    # a base config that cannot be found, a DATA_PATH that does not exist, an empty split
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text(cfg_file.read_text())
    with pytest.raises(QcoreError, match="base config.*not found"):
        pa.load_pcdet(orphan, ckpt, data, 2, None, 2, 0, "cpu")
    moved = cfg_file.parent / "moved.yaml"
    tree_cfg = yaml.safe_load(cfg_file.read_text())
    moved.write_text(yaml.safe_dump({**tree_cfg, "DATA_CONFIG": {**tree_cfg["DATA_CONFIG"], "DATA_PATH": "../nope"}}))
    with pytest.raises(QcoreError, match="DATA_PATH of moved.yaml.*not found.*--data"):
        pa.load_pcdet(moved, ckpt, None, 2, None, 2, 0, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QcoreError, match="no samples.*create_\\*_infos"):
        pa.load_pcdet(cfg_file, ckpt, tmp_path / "empty", 2, None, 2, 0, "cpu", workers=0)
    moved.unlink()


def test_unsafe_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model_state": model.state_dict(), "extra": types.SimpleNamespace(a=1)}, unsafe)
    with pytest.raises(QcoreError, match="weights_only=True"):
        pa.load_weights(model, unsafe)
    other = tmp_path / "other.pth"
    torch.save({"model_state": nn.Linear(3, 2).state_dict()}, other)
    with pytest.raises(QcoreError, match="does not fit"):
        pa.load_weights(model, other)
    class Mismatch(nn.Linear):  # pcdet's _load_state_dict skips every tensor of another model
        def _load_state_dict(self, state: dict, *, strict: bool = True) -> tuple[dict, dict]:
            return self.state_dict(), {}

    with pytest.raises(QcoreError, match="no weight of .*other.pth fits"):
        pa.load_weights(Mismatch(2, 2), other)
    bare = tmp_path / "bare.pth"
    src = nn.Linear(2, 2)
    torch.save(src.state_dict(), bare)  # a bare state dict works too (load_state_dict fallback)
    pa.load_weights(model, bare)
    assert torch.equal(model.weight, src.weight)


def test_batch_to_torch_converts_like_load_data_to_gpu() -> None:
    cfg = AttrDict(DATA_SPLIT={"test": "val"}, INFO_PATH={"test": []}, DATA_PATH="/nonexistent",
                   POINT_CLOUD_RANGE=RANGE, VOXEL_SIZE=VOXEL)
    ds = FakeDataset(cfg, list(CLASS_NAMES), training=False)
    ds.infos = [{"split": "val", "index": 0}, {"split": "val", "index": 1}]
    batch = ds.collate_batch([ds[0], ds[1]])
    batch.update(image_shape=np.array([[375, 1242], [375, 1242]], np.int64),
                 images=np.zeros((2, 4, 6, 3), np.float64), calib=[object(), object()],
                 camera_imgs=torch.zeros(2, 6, 3, 4, 4), names=np.array(["a", "b"]))
    snapshot = dict(batch)
    out = pa.batch_to_torch(batch, "cpu")
    assert batch == snapshot  # the input is not modified
    for key in ("points", "voxels", "voxel_coords", "voxel_num_points", "gt_boxes"):
        assert isinstance(out[key], torch.Tensor) and out[key].dtype == torch.float32, key
        np.testing.assert_array_equal(out[key].numpy(), batch[key].astype(np.float32))
    assert out["image_shape"].dtype == torch.int32
    assert out["images"].shape == (2, 3, 4, 6) and out["images"].dtype == torch.float32
    assert out["frame_id"] is batch["frame_id"] and isinstance(out["frame_id"], np.ndarray)
    assert out["metadata"] is batch["metadata"] and out["calib"] is batch["calib"]
    assert out["names"] is batch["names"] and out["batch_size"] == 2
    assert out["camera_imgs"] is batch["camera_imgs"]  # already on the device
    assert out["voxel_coords"][:, 0].unique().tolist() == [0.0, 1.0]


def test_loader_end_to_end(setup: DetectionSetup, tree: tuple[Path, Path, Path]) -> None:
    cfg_file, ckpt, data = tree
    assert isinstance(setup, DetectionSetup)
    assert setup.name == "pcdet:tiny_voxelnext" and setup.class_names == CLASS_NAMES and setup.metric == "mAP"
    assert not setup.model.training
    state = torch.load(ckpt, weights_only=True)["model_state"]
    for k, v in setup.model.state_dict().items():  # biases of spconv layers were moved outside the convolutions
        assert torch.equal(v, state[k.replace(OUTSIDE_BIAS, "bias")]), k
    # both datasets built through build_dataloader, never with training=True, from DATA_PATH relative to tools/
    calls = BUILT["calls"]
    assert [c["training"] for c in calls] == [False, False] and not any(c["dist"] for c in calls)
    assert all(Path(c["root_path"]) == data.resolve() and c["seed"] == 5 for c in calls)
    assert "train split" in setup.data["calibration"] and "first 3 samples" in setup.data["evaluation"]
    metrics = setup.evaluate(setup.model)
    assert {"mAP", "NDS", "mATE"} <= set(metrics) and all(isinstance(v, float) for v in metrics.values())
    assert 0.0 <= metrics["mAP"] <= 100.0
    t = setup.target(setup.model, setup.calibration[0])
    assert t.shape == (2, 8, 32, 32)


def test_calibration_comes_from_the_train_split_unaugmented(setup: DetectionSetup, fake_pcdet: None,
                                                            tree: tuple[Path, Path, Path]) -> None:
    calib_set = BUILT["calib_set"]
    assert setup.calibration.dataset is calib_set
    assert calib_set.split == "train" and not calib_set.training and len(calib_set) == N_TRAIN
    batches = list(setup.calibration)
    assert [b["batch_size"] for b in batches] == [2, 1]  # calib_size 3 in batches of 2
    frame_ids = [f for b in batches for f in b["frame_id"]]
    assert len(set(frame_ids)) == 3 and all(f.startswith("train_") for f in frame_ids)
    for b in batches:
        assert all(isinstance(b[k], torch.Tensor) and b[k].device.type == "cpu"
                   for k in ("points", "voxels", "voxel_coords", "voxel_num_points", "gt_boxes"))
    # not augmented: the points are the scene's (in range), shuffled only
    first = batches[0]
    index = int(first["frame_id"][0].rsplit("_", 1)[1])
    scene = _scene("train", index)
    expected = scene.points[voxel_indices(scene.points, calib_set.voxel_cfg)[1]]
    got = first["points"][first["points"][:, 0] == 0][:, 1:].numpy()
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(expected, axis=0))
    # the same batch each time it is read (the dataset shuffles with numpy's global RNG), which is left alone
    state = np.random.get_state()[1].copy()
    again = setup.calibration[0]
    assert np.array_equal(np.random.get_state()[1], state)
    for key in ("points", "voxels", "voxel_coords"):
        assert torch.equal(again[key], first[key])
    # the selection is seeded
    cfg_file, ckpt, data = tree
    same = pa.load_pcdet(cfg_file, ckpt, data, 3, 1, 2, 5, "cpu", workers=0)
    other = pa.load_pcdet(cfg_file, ckpt, data, 3, 1, 2, 6, "cpu", workers=0)
    assert same.calibration.indices == setup.calibration.indices
    assert other.calibration.indices != setup.calibration.indices
    everything = pa.load_pcdet(cfg_file, ckpt, data, 100, 1, 4, 0, "cpu", workers=0)
    assert everything.calibration.indices == list(range(N_TRAIN))


def test_bev_and_head_targets(setup: DetectionSetup) -> None:
    batch = setup.calibration[0]
    keys = set(batch)
    a = setup.target(setup.model, batch)
    b = setup.target(setup.model, batch)
    assert set(batch) == keys  # the forward ran on a copy
    assert torch.equal(a, b) and a.abs().sum() > 0
    run = pa.batch_to_torch(batch, "cpu")
    with torch.no_grad(), spconv_cpu_guard():
        setup.model(run)
    encoded = run["encoded_spconv_tensor"]
    torch.testing.assert_close(a, pa.densify(encoded))
    head = pa.make_target("head")(setup.model, batch)
    groups = setup.model.dense_head.forward_ret_dict["pred_dicts"]
    torch.testing.assert_close(head, torch.cat([t for g in groups for t in g.values()], dim=1))
    assert head.shape == (len(encoded.indices), 2 * 8 + len(CLASS_NAMES))  # 2 head groups, car | pedestrian+cyclist
    with pytest.raises(QcoreError, match="unknown detection target"):
        pa.make_target("logits")


class _PcdetLike(nn.Module):
    """A dense-BEV model whose dense head keeps its raw outputs as pcdet's CenterHead does."""

    def __init__(self, with_head: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        if with_head:
            self.dense_head = nn.Module()
            self.dense_head.forward_ret_dict = {}

    def forward(self, batch_dict: dict) -> tuple[list, dict]:
        x = self.conv(batch_dict["spatial_features"])
        batch_dict["spatial_features_2d"] = x
        if hasattr(self, "dense_head"):
            self.dense_head.forward_ret_dict["pred_dicts"] = [{"hm": x[:, :1], "center": x[:, 1:]}, {"hm": x}]
        return [], {}


def test_targets_of_pcdet_style_models() -> None:
    batch = {"spatial_features": np.ones((2, 2, 4, 5), np.float32), "batch_size": 2}
    model = _PcdetLike()
    bev = pa.bev_target(model, batch)
    assert bev.shape == (2, 3, 4, 5)
    assert pa.head_target(model, batch).shape == (2, 6, 4, 5)
    with pytest.raises(QcoreError, match="only supported for models whose dense head stores"):
        pa.head_target(_PcdetLike(with_head=False), batch)


def test_densify_matches_spconv_dense() -> None:
    import spconv.pytorch as spconv

    indices = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0], [1, 2, 3, 1]], dtype=torch.int32)  # (b, z, y, x)
    features = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    t = spconv.SparseConvTensor(features, indices, [3, 4, 5], 2)
    dense = pa.densify(t)
    assert dense.shape == (2, 2, 3, 4, 5)
    assert dense[1, :, 2, 3, 1].tolist() == [4.0, 5.0] and dense.sum() == features.sum()
    with warnings.catch_warnings():  # spconv's own dense() indexes with a list (deprecated by torch)
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(dense, t.dense())


def test_evaluate_loop_and_metrics(setup: DetectionSetup, tmp_path: Path) -> None:
    eval_set = BUILT["eval_set"]
    assert eval_set.split == "val" and len(eval_set) == 3  # eval_size 3 of 4
    first = setup.evaluate(setup.model)
    second = setup.evaluate(setup.model)
    assert first == second
    call = eval_set.evaluations[-1]
    assert call["eval_metric"] == "kitti" and call["frame_ids"] == [f"val_0_{i:06d}" for i in range(3)]
    assert not call["output_path"].exists()  # a temporary folder by default
    # an output folder is used as given; nuScenes-style fractions come back in percent
    loader = torch.utils.data.DataLoader(eval_set, batch_size=2, collate_fn=eval_set.collate_batch)
    out = pa.evaluate_pcdet(setup.model, eval_set, loader, CLASS_NAMES, "cpu", tmp_path / "eval", eval_metric="fake")
    assert (tmp_path / "eval" / "results.json").exists()
    assert out["NDS"] == pytest.approx(50 * out["mAP"] / 100 + 10)
    assert out["mATE"] == pytest.approx(0.7)


def test_normalize_metrics() -> None:
    nus = pa.normalize_metrics({"mAP": 0.605, "NDS": np.float64(0.666), "mATE": 0.3, "note": "x"})
    assert nus == pytest.approx({"mAP": 60.5, "NDS": 66.6, "mATE": 0.3})
    kitti = pa.normalize_metrics({"Car_3d/moderate_R40": 80.0, "Car_3d/easy_R40": 90.0,
                                  "Pedestrian_3d/moderate_R40": np.float32(50.0)})
    assert kitti["mAP"] == pytest.approx(65.0) and kitti["AP/Car"] == 80.0 and kitti["Car_3d/easy_R40"] == 90.0
    with pytest.raises(QcoreError, match="no metric qcore uses as headline"):
        pa.normalize_metrics({"OBJECT_TYPE_TYPE_VEHICLE_LEVEL_2/APH": 0.7})


def test_train_split_config_switches_only_the_split() -> None:
    cfg = _attr({"DATA_SPLIT": {"train": "train", "test": "val"},
                 "INFO_PATH": {"train": ["a_train.pkl"], "test": ["a_val.pkl"]},
                 "DATA_PROCESSOR": [{"NAME": "shuffle_points", "SHUFFLE_ENABLED": {"train": True, "test": False}}]})
    switched = pa.train_split_config(cfg)
    assert switched.DATA_SPLIT == {"train": "train", "test": "train"}
    assert switched.INFO_PATH.test == ["a_train.pkl"] and cfg.INFO_PATH.test == ["a_val.pkl"]
    assert switched.DATA_PROCESSOR[0]["SHUFFLE_ENABLED"]["test"] is False
    with pytest.raises(QcoreError, match="train split"):
        pa.train_split_config(_attr({"VERSION": "x"}))


# ------------------------------------------------------------------------------------------------ a real model's traits


def _fresh_model(tree: tuple[Path, Path, Path]) -> FakeDetector:
    cfg = AttrDict(DATA_SPLIT={"test": "val"}, INFO_PATH={"test": []}, DATA_PATH=str(tree[2]),
                   POINT_CLOUD_RANGE=RANGE, VOXEL_SIZE=VOXEL)
    return build_network(_attr(MODEL_CFG), len(CLASS_NAMES), FakeDataset(cfg, list(CLASS_NAMES), training=False))


def test_the_double_fails_where_a_real_pcdet_model_did(tree: tuple[Path, Path, Path], setup: DetectionSetup) -> None:
    """As built by pcdet, the model cannot be deep-copied (its dataset) and refuses CPU eval (biased spconv
    convs); the adapter's model can be, and runs."""
    raw = _fresh_model(tree).eval()
    with pytest.raises(TypeError, match="cannot pickle"):
        copy.deepcopy(raw)
    with pytest.raises(AssertionError, match="cpu don't support act and bias"):
        pa.bev_target(raw, setup.calibration[0])
    assert len(pa.adapt_model(raw)) == 17 and pa.adapt_model(raw) == []  # what load_pcdet does, for load_quantized
    copy.deepcopy(raw)
    assert pa.bev_target(raw, setup.calibration[0]).shape == (2, 8, 32, 32)
    dup = copy.deepcopy(setup.model)
    assert dup.dataset is setup.model.dataset  # shared, not copied
    assert dup.backbone_3d.conv1[0].conv1.bias_outside is not setup.model.backbone_3d.conv1[0].conv1.bias_outside
    torch.testing.assert_close(setup.target(dup, setup.calibration[0]), setup.target(setup.model, setup.calibration[0]))


def test_moved_biases_give_the_biased_outputs(tree: tuple[Path, Path, Path], setup: DetectionSetup) -> None:
    """Every biased spconv conv of the pcdet model is changed; outputs equal those of the biased model run in
    training mode (where spconv's CPU kernels accept a bias) with frozen BatchNorm statistics."""
    raw = _fresh_model(tree)
    pa.load_weights(raw, tree[1])
    biased = [n for n, m in raw.named_modules() if pa.is_spconv_layer(m) and m.bias is not None]
    assert len(biased) == 2 * 3 + 1 + 10  # 3 blocks x 2 convs, shared_conv, 2 heads x 5 outputs
    raw.train()
    for m in raw.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    batch = setup.calibration[0]
    with torch.no_grad():
        expected = pa.bev_target(raw, batch), pa.head_target(raw, batch)
    assert pa.move_bias_outside(raw) == biased and pa.move_bias_outside(raw) == []
    raw.eval()
    with torch.no_grad():
        torch.testing.assert_close(pa.bev_target(raw, batch), expected[0])
        torch.testing.assert_close(pa.head_target(raw, batch), expected[1])


def test_head_output_layers_of_openpcdet_detectors(setup: DetectionSetup) -> None:
    names = pa.quantizable_names(setup.model)
    assert names[0] == "backbone_3d.conv_input.0" and len(names) == 11 + 2 * 5 * 2
    assert pa.head_output_layers(names) == tuple(f"dense_head.heads_list.{i}.{b}.1" for i in range(2)
                                                 for b in ("hm", "center", "center_z", "dim", "rot"))
    assert setup.last_layers == pa.head_output_layers(names)
    voxelnext = [f"dense_head.heads_list.{i}.{b}.{j}" for i in range(6)
                 for b in ("center", "center_z", "dim", "rot", "vel", "hm") for j in ("0.0", "1")]
    assert len(pa.head_output_layers(["backbone_3d.conv_out.0", "dense_head.shared_conv.0", *voxelnext])) == 36
    pv_rcnn = ["backbone_3d.conv_input.0", "pfe.SA_layers.0.mlps.0.0", "backbone_2d.blocks.0.1", "dense_head.conv_cls",
               "dense_head.conv_box", "dense_head.conv_dir_cls", "point_head.cls_layers.0", "point_head.cls_layers.3",
               "roi_head.roi_grid_pool_layer.mlps.0.0", "roi_head.shared_fc_layer.0", "roi_head.cls_layers.0",
               "roi_head.cls_layers.7", "roi_head.reg_layers.0", "roi_head.reg_layers.7"]
    assert pa.head_output_layers(pv_rcnn) == ("dense_head.conv_cls", "dense_head.conv_box", "dense_head.conv_dir_cls",
                                              "point_head.cls_layers.3", "roi_head.cls_layers.7",
                                              "roi_head.reg_layers.7")


def test_pipeline_runs_the_pcdet_model_with_every_head_output_at_8_bits(fake_pcdet: None,
                                                                         tree: tuple[Path, Path, Path]) -> None:
    from qcore import run
    from qcore.testing import make_host
    from qcore_detection import plugin

    cfg_file, ckpt, _ = tree
    calls = FakeCompiledNms.calls
    out = run(RunConfig(task="detection", model=f"pcdet:{cfg_file}", weights=ckpt, plugin="uniform", w_bits=4,
                        a_bits=8, calib_size=2, batch_size=2, eval_size=2, seed=0,
                        options={"workers": 0, "include": "backbone_3d.*,dense_head.*"}),
              make_host(("detection", plugin), tiny=False))
    assert FakeCompiledNms.calls > calls  # predictions went through the compiled NMS op
    plan = out.plan.layers
    eight = {n for n, spec in plan.items() if spec.weight.bits == 8}
    assert eight == {"backbone_3d.conv_input.0", *(f"dense_head.heads_list.{i}.{b}.1" for i in range(2)
                                                   for b in ("hm", "center", "center_z", "dim", "rot"))}
    assert len(plan) == 31 and all(plan[n].weight.bits == 4 for n in set(plan) - eight)
    assert out.result["quant"] is not None and 0.0 <= out.result["quant"] <= 100.0
    assert "last (10 layers: dense_head.heads_list.0.hm.1," in out.result["quantized"]["summary"]


def test_unsupported_evaluations_fail_before_any_data_is_read(fake_pcdet: None, tree: tuple[Path, Path, Path]
                                                              ) -> None:
    cfg_file, ckpt, data = tree
    pa.check_eval_metric("KittiDataset", "waymo")
    pa.check_eval_metric("NuScenesDataset", "kitti")
    pa.check_eval_metric("WaymoDataset", "kitti")
    for dataset, metric, message in [
            ("WaymoDataset", "waymo", "EVAL_METRIC 'waymo' is not supported.*EVAL_METRIC: kitti"),
            ("Argo2Dataset", "kitti", "Argo2Dataset's evaluation is not supported")]:
        tree_cfg = yaml.safe_load(cfg_file.read_text())
        tree_cfg["DATA_CONFIG"]["DATASET"] = dataset
        tree_cfg["MODEL"]["POST_PROCESSING"]["EVAL_METRIC"] = metric
        other = cfg_file.parent / f"{dataset}.yaml"
        other.write_text(yaml.safe_dump(tree_cfg))
        BUILD_CALLS.clear()
        with pytest.raises(QcoreError, match=message):
            pa.load_pcdet(other, ckpt, data, 2, None, 2, 0, "cpu", workers=0)
        assert BUILD_CALLS == []
        other.unlink()


def test_a_model_that_needs_cuda_fails_at_once_on_cpu(fake_pcdet: None, tree: tuple[Path, Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file, ckpt, data = tree
    monkeypatch.setattr(FakeCompiledNms, "cpu_kernel", False)  # the real op: CUDA kernels only
    with pytest.raises(QcoreError, match="needs CUDA in its forward.*CUDAtensor.*--device cuda"):
        pa.load_pcdet(cfg_file, ckpt, data, 2, 1, 2, 0, "cpu", workers=0)

    class CallsCuda(nn.Module):  # e.g. anchors or NMS results moved with .cuda()
        def forward(self, batch: dict) -> Any:
            return batch["points"].cuda() + batch["points"]

    with pytest.raises(QcoreError, match="needs CUDA in its forward.*--device cuda"):
        pa.check_device(CallsCuda(), {"points": np.zeros((2, 5), np.float32)}, "cpu")
    with pytest.raises(ZeroDivisionError):  # anything else passes unchanged

        class Fails(nn.Module):
            def forward(self, batch: dict) -> Any:
                raise ZeroDivisionError("x")

        pa.check_device(Fails(), {}, "cpu")


class NuScenesDataset:
    """Where a nuScenes dataset keeps what the checks read: ``root_path`` (DATA_PATH/VERSION), ``dataset_cfg``."""

    def __init__(self, root: Path) -> None:
        self.root_path, self.dataset_cfg = root / "v1.0-mini", AttrDict(VERSION="v1.0-mini")

    def evaluation(self, det_annos: list, class_names: list, **kwargs: Any) -> tuple[str, dict]:
        raise AssertionError(f"Database version not found: {self.root_path / 'v1.0-mini'}")


def test_nuscenes_database_errors_name_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery

    dataset = NuScenesDataset(tmp_path)
    monkeypatch.setitem(sys.modules, "nuscenes", None)
    with pytest.raises(QcoreError, match="nuscenes-devkit"):
        pa.check_nuscenes_database(dataset)
    devkit = types.ModuleType("nuscenes")
    devkit.__spec__ = importlib.machinery.ModuleSpec("nuscenes", None)
    monkeypatch.setitem(sys.modules, "nuscenes", devkit)
    with pytest.raises(QcoreError, match="database tables .*v1.0-mini/v1.0-mini not found.*JSON tables"):
        pa.check_nuscenes_database(dataset)
    (dataset.root_path / "v1.0-mini").mkdir(parents=True)
    pa.check_nuscenes_database(dataset)
    pa.check_nuscenes_database(object())  # other datasets are not checked
    with pytest.raises(QcoreError, match="database tables.*v1.0-mini/\\*.json") as err:
        pa.evaluate_pcdet(nn.Identity(), dataset, [], list(CLASS_NAMES), "cpu", tmp_path / "out", eval_metric="x")
    assert "--eval-size" not in str(err.value)
