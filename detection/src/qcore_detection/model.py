"""A VoxelNeXt-style fully sparse 3-D detector, scaled down for the embedded synthetic-LiDAR default.

Pipeline (OpenPCDet ``batch_dict`` in, ``pred_dicts`` out; every spconv convolution is bias-free and
followed by BatchNorm, so spconv's CPU kernels run it in eval mode; on CPU the sparse part runs inside
:func:`~qcore_detection.spconv_layers.spconv_cpu_guard`, i.e. on one torch thread, and a backward pass must be
run inside it too):

* ``MeanVFE``: the mean of the points in each voxel -> ``voxel_features`` [M, 4];
* ``backbone`` (:class:`SparseBackbone`): ``conv_input`` (SubMConv3d + BN + ReLU), ``conv1`` (basic blocks),
  ``conv2`` .. ``conv6`` (a strided SparseConv3d + BN + ReLU, then basic blocks of two SubMConv3d + BN with a
  residual add). Stages 5 and 6 are extra down-sampling: their (b, y, x) indices are scaled by 2 and 4 to
  stage 4's stride-8 grid and, with stage 4, summed over height into one 2-D sparse tensor (the sparse
  height compression). Then ``conv_out`` (SparseConv2d 3x3 + BN + ReLU, which also activates the
  neighbours of occupied cells, where box centres often lie) and ``shared_conv`` (SubMConv2d + BN + ReLU);
* ``head`` (:class:`~qcore_detection.head.SparseCenterHead`): sparse branches ``hm``, ``center``,
  ``center_z``, ``dim``, ``rot`` on the active BEV voxels.

Distortion targets for quantization (both set by every forward pass):

* ``batch_dict["encoded_spconv_tensor"]``: the backbone's BEV sparse tensor (stride 8,
  ``batch_dict["encoded_spconv_tensor_stride"]``); :func:`bev_dense` gives it as a dense [B, C, H, W] tensor;
* ``batch_dict["head_outputs"]``: the head branches' raw outputs, ``[N_active, k]`` each, rows aligned with
  the encoded tensor's indices; :func:`head_outputs` concatenates them ``[N_active, num_classes + 8]``.
  Quantization never changes the active set (it depends on the voxel indices only), so rows line up
  between an FP and a quantized model.

Layer names: ``backbone.conv_input.conv``, ``backbone.conv{1..6}.{i}.conv{1,2}`` (basic blocks),
``backbone.conv{2..6}.0.conv`` (down-sampling), ``backbone.conv_out.conv``, ``backbone.shared_conv.conv``,
``head.branches.{hm,center,center_z,dim,rot}.{conv,out}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcore_detection.head import SparseCenterHead, head_loss, post_process
from qcore_detection.spconv_layers import PORTABLE_CONV, spconv_cpu_guard
from qcore_detection.synthetic import CLASS_NAMES

#: order of the head outputs in :func:`head_outputs`
HEAD_OUTPUT_ORDER: tuple[str, ...] = ("hm", "center", "center_z", "dim", "rot")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the detector (JSON-serialisable with :meth:`to_dict`).

    :param spatial_shape: (nz, ny, nx) of the voxel grid (``VoxelConfig.spatial_shape``).
    :param voxel_size: (vx, vy, vz) in m.
    :param point_cloud_range: (x0, y0, z0, x1, y1, z1) in m.
    :param channels: output channels of ``conv_input``/``conv1`` and of stages 2..6; stages 4, 5 and 6 must
        match (their features are summed).
    :param blocks: basic blocks per stage (VoxelNeXt: 2).
    :param bev_channels: channels of ``conv_out`` and ``shared_conv`` (the encoded tensor and the head).
    :param min_radius: smallest gaussian radius of the heatmap target (cells at stride 8).
    :param nms_radius: circle-NMS radius (m) per class.
    :param velocity: a ``vel`` head branch (vx, vy) trained on boxes with velocities (nuScenes-like world).
    :param reg_radius: train the regression branches at every active voxel within this many cells of a box
        centre, not just the nearest one (0); see :func:`~qcore_detection.head.assign_targets`.
    """

    spatial_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float] = (0.1, 0.1, 0.2)
    point_cloud_range: tuple[float, float, float, float, float, float] = (-48.0, -48.0, -2.2, 48.0, 48.0, 2.6)
    class_names: tuple[str, ...] = CLASS_NAMES
    num_point_features: int = 4
    channels: tuple[int, int, int, int, int, int] = (16, 32, 64, 64, 64, 64)
    blocks: int = 2
    bev_channels: int = 64
    min_radius: int = 2
    hm_weight: float = 1.0
    loc_weight: float = 0.25
    max_proposals: int = 500
    score_threshold: float = 0.1
    nms_radius: tuple[float, ...] = field(default=(2.0, 0.4, 1.0))
    max_detections: int = 100
    velocity: bool = False
    reg_radius: float = 0.0

    def __post_init__(self) -> None:
        if len(self.channels) != 6 or len(set(self.channels[3:])) != 1:
            raise ValueError(f"channels {self.channels} must have 6 entries with stages 4, 5, 6 equal")
        if len(self.nms_radius) != len(self.class_names):
            raise ValueError("nms_radius needs one radius per class")
        if len(self.spatial_shape) != 3:
            raise ValueError("spatial_shape is (nz, ny, nx)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _bn_relu(x: spconv.SparseConvTensor, bn: nn.Module, relu: bool = True) -> spconv.SparseConvTensor:
    f = bn(x.features)
    return x.replace_feature(F.relu(f) if relu else f)


class SparseConvBNReLU(nn.Module):
    """A sparse convolution (``conv``), BatchNorm and ReLU over the active features."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return _bn_relu(self.conv(x), self.bn)


class SparseBasicBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` with two 3x3x3 SubMConv3d (the active set is kept)."""

    def __init__(self, channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, indice_key=indice_key, **PORTABLE_CONV)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, indice_key=indice_key, **PORTABLE_CONV)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        h = _bn_relu(self.conv1(x), self.bn1)
        h = _bn_relu(self.conv2(h), self.bn2, relu=False)
        return h.replace_feature(F.relu(h.features + x.features))


