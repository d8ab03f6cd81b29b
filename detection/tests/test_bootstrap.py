"""Paired bootstrap over scenes: the mAP difference of two methods on the same scenes with a 95 % interval."""

from __future__ import annotations

import numpy as np
import pytest

import qcore
from qcore_detection.metric import detection_ap, paired_bootstrap

CLASSES = ("car", "pedestrian")


def _world(n_scenes: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gts = []
    for _ in range(n_scenes):
        k = int(rng.integers(2, 8))
        gts.append({"gt_boxes": rng.uniform(-40, 40, (k, 7)), "gt_labels": rng.integers(1, 3, k)})
    return gts


def _detector(gts: list[dict[str, np.ndarray]], noise: float, miss: float, seed: int) -> list[dict[str, np.ndarray]]:
    """Predictions near each box (centre noise ``noise`` m, a box missed with probability ``miss``), plus one
    random false positive per scene; scores favour the better-placed boxes."""
    rng = np.random.default_rng(seed)
    preds = []
    for g in gts:
        keep = rng.random(len(g["gt_labels"])) >= miss
        boxes = g["gt_boxes"][keep].copy()
        err = rng.normal(0.0, noise, (len(boxes), 2))
        boxes[:, :2] += err
        labels = g["gt_labels"][keep]
        scores = 1.0 / (1.0 + np.linalg.norm(err, axis=1)) * rng.uniform(0.8, 1.0, len(boxes))
        fp = rng.uniform(-40, 40, (1, 7))
        preds.append({"pred_boxes": np.concatenate([boxes, fp]), "pred_scores": np.append(scores, 0.3),
                      "pred_labels": np.append(labels, rng.integers(1, 3))})
    return preds


def test_identical_methods_tie_and_the_point_estimate_is_detection_ap() -> None:
    gts = _world(60)
    a = _detector(gts, noise=0.8, miss=0.1, seed=1)
    r = paired_bootstrap(a, a, gts, CLASSES, resamples=200)
    assert r.difference == 0.0 and r.low == 0.0 == r.high and r.tie
    assert r.map_a == pytest.approx(detection_ap(a, gts, CLASSES)["mAP"], abs=1e-9)
    # two different but equally good detectors: the difference is noise, the interval contains 0
    b = _detector(gts, noise=0.8, miss=0.1, seed=2)
    r = paired_bootstrap(a, b, gts, CLASSES, resamples=200)
    assert r.tie and r.low < r.difference < r.high and r.std_error > 0
    assert r.map_b == pytest.approx(detection_ap(b, gts, CLASSES)["mAP"], abs=1e-9)


def test_a_clearly_better_method_excludes_zero() -> None:
    gts = _world(60)
    good = _detector(gts, noise=0.3, miss=0.05, seed=1)
    bad = _detector(gts, noise=1.5, miss=0.3, seed=2)
    r = paired_bootstrap(good, bad, gts, CLASSES, resamples=200)
    assert not r.tie and 0.0 < r.low < r.difference < r.high
    want = detection_ap(good, gts, CLASSES)["mAP"] - detection_ap(bad, gts, CLASSES)["mAP"]
    assert r.difference == pytest.approx(want)
    flipped = paired_bootstrap(bad, good, gts, CLASSES, resamples=200)
    assert flipped.high < 0.0 and flipped.difference == pytest.approx(-r.difference)


def test_a_resample_equals_detection_ap_on_the_resampled_scenes() -> None:
    """The per-scene shortcut (flags matched once per scene, re-sorted per resample) is the metric itself."""
    from qcore_detection.metric import _class_tables, _resampled_map

    gts = _world(30, seed=3)
    preds = _detector(gts, noise=1.0, miss=0.2, seed=4)
    idx = np.random.default_rng(5).integers(0, 30, 30)
    tables = _class_tables(preds, gts, len(CLASSES), (0.5, 1.0, 2.0, 4.0))
    want = detection_ap([preds[i] for i in idx], [gts[i] for i in idx], CLASSES)["mAP"]
    assert _resampled_map(tables, idx, 0.1, 0.1) == pytest.approx(want, abs=1e-9)


def test_unpaired_inputs_are_refused() -> None:
    gts = _world(5)
    with pytest.raises(qcore.QcoreError, match="same scenes"):
        paired_bootstrap(_detector(gts, 1.0, 0.1, 1), _detector(gts[:4], 1.0, 0.1, 1), gts, CLASSES)
