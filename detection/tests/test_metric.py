"""Hand-made cases for the nuScenes-style centre-distance AP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcore_detection.metric import detection_ap

CLASSES = ("car", "pedestrian", "cyclist")


def nuscenes_ap(tp_flags: list[int], npos: int, min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """nuScenes' accumulate + calc_ap on score-sorted true-positive flags, in percent (the reference)."""
    tp = np.cumsum(np.array(tp_flags, dtype=float))
    fp = np.cumsum(1.0 - np.array(tp_flags, dtype=float))
    prec = tp / (tp + fp)
    rec = tp / npos
    prec = np.interp(np.linspace(0, 1, 101), rec, prec, right=0)
    prec = prec[round(100 * min_recall) + 1:] - min_precision
    prec[prec < 0] = 0
    return 100.0 * float(np.mean(prec)) / (1.0 - min_precision)


def _boxes(xy: list[tuple[float, float]]) -> np.ndarray:
    b = np.zeros((len(xy), 7), dtype=np.float32)
    if xy:
        b[:, :2] = xy
        b[:, 3:6] = (4.0, 2.0, 1.5)
    return b


def _gt(xy: list[tuple[float, float]], labels: list[int]) -> dict:
    return {"gt_boxes": _boxes(xy), "gt_labels": np.array(labels, dtype=np.int64)}


def _pred(xy: list[tuple[float, float]], scores: list[float], labels: list[int]) -> dict:
    return {"pred_boxes": _boxes(xy), "pred_scores": np.array(scores, dtype=np.float32),
            "pred_labels": np.array(labels, dtype=np.int64)}


def _scenes() -> list[dict]:
    return [_gt([(0, 0), (10, 5), (-20, 3)], [1, 1, 2]), _gt([(5, -5), (30, 30), (1, 1)], [1, 3, 2])]


def _perfect(gts: list[dict], offset: tuple[float, float] = (0.0, 0.0)) -> list[dict]:
    out = []
    for i, g in enumerate(gts):
        xy = [(x + offset[0], y + offset[1]) for x, y in g["gt_boxes"][:, :2].tolist()]
        out.append(_pred(xy, [0.9 - 0.01 * (i * 10 + k) for k in range(len(xy))], g["gt_labels"].tolist()))
    return out


def test_perfect_predictions_score_100() -> None:
    r = detection_ap(_perfect(_scenes()), _scenes(), CLASSES)
    assert r["mAP"] == pytest.approx(100.0)
    for name in CLASSES:
        assert r[f"AP/{name}"] == pytest.approx(100.0)
        for thr in (0.5, 1.0, 2.0, 4.0):
            assert r[f"AP/{name}@{thr}"] == pytest.approx(100.0)


def test_torch_inputs_accepted() -> None:
    preds = [{k: torch.as_tensor(v) for k, v in p.items()} for p in _perfect(_scenes())]
    gts = [{k: torch.as_tensor(v) for k, v in g.items()} for g in _scenes()]
    assert detection_ap(preds, gts, CLASSES)["mAP"] == pytest.approx(100.0)


def test_three_metres_off_counts_only_at_4m() -> None:
    r = detection_ap(_perfect(_scenes(), offset=(3.0, 0.0)), _scenes(), CLASSES)
    for name in CLASSES:
        assert r[f"AP/{name}@4.0"] == pytest.approx(100.0)
        for thr in (0.5, 1.0, 2.0):
            assert r[f"AP/{name}@{thr}"] == 0.0
        assert r[f"AP/{name}"] == pytest.approx(25.0)
    assert r["mAP"] == pytest.approx(25.0)


def test_distance_threshold_is_strict() -> None:
    gts = [_gt([(0, 0)], [1])]
    r = detection_ap([_pred([(2.0, 0)], [0.5], [1])], gts, CLASSES, dist_thresholds=(2.0, 2.5))
    assert r["AP/car@2.0"] == 0.0 and r["AP/car@2.5"] == pytest.approx(100.0)


def test_low_score_duplicates_keep_perfect_ap() -> None:
    gts = _scenes()
    preds = _perfect(gts)
    for p in preds:  # a second copy of every box, 0.3 m off, scored below every true positive
        p["pred_boxes"] = np.concatenate([p["pred_boxes"], p["pred_boxes"] + np.float32(0.3)])
        p["pred_scores"] = np.concatenate([p["pred_scores"], p["pred_scores"] - np.float32(0.5)])
        p["pred_labels"] = np.concatenate([p["pred_labels"], p["pred_labels"]])
    r = detection_ap(preds, gts, CLASSES)
    n = sum(int((g["gt_labels"] == 1).sum()) for g in gts)  # cars: n true positives, then n false ones
    assert r["AP/car@1.0"] == pytest.approx(nuscenes_ap([1] * n + [0] * n, n))
    assert r["mAP"] > 99.0  # only the recall-1.0 bin sees the trailing false positives