def _stage(c_in: int, c_out: int, blocks: int, index: int) -> nn.Sequential:
    down = spconv.SparseConv3d(c_in, c_out, 3, stride=2, padding=1, indice_key=f"spconv{index}", **PORTABLE_CONV)
    return nn.Sequential(SparseConvBNReLU(down, c_out),
                         *(SparseBasicBlock(c_out, f"subm{index}") for _ in range(blocks)))


def sparse_height_compression(parts: list[tuple[spconv.SparseConvTensor, int]], spatial_shape: tuple[int, int],
                              batch_size: int) -> spconv.SparseConvTensor:
    """Sum the features of all voxels that share a BEV cell (b, y, x) into a 2-D sparse tensor.

    :param parts: 3-D sparse tensors with the factor that maps their (y, x) indices onto ``spatial_shape``.
    :param spatial_shape: (ny, nx) of the output; the output rows are sorted by (b, y, x).
    """
    ny, nx = spatial_shape
    feats = torch.cat([t.features for t, _ in parts])
    bev = torch.cat([t.indices[:, [0, 2, 3]].long() * torch.tensor([1, s, s], device=t.indices.device)
                     for t, s in parts])
    keys = (bev[:, 0] * ny + bev[:, 1]) * nx + bev[:, 2]
    unique, inverse = torch.unique(keys, return_inverse=True)
    out = feats.new_zeros(len(unique), feats.shape[1]).index_add_(0, inverse, feats)
    indices = torch.stack([unique // (ny * nx), unique // nx % ny, unique % nx], 1).int()
    return spconv.SparseConvTensor(out, indices, [ny, nx], batch_size)


class SparseBackbone(nn.Module):
    """The residual sparse 3-D backbone with sparse height compression and the BEV convolutions."""

    #: down-sampling factor of the BEV output relative to the voxel grid
    stride = 8

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.spatial_shape = list(cfg.spatial_shape)
        self.conv_input = SparseConvBNReLU(
            spconv.SubMConv3d(cfg.num_point_features, c[0], 3, padding=1, indice_key="subm1", **PORTABLE_CONV), c[0])
        self.conv1 = nn.Sequential(*(SparseBasicBlock(c[0], "subm1") for _ in range(cfg.blocks)))
        self.conv2 = _stage(c[0], c[1], cfg.blocks, 2)
        self.conv3 = _stage(c[1], c[2], cfg.blocks, 3)
        self.conv4 = _stage(c[2], c[3], cfg.blocks, 4)
        self.conv5 = _stage(c[3], c[4], cfg.blocks, 5)
        self.conv6 = _stage(c[4], c[5], cfg.blocks, 6)
        self.conv_out = SparseConvBNReLU(
            spconv.SparseConv2d(c[3], cfg.bev_channels, 3, stride=1, padding=1, indice_key="bev_out", **PORTABLE_CONV),
            cfg.bev_channels)
        self.shared_conv = SparseConvBNReLU(
            spconv.SubMConv2d(cfg.bev_channels, cfg.bev_channels, 3, padding=1, indice_key="subm_bev", **PORTABLE_CONV),
            cfg.bev_channels)

    def forward(self, voxel_features: Tensor, voxel_coords: Tensor, batch_size: int) -> spconv.SparseConvTensor:
        """The stride-8 BEV sparse tensor (indices (b, y, x)) for voxels with coords (b, z, y, x)."""
        x = spconv.SparseConvTensor(voxel_features, voxel_coords.int(), self.spatial_shape, batch_size)
        x = self.conv1(self.conv_input(x))
        x4 = self.conv4(self.conv3(self.conv2(x)))
        x5 = self.conv5(x4)
        x6 = self.conv6(x5)
        bev = sparse_height_compression([(x4, 1), (x5, 2), (x6, 4)], tuple(x4.spatial_shape[1:]), batch_size)
        return self.shared_conv(self.conv_out(bev))


def mean_vfe(voxels: Tensor, num_points: Tensor) -> Tensor:
    """MeanVFE: the mean of the (zero-padded) points of each voxel, ``[M, C]``."""
    n = num_points.clamp(min=1).to(voxels.dtype)[:, None]
    return voxels.sum(dim=1) / n


class VoxelNeXtLite(nn.Module):
    """The detector. ``model(batch_dict)`` returns ``(pred_dicts, ret_dict)`` in eval mode and
    ``({"loss": loss}, tb_dict, disp_dict)`` in training mode (``batch_dict`` must then hold ``gt_boxes``).

    ``pred_dicts`` is a list (one per sample) of ``{"pred_boxes" [N, 7], "pred_scores" [N], "pred_labels" [N]}``
    with 1-based labels; ``ret_dict`` is empty (OpenPCDet puts recall statistics there). The forward pass adds
    ``voxel_features``, ``encoded_spconv_tensor``, ``encoded_spconv_tensor_stride`` and ``head_outputs`` to
    ``batch_dict`` (see the module docstring).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SparseBackbone(cfg)
        self.head = SparseCenterHead(cfg.bev_channels, len(cfg.class_names), velocity=cfg.velocity)

    @property
    def bev_cell(self) -> tuple[float, float]:
        """BEV voxel size (m) in x and y at the head."""
        s = SparseBackbone.stride
        return self.cfg.voxel_size[0] * s, self.cfg.voxel_size[1] * s

    @property
    def bev_origin(self) -> tuple[float, float]:
        """(x, y) of the grid's lower corner (m)."""
        return self.cfg.point_cloud_range[0], self.cfg.point_cloud_range[1]

    def forward(self, batch_dict: dict[str, Any]) -> Any:
        batch_dict["voxel_features"] = mean_vfe(batch_dict["voxels"], batch_dict["voxel_num_points"])
        with spconv_cpu_guard(batch_dict["voxels"].device):
            bev = self.backbone(batch_dict["voxel_features"], batch_dict["voxel_coords"], batch_dict["batch_size"])
            outputs = self.head(bev)
        batch_dict["encoded_spconv_tensor"] = bev
        batch_dict["encoded_spconv_tensor_stride"] = SparseBackbone.stride
        batch_dict["head_outputs"] = outputs
        if self.training:
            cfg = self.cfg
            loss, tb_dict = head_loss(outputs, bev.indices, batch_dict["gt_boxes"], self.bev_cell, self.bev_origin,
                                      cfg.min_radius, cfg.hm_weight, cfg.loc_weight, cfg.reg_radius)
            return {"loss": loss}, tb_dict, {}
        return self.predict(batch_dict), {}

    @torch.no_grad()
    def predict(self, batch_dict: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Post-process the head outputs of the last forward pass over ``batch_dict`` into ``pred_dicts``."""
        cfg = self.cfg
        return post_process(batch_dict["head_outputs"], batch_dict["encoded_spconv_tensor"].indices,
                            batch_dict["batch_size"], self.bev_cell, self.bev_origin, cfg.max_proposals,
                            cfg.score_threshold, cfg.nms_radius, cfg.max_detections)


def build_model(config: ModelConfig | dict[str, Any]) -> VoxelNeXtLite:
    """The detector for a :class:`ModelConfig` or its :meth:`~ModelConfig.to_dict` form."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    return VoxelNeXtLite(cfg)


def load_model(weights: str | Path, sidecar: str | Path | None = None) -> VoxelNeXtLite:
    """The detector saved by :mod:`qcore_detection.train`, in eval mode on CPU.

    :param weights: ``model.safetensors``.
    :param sidecar: its JSON record (default: the same name with ``.json``), whose ``model_config`` rebuilds
        the model.
    """
    weights = Path(weights)
    return model_from_record(weights, json.loads(Path(sidecar or weights.with_suffix(".json")).read_text()))


def model_from_record(weights: str | Path, record: dict[str, Any]) -> VoxelNeXtLite:
    """The detector of a training ``record`` (its ``model_config``) with the weights in ``weights``, in eval
    mode on CPU."""
    from safetensors.torch import load_file

    model = build_model(record["model_config"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def bev_dense(batch_dict: dict[str, Any]) -> Tensor:
    """The backbone's BEV features of the last forward pass as a dense ``[B, C, H, W]`` tensor (zeros where
    no voxel is active): the distortion target of RDOQ's seed."""
    t = batch_dict["encoded_spconv_tensor"]
    idx = t.indices.long()
    ny, nx = t.spatial_shape
    dense = t.features.new_zeros(t.batch_size, ny, nx, t.features.shape[1])
    dense[idx[:, 0], idx[:, 1], idx[:, 2]] = t.features
    return dense.permute(0, 3, 1, 2)


def head_outputs(batch_dict: dict[str, Any]) -> Tensor:
    """The head's raw outputs of the last forward pass, ``[N_active, num_classes + 8]`` in
    :data:`HEAD_OUTPUT_ORDER` (heatmap logits, centre offset, z, log size, sin/cos; then vx, vy for a model with
    ``velocity``), rows aligned with
    ``batch_dict["encoded_spconv_tensor"].indices``."""
    outputs = batch_dict["head_outputs"]
    names = [*HEAD_OUTPUT_ORDER, *(["vel"] if "vel" in outputs else [])]
    return torch.cat([outputs[name] for name in names], dim=1)
