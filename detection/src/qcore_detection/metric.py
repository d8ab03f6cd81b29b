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

:func:`paired_bootstrap` gives the difference of two methods' mAP on the same scenes a confidence interval by
resampling scenes (BENCHMARKS.md's detection tables call differences inside it ties).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcore import QcoreError

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


def _match(d: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy matching of one scene's predictions (rows of ``d``: distances to the scene's ground truths of the
    class) in ``order``; returns true-positive flags in that order. Only predictions with some ground truth
    within ``threshold`` are visited."""
    nearest = d.min(1) if d.shape[1] else np.full(len(d), np.inf)
    taken = np.zeros(d.shape[1], dtype=bool)
    tp = np.zeros(len(order), dtype=bool)
    for rank in np.nonzero(nearest[order] < threshold)[0]:
        dist = np.where(taken, np.inf, d[order[rank]])
        j = int(np.argmin(dist))
        if dist[j] < threshold:
            taken[j] = True
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
    thresholds = [float(t) for t in dist_thresholds]
    tables = _class_tables(preds, gts, len(class_names), thresholds)
    every = np.arange(len(gts))
    result: dict[str, float] = {}
    class_means: list[float] = []
    for name, table in zip(class_names, tables, strict=True):
        aps = _class_aps(table, every, min_recall, min_precision)
        for thr, ap in zip(thresholds, aps or [math.nan] * len(thresholds), strict=True):
            result[f"AP/{name}@{thr}"] = ap
        result[f"AP/{name}"] = float(np.mean(aps)) if aps is not None else math.nan
        if aps is not None:
            class_means.append(result[f"AP/{name}"])
        log.debug("class %s: %d gt, %d predictions, AP %.2f", name, int(table.n_gt.sum()),
                  sum(len(s) for s in table.scores), result[f"AP/{name}"])
    result["mAP"] = float(np.mean(class_means)) if class_means else math.nan
    return result


@dataclass(frozen=True)
class BootstrapInterval:
    """A paired-bootstrap confidence interval of ``mAP(a) - mAP(b)`` (percentage points).

    :param difference: the difference on the scenes as given.
    :param low, high: the interval's ends (percentiles of the resampled differences).
    :param map_a, map_b: each method's mAP on the scenes as given.
    :param confidence: the interval's coverage (0.95).
    :param resamples: how many resamples of the scenes it used.
    :param std_error: the standard deviation of the resampled differences.
    """

    difference: float
    low: float
    high: float
    map_a: float
    map_b: float
    confidence: float
    resamples: int
    std_error: float

    @property
    def tie(self) -> bool:
        """True when the interval contains 0: the two methods cannot be told apart on these scenes."""
        return self.low <= 0.0 <= self.high

    def __str__(self) -> str:
        return f"{self.difference:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


@dataclass
class _ClassTable:
    """One class's predictions, per scene: scores and true-positive flags (per threshold, within-scene greedy
    matching), and the scene's ground-truth count."""

    scores: list[np.ndarray]
    tp: list[np.ndarray]  # [n_thresholds, n] per scene
    n_gt: np.ndarray