def test_high_score_duplicate_costs_precision() -> None:
    gts = [_gt([(0, 0), (10, 0)], [1, 1])]
    # the duplicate of GT 0 outranks the detection of GT 1: precision 1, 1/2, 2/3 at recall 0.5, 0.5, 1
    preds = [_pred([(0, 0), (0.1, 0), (10, 0)], [0.9, 0.8, 0.7], [1, 1, 1])]
    r = detection_ap(preds, gts, CLASSES, dist_thresholds=(1.0,))
    assert r["AP/car@1.0"] == pytest.approx(nuscenes_ap([1, 0, 1], 2))
    assert r["AP/car@1.0"] < 90.0


def test_wrong_class_is_false_positive() -> None:
    gts = [_gt([(0, 0)], [1])]
    r = detection_ap([_pred([(0, 0)], [0.9], [2])], gts, CLASSES)
    assert r["AP/car"] == 0.0
    assert math.isnan(r["AP/pedestrian"]) and math.isnan(r["AP/cyclist"])
    assert r["mAP"] == 0.0


def test_class_without_gt_is_nan_and_excluded() -> None:
    gts = [_gt([(0, 0), (5, 5)], [1, 2])]
    r = detection_ap([_pred([(0, 0), (5, 5)], [0.9, 0.8], [1, 2])], gts, CLASSES)
    assert math.isnan(r["AP/cyclist"]) and math.isnan(r["AP/cyclist@0.5"])
    assert r["mAP"] == pytest.approx(100.0)


def test_no_predictions_give_zero() -> None:
    gts = _scenes()
    empty = [_pred([], [], []) for _ in gts]
    r = detection_ap(empty, gts, CLASSES)
    assert r["mAP"] == 0.0 and r["AP/car@4.0"] == 0.0


def test_prediction_matches_only_its_own_scene() -> None:
    gts = [_gt([(0, 0)], [1]), _gt([], [])]
    preds = [_pred([], [], []), _pred([(0, 0)], [0.9], [1])]
    assert detection_ap(preds, gts, CLASSES)["AP/car"] == 0.0


def test_hand_computed_pr_curve() -> None:
    """Two scenes, 4 cars, 5 predictions at 1 m:
    score 0.9 scene 0 TP, 0.8 scene 0 FP, 0.7 scene 1 TP, 0.6 scene 1 FP, 0.5 scene 0 TP; one car missed.
    Precision at the true positives: recall 0.25 -> 1, 0.5 -> 2/3, 0.75 -> 3/5; 0 beyond recall 0.75."""
    gts = [_gt([(0, 0), (10, 0)], [1, 1]), _gt([(0, 0), (20, 0)], [1, 1])]
    preds = [_pred([(0.2, 0), (5, 5), (10, 0.5)], [0.9, 0.8, 0.5], [1, 1, 1]),
             _pred([(0, 0.3), (30, 0)], [0.7, 0.6], [1, 1])]
    r = detection_ap(preds, gts, CLASSES, dist_thresholds=(1.0,))
    expected = nuscenes_ap([1, 0, 1, 0, 1], 4)
    assert r["AP/car@1.0"] == pytest.approx(expected)
    # the (recall, precision) points nuScenes interpolates: (1/4, 1), (1/4, 1/2), (1/2, 2/3), (1/2, 1/2), (3/4, 3/5)
    assert 40.0 < expected < 55.514  # below the curve through the true positives only (55.514)
    assert r["mAP"] == pytest.approx(expected)


def test_greedy_takes_nearest_unmatched() -> None:
    # the top prediction sits between two cars, nearer to A; the second is on A -> it falls back to B (0.9 m)
    gts = [_gt([(0, 0), (1.5, 0)], [1, 1])]
    preds = [_pred([(0.6, 0), (0.0, 0)], [0.9, 0.8], [1, 1])]
    r = detection_ap(preds, gts, CLASSES, dist_thresholds=(0.5, 2.0))
    assert r["AP/car@2.0"] == pytest.approx(100.0)
    # at 0.5 m the top one misses (0.6 m), then the second matches A: precision 1/2 at recall 1/2
    assert r["AP/car@0.5"] == pytest.approx(nuscenes_ap([0, 1], 2))  # precision rises from 0 to 1/2


def test_equal_scores_rank_the_later_prediction_first_as_nuscenes() -> None:
    gts = [_gt([(0, 0)], [1])]
    preds = [_pred([(0, 0), (5, 5)], [0.5, 0.5], [1, 1])]  # a true and a false positive with one score
    r = detection_ap(preds, gts, CLASSES, dist_thresholds=(1.0,))
    assert r["AP/car@1.0"] == pytest.approx(nuscenes_ap([0, 1], 1))
