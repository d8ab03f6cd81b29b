"""The sparse centre head of the VoxelNeXt-style detector: branches, training targets, loss and decoding.

The head works on the active voxels of a 2-D (BEV) sparse tensor, never on a dense map:

* branches (each ``SubMConv2d + BN + ReLU`` then a bias-free ``SubMConv2d`` plus a learnt bias, added to the
  features outside spconv): ``hm`` (one logit per class), ``center`` (x, y offset in cells from the voxel's
  corner), ``center_z`` (m), ``dim`` (log of dx, dy, dz in m), ``rot`` (sin, cos of the heading);
* targets: the active voxel nearest a box's centre is that box's positive; the class heatmap is a gaussian of
  the distance from each active voxel's centre to the box centre (radius in cells, ``sigma = (2 r + 1) / 6``),
  1 at the positive; focal loss over all active voxels, L1 regression at the positives (and, with
  ``reg_radius``, at every active voxel that close to a box centre);
* decoding: top-k over (active voxel, class) scores, a score threshold, then circle NMS per class (greedy by
  score, suppressing centres closer than the class radius, as CenterPoint), no dense max-pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcore_detection.spconv_layers import PORTABLE_CONV

#: head branches and their output channels (``hm`` has one per class)
REGRESSION_BRANCHES: dict[str, int] = {"center": 2, "center_z": 1, "dim": 3, "rot": 2}
#: the optional velocity branch (vx, vy in m/s), for data whose boxes carry velocities (nuScenes-like world)
VELOCITY_BRANCH: dict[str, int] = {"vel": 2}
_HM_INIT_BIAS = -2.19  # sigmoid(-2.19) ~ 0.1: the usual focal-loss prior


class SparseHeadBranch(nn.Module):
    """``SubMConv2d(3x3) + BN + ReLU`` then a bias-free ``SubMConv2d(3x3)`` and a learnt per-output bias."""

    def __init__(self, channels: int, out_channels: int, indice_key: str, init_bias: float = 0.0) -> None:
        super().__init__()
        self.conv = spconv.SubMConv2d(channels, channels, 3, padding=1, indice_key=indice_key, **PORTABLE_CONV)
        self.bn = nn.BatchNorm1d(channels)
        self.out = spconv.SubMConv2d(channels, out_channels, 3, padding=1, indice_key=indice_key, **PORTABLE_CONV)
        self.bias = nn.Parameter(torch.full((out_channels,), float(init_bias)))

    def forward(self, x: spconv.SparseConvTensor) -> Tensor:
        """Output features ``[N_active, out_channels]`` (same active set and order as ``x``)."""
        h = self.conv(x)
        h = h.replace_feature(F.relu(self.bn(h.features)))
        return self.out(h).features + self.bias


class SparseCenterHead(nn.Module):
    """The branches of the sparse centre head over one BEV sparse tensor."""

    def __init__(self, in_channels: int, num_classes: int, indice_key: str = "subm_bev", velocity: bool = False
                 ) -> None:
        super().__init__()
        outs = {"hm": num_classes, **REGRESSION_BRANCHES, **(VELOCITY_BRANCH if velocity else {})}
        self.branches = nn.ModuleDict({
            name: SparseHeadBranch(in_channels, n, indice_key, _HM_INIT_BIAS if name == "hm" else 0.0)
            for name, n in outs.items()})

    def forward(self, x: spconv.SparseConvTensor) -> dict[str, Tensor]:
        """Each branch's ``[N_active, k]`` output, rows aligned with ``x.indices``; ``hm`` holds logits."""
        return {name: branch(x) for name, branch in self.branches.items()}


def _radius_cells(dims_cells: Tensor, min_radius: int) -> Tensor:
    """Gaussian radius (cells) of each box: half its shorter BEV side, at least ``min_radius``."""
    return torch.clamp(torch.floor(0.5 * dims_cells.min(dim=1).values), min=float(min_radius))