def _class_tables(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], n_classes: int,
                  thresholds: Sequence[float]) -> list[_ClassTable]:
    """Per class, each scene's predictions with their true-positive flags. Greedy matching never crosses
    scenes, and the global score order restricted to one scene is that scene's own order, so the flags of a
    scene are the same in every resample that contains it: :func:`detection_ap` on a resampled list equals
    re-sorting these flags."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction entries for {len(gts)} scenes")
    tables = []
    for c in range(1, n_classes + 1):
        scores, flags, n_gt = [], [], []
        for p, g in zip(preds, gts, strict=True):
            lab = _np(p["pred_labels"]).reshape(-1).astype(np.int64)
            m = lab == c
            s = _np(p["pred_scores"]).reshape(-1).astype(np.float64)[m]
            g_xy = _xy(g["gt_boxes"])[_np(g["gt_labels"]).reshape(-1).astype(np.int64) == c]
            d = np.linalg.norm(_xy(p["pred_boxes"])[m][:, None] - g_xy[None], axis=-1)
            order = np.argsort(s, kind="stable")[::-1]
            tp = np.zeros((len(thresholds), len(s)), dtype=bool)
            for t, thr in enumerate(thresholds):
                tp[t, order] = _match(d, order, float(thr))
            scores.append(s)
            flags.append(tp)
            n_gt.append(len(g_xy))
        tables.append(_ClassTable(scores, flags, np.asarray(n_gt)))
    return tables


def _class_aps(table: _ClassTable, idx: np.ndarray, min_recall: float, min_precision: float) -> list[float] | None:
    """One class's AP (percent) per distance threshold over the scenes ``idx`` (with repeats): the scenes'
    predictions in one global score order (descending; ties with the later one first, as nuScenes), their
    true-positive flags from the table. None when those scenes hold no ground truth of the class."""
    npos = int(table.n_gt[idx].sum())
    if npos == 0:
        return None
    scores = _cat([table.scores[i] for i in idx], np.float64)
    tp = np.concatenate([table.tp[i] for i in idx], axis=1)
    order = np.argsort(scores, kind="stable")[::-1]
    return [100.0 * _ap_from_tp(row[order], npos, min_recall, min_precision) for row in tp]


def _resampled_map(tables: list[_ClassTable], idx: np.ndarray, min_recall: float, min_precision: float) -> float:
    """mAP (percent) over the scenes ``idx`` (with repeats), as :func:`detection_ap` computes it."""
    means = [float(np.mean(aps)) for t in tables
             if (aps := _class_aps(t, idx, min_recall, min_precision)) is not None]
    return float(np.mean(means)) if means else math.nan


def paired_bootstrap(preds_a: Sequence[Mapping[str, Any]], preds_b: Sequence[Mapping[str, Any]],
                     gts: Sequence[Mapping[str, Any]], class_names: Sequence[str], resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0,
                     dist_thresholds: Sequence[float] = (0.5, 1.0, 2.0, 4.0), min_recall: float = 0.1,
                     min_precision: float = 0.1) -> BootstrapInterval:
    """Paired bootstrap over scenes of the mAP difference of two methods evaluated on the same scenes.

    ``preds_a``/``preds_b``: each method's predictions per scene, ``gts`` the ground truth of those scenes (the
    formats of :func:`detection_ap`). Each resample draws ``len(gts)`` scenes with replacement, the same scenes
    for both methods, and computes ``mAP(a) - mAP(b)`` exactly as :func:`detection_ap` would on that list; the
    interval is the central ``confidence`` percentile range of those differences. A difference whose interval
    contains 0 is a tie (:attr:`BootstrapInterval.tie`). Deterministic for a given ``seed``.
    """
    if not 0.0 < confidence < 1.0:
        raise QcoreError(f"confidence={confidence} must lie strictly between 0 and 1")
    if resamples < 1:
        raise QcoreError(f"resamples={resamples} must be at least 1")
    if len(preds_a) != len(gts) or len(preds_b) != len(gts):
        raise QcoreError(f"paired bootstrap needs both methods on the same scenes: {len(preds_a)} and "
                         f"{len(preds_b)} prediction entries for {len(gts)} scenes")
    if not gts:
        raise QcoreError("no scenes to resample")
    thresholds = [float(t) for t in dist_thresholds]
    ta = _class_tables(preds_a, gts, len(class_names), thresholds)
    tb = _class_tables(preds_b, gts, len(class_names), thresholds)
    every = np.arange(len(gts))
    map_a = _resampled_map(ta, every, min_recall, min_precision)
    map_b = _resampled_map(tb, every, min_recall, min_precision)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, len(gts), len(gts))
        diffs[r] = _resampled_map(ta, idx, min_recall, min_precision) - _resampled_map(tb, idx, min_recall,
                                                                                       min_precision)
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        raise QcoreError("every bootstrap resample had an undefined mAP (no ground-truth object of any class in "
                         "the drawn scenes); evaluate on more scenes")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.percentile(diffs, [tail, 100.0 - tail]))
    return BootstrapInterval(difference=map_a - map_b, low=low, high=high, map_a=map_a, map_b=map_b,
                             confidence=confidence, resamples=len(diffs), std_error=float(np.std(diffs)))
