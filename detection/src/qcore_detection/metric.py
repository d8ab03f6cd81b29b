"""nuScenes-style detection AP: greedy matching by BEV centre distance, no IoU.

For each class and distance threshold, the predictions of that class over all scenes are sorted by score
(descending; among equal scores the later one first, as nuScenes' sort does); each one is matched to the
nearest not yet matched ground-truth box of the same class in the same scene, and is a true positive if that
distance is below the threshold (strictly, as nuScenes). Predictions of another class never match, so a wrong
class is a false positive of its class. Precision and recall after every prediction are interpolated on the
recall grid 0, 0.01, ..., 1 (``np.interp``, precision 0 beyond the highest recall reached); the bins up to
and including ``min_recall`` are dropped, ``min_precision`` is subtracted (clipped at 0) and the mean is
rescaled by ``1 / (1 - min_precision)`` -- nuScenes' ``accumulate`` and ``calc_ap``, step for step.

Results are percentages (0..100). A class without ground truth gets AP NaN and is left out of ``mAP``; a
class with ground truth but no predictions gets 0. nuScenes' other filters (500 boxes per sample, range and
bike-rack filtering) are not applied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RECALL_GRID = np.linspace(0.0, 1.0, 101)


def _np(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device) or list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _xy(boxes: Any) -> np.ndarray:
    """BEV centres [N, 2] (float64) of boxes [N, >=2]; empty input gives [0, 2]."""
    a = _np(boxes).astype(np.float64)
    return np.zeros((0, 2)) if a.size == 0 else a.reshape(-1, a.shape[-1])[:, :2]


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _ap_from_tp(tp: np.ndarray, npos: int, min_recall: float, min_precision: float) -> float:
    """AP in [0, 1] from true-positive flags of score-sorted predictions, exactly as nuScenes computes it:
    precision and recall after every prediction, interpolated on 101 recall points (0 beyond the last recall),
    bins up to ``min_recall`` dropped, ``min_precision`` subtracted and the rest normalised."""
    if len(tp) == 0 or not tp.any():
        return 0.0
    tp_cum = np.cumsum(tp)
    precision = tp_cum / np.arange(1, len(tp) + 1)
    recall = tp_cum / npos
    prec = np.interp(RECALL_GRID, recall, precision, right=0.0)
    prec = prec[round(100 * min_recall) + 1:] - min_precision
    return float(np.mean(np.clip(prec, 0.0, None))) / (1.0 - min_precision)


def _match(scene_of: np.ndarray, dists: list[np.ndarray], local: np.ndarray, order: np.ndarray,
           n_gt: Sequence[int], threshold: float) -> np.ndarray:
    """Greedy matching in ``order``; returns true-positive flags in that order. Only predictions with some
    ground truth of their scene within ``threshold`` are visited."""
    nearest = _cat([d.min(1) if d.shape[1] else np.full(len(d), np.inf) for d in dists], np.float64)
    taken = [np.zeros(n, dtype=bool) for n in n_gt]
    tp = np.zeros(len(order), dtype=bool)
    for rank in np.nonzero(nearest[order] < threshold)[0]:
        i = order[rank]
        s = scene_of[i]
        d = np.where(taken[s], np.inf, dists[s][local[i]])
        j = int(np.argmin(d))
        if d[j] < threshold:
            taken[s][j] = True
            tp[rank] = True
    return tp


def detection_ap(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                 dist_thresholds: Sequence[float] = (0.5, 1.0, 2.0, 4.0), min_recall: float = 0.1,
                 min_precision: float = 0.1) -> dict[str, float]:
    """nuScenes-style AP by BEV centre distance (percent).

    ``preds``: per scene, ``pred_boxes`` [N, >=2] (x, y first), ``pred_scores`` [N], ``pred_labels`` [N]
    (1-based into ``class_names``); ``gts``: per scene, ``gt_boxes`` [K, >=2] and ``gt_labels`` [K]. numpy
    arrays or torch tensors. Returns ``mAP`` (mean over classes with ground truth of the per-class mean over
    thresholds), ``AP/<class>`` and ``AP/<class>@<thr>`` with ``<thr>`` as ``str(float(thr))`` (``0.5``,
    ``1.0``, ...)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction entries for {len(gts)} scenes")
    p_xy = [_xy(p["pred_boxes"]) for p in preds]
    p_score = [_np(p["pred_scores"]).reshape(-1).astype(np.float64) for p in preds]
    p_label = [_np(p["pred_labels"]).reshape(-1).astype(np.int64) for p in preds]
    g_xy = [_xy(g["gt_boxes"]) for g in gts]
    g_label = [_np(g["gt_labels"]).reshape(-1).astype(np.int64) for g in gts]

    result: dict[str, float] = {}
    class_means: list[float] = []
    for c, name in enumerate(class_names, start=1):
        gt_c = [xy[lab == c] for xy, lab in zip(g_xy, g_label, strict=True)]
        n_gt = [len(g) for g in gt_c]
        npos = sum(n_gt)
        sel = [lab == c for lab in p_label]
        scores = _cat([s[m] for s, m in zip(p_score, sel, strict=True)], np.float64)
        scene_of = _cat([np.full(int(m.sum()), i) for i, m in enumerate(sel)], np.int64)
        local = _cat([np.arange(int(m.sum())) for m in sel], np.int64)
        dists = [np.linalg.norm(xy[m][:, None] - g[None], axis=-1) for xy, m, g in zip(p_xy, sel, gt_c, strict=True)]
        order = np.argsort(scores, kind="stable")[::-1]  # nuScenes: descending, ties with the later one first
        aps = []
        for thr in dist_thresholds:
            if npos == 0:
                ap = math.nan
            else:
                tp = _match(scene_of, dists, local, order, n_gt, float(thr))
                ap = 100.0 * _ap_from_tp(tp, npos, min_recall, min_precision)
            result[f"AP/{name}@{float(thr)}"] = ap
            aps.append(ap)
        result[f"AP/{name}"] = float(np.mean(aps)) if npos else math.nan
        if npos:
            class_means.append(result[f"AP/{name}"])
        log.debug("class %s: %d gt, %d predictions, AP %.2f", name, npos, len(scores), result[f"AP/{name}"])
    result["mAP"] = float(np.mean(class_means)) if class_means else math.nan
    return result