def assign_targets(indices: Tensor, gt_boxes: Tensor, cell: tuple[float, float], origin: tuple[float, float],
                   num_classes: int, min_radius: int = 2, velocity: bool = False, reg_radius: float = 0.0
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Heatmap and regression targets on the active BEV voxels.

    With ``reg_radius > 0`` the regression is trained not only at each box's nearest active voxel but at every
    active voxel whose centre lies within ``reg_radius`` cells of the box centre (a voxel near several boxes
    belongs to the nearest centre; each box's nearest voxel always stays its own). The decoder takes the
    heatmap's highest voxel, which for long objects is often not the nearest one (bus: 29 % of the time with
    ``reg_radius = 0``); that voxel then predicts the centre from a trained offset instead of an untrained one.

    :param indices: ``[N, 3]`` (b, y, x) of the active voxels.
    :param gt_boxes: ``[B, K, 8]`` (x, y, z, dx, dy, dz, heading, label 1-based; label 0 = padding), or
        ``[B, K, 10]`` with (vx, vy) before the label.
    :param velocity: append the (vx, vy) targets (``gt_boxes`` must then have 10 columns).
    :param cell: BEV voxel size (m) in x and y at the head's stride.
    :param origin: (x, y) of the grid's lower corner (m).
    :param reg_radius: regress at every active voxel within this many cells of a box centre (0: the nearest
        voxel only).
    :return: ``hm`` ``[N, num_classes]`` in [0, 1] (exactly 1 at each box's nearest voxel), ``pos`` ``[P]``
        voxel rows of the regression positives (each box's nearest voxel first, in box order), ``reg`` ``[P, 8]``
        (offset x, offset y, z, log dx, log dy, log dz, sin, cos), ``[P, 10]`` with vx, vy when ``velocity``.
    """
    if velocity and gt_boxes.shape[-1] < 10:
        raise ValueError("velocity targets need gt_boxes with 10 columns (x, y, z, dx, dy, dz, heading, vx, vy, label)")
    n_reg = 10 if velocity else 8
    device = indices.device
    idx = indices.long()
    hm = torch.zeros(idx.shape[0], num_classes, device=device)
    pos_all, reg_all = [], []
    centers = torch.stack([idx[:, 2], idx[:, 1]], 1).float() + 0.5  # voxel centres (cells), (x, y)
    cell_t = torch.tensor(cell, device=device, dtype=torch.float32)
    origin_t = torch.tensor(origin, device=device, dtype=torch.float32)
    for b in range(gt_boxes.shape[0]):
        rows = torch.nonzero(idx[:, 0] == b).squeeze(1)
        boxes = gt_boxes[b]
        boxes = boxes[boxes[:, -1] > 0].float()
        if rows.numel() == 0 or boxes.shape[0] == 0:
            continue
        ctr = (boxes[:, :2] - origin_t) / cell_t  # [K, 2] box centres in cells
        d2 = torch.cdist(ctr, centers[rows]).pow(2)  # [K, Nb]
        nearest = d2.argmin(dim=1)
        radius = _radius_cells(boxes[:, 3:5] / cell_t, min_radius)
        sigma = (2 * radius + 1) / 6
        g = torch.exp(-d2 / (2 * sigma[:, None] ** 2)) * (d2 <= radius[:, None] ** 2)
        g[torch.arange(len(boxes), device=device), nearest] = 1.0
        labels = boxes[:, -1].long() - 1
        for c in labels.unique():
            hm[rows, c] = torch.maximum(hm[rows, c], g[labels == c].amax(dim=0))
        which = torch.arange(len(boxes), device=device)  # the box of each regression positive
        voxel = nearest
        if reg_radius > 0:
            owner = d2.argmin(dim=0)  # nearest box centre of each active voxel
            extra = torch.nonzero(d2.min(dim=0).values <= reg_radius ** 2).squeeze(1)
            extra = extra[~torch.isin(extra, nearest)]  # a box's nearest voxel is never another box's extra one
            which, voxel = torch.cat([which, owner[extra]]), torch.cat([nearest, extra])
        pos = rows[voxel]
        vox = idx[pos]
        offset = ctr[which] - torch.stack([vox[:, 2], vox[:, 1]], 1).float()
        boxes = boxes[which]
        reg = torch.cat([offset, boxes[:, 2:3], torch.log(boxes[:, 3:6].clamp(min=1e-3)),
                         torch.sin(boxes[:, 6:7]), torch.cos(boxes[:, 6:7])] + ([boxes[:, 7:9]] if velocity else []),
                        dim=1)
        pos_all.append(pos)
        reg_all.append(reg)
    if not pos_all:
        return hm, torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, n_reg, device=device)
    return hm, torch.cat(pos_all), torch.cat(reg_all)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of positives (``target == 1``)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = torch.log(p) * (1 - p).pow(alpha) * pos
    neg_loss = torch.log(1 - p) * p.pow(alpha) * (1 - target).pow(beta) * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def regression_of(outputs: dict[str, Tensor]) -> Tensor:
    """The regression branches concatenated in target order: ``[N, 8]`` (``[N, 10]`` with velocity)."""
    names = [*REGRESSION_BRANCHES, *(VELOCITY_BRANCH if "vel" in outputs else {})]
    return torch.cat([outputs[name] for name in names], dim=1)


def head_loss(outputs: dict[str, Tensor], indices: Tensor, gt_boxes: Tensor, cell: tuple[float, float],
              origin: tuple[float, float], min_radius: int, hm_weight: float, loc_weight: float,
              reg_radius: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Total loss ``hm_weight * focal + loc_weight * L1`` and its parts (for logging); the L1 is the mean over
    the regression positives of :func:`assign_targets` (``reg_radius``)."""
    hm_target, pos, reg_target = assign_targets(indices, gt_boxes, cell, origin, outputs["hm"].shape[1],
                                                min_radius, velocity="vel" in outputs, reg_radius=reg_radius)
    loss_hm = focal_loss(outputs["hm"], hm_target)
    if pos.numel():
        loss_loc = F.l1_loss(regression_of(outputs)[pos], reg_target, reduction="sum") / pos.numel()
    else:
        loss_loc = outputs["center"].sum() * 0.0
    loss = hm_weight * loss_hm + loc_weight * loss_loc
    return loss, {"loss_hm": float(loss_hm.detach()), "loss_loc": float(loss_loc.detach()),
                  "num_pos": float(pos.numel())}


def circle_nms(centers: Tensor, scores: Tensor, radius: float) -> Tensor:
    """Greedy NMS by BEV centre distance: indices (into the inputs, by falling score) of the kept boxes."""
    order = torch.argsort(scores, descending=True)
    close = (torch.cdist(centers[order], centers[order]) < radius).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= close[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def decode_boxes(outputs: dict[str, Tensor], indices: Tensor, cell: tuple[float, float],
                 origin: tuple[float, float]) -> Tensor:
    """Boxes ``[N, 7]`` (x, y, z, dx, dy, dz, heading) predicted at every active voxel; ``[N, 9]`` with vx, vy
    when the head has a velocity branch."""
    idx = indices.float()
    x = (idx[:, 2] + outputs["center"][:, 0]) * cell[0] + origin[0]
    y = (idx[:, 1] + outputs["center"][:, 1]) * cell[1] + origin[1]
    dims = torch.exp(outputs["dim"].clamp(max=5.0))
    heading = torch.atan2(outputs["rot"][:, 0], outputs["rot"][:, 1])
    vel = [outputs["vel"]] if "vel" in outputs else []
    return torch.cat([x[:, None], y[:, None], outputs["center_z"], dims, heading[:, None], *vel], dim=1)


def post_process(outputs: dict[str, Tensor], indices: Tensor, batch_size: int, cell: tuple[float, float],
                 origin: tuple[float, float], max_proposals: int, score_threshold: float,
                 nms_radius: Sequence[float], max_detections: int) -> list[dict[str, Tensor]]:
    """OpenPCDet-style predictions: per sample ``{"pred_boxes" [N, 7], "pred_scores" [N], "pred_labels" [N]}``
    (labels 1-based, sorted by falling score)."""
    scores_all = torch.sigmoid(outputs["hm"])
    boxes_all = decode_boxes(outputs, indices, cell, origin)
    num_classes = scores_all.shape[1]
    preds = []
    for b in range(batch_size):
        rows = torch.nonzero(indices[:, 0] == b).squeeze(1)
        flat = scores_all[rows].reshape(-1)
        k = min(max_proposals, flat.numel())
        top_scores, top = torch.topk(flat, k) if k else (flat, flat.long())
        keep = top_scores >= score_threshold
        top_scores, top = top_scores[keep], top[keep]
        voxel, cls = rows[top // num_classes], top % num_classes
        boxes, kept = boxes_all[voxel], []
        for c in cls.unique():
            sel = torch.nonzero(cls == c).squeeze(1)
            kept.append(sel[circle_nms(boxes[sel, :2], top_scores[sel], float(nms_radius[int(c)]))])
        sel = torch.cat(kept) if kept else top.new_zeros(0)
        sel = sel[torch.argsort(top_scores[sel], descending=True)][:max_detections]
        preds.append({"pred_boxes": boxes[sel], "pred_scores": top_scores[sel], "pred_labels": cls[sel] + 1})
    return preds
