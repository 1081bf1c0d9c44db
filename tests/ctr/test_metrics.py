"""AUC, logloss and group AUC against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meda.ctr.metrics import auc, classification_metrics, group_auc, logloss, sigmoid


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.zeros(4)) == 0.5
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="differ in length"):
        auc(np.ones(3), np.ones(4))


def test_logloss_is_clipped_and_matches_definition() -> None:
    y = np.array([1.0, 0.0, 1.0])
    p = np.array([0.9, 0.2, 0.6])
    expected = -np.mean(np.log([0.9, 0.8, 0.6]))
    assert logloss(y, p) == pytest.approx(expected)
    assert math.isfinite(logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


def test_group_auc_is_impression_weighted_over_two_class_groups() -> None:
    labels = np.array([1, 0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.6, 0.7])
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # groups 2 and 3 have one class only
    g0 = auc(labels[:3], scores[:3])  # 1.0, 3 impressions
    g1 = auc(labels[3:5], scores[3:5])  # 0.0, 2 impressions
    assert group_auc(labels, scores, groups) == pytest.approx((3 * g0 + 2 * g1) / 5)


def test_classification_metrics_from_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=200)
    labels = (rng.random(200) < sigmoid(logits)).astype(float)
    m = classification_metrics(labels, logits, groups=rng.integers(0, 5, 200))
    assert set(m) == {"auc", "logloss", "gauc"}
    assert m["auc"] == pytest.approx(brute_force_auc(labels, logits))
    assert m["logloss"] == pytest.approx(logloss(labels, 1 / (1 + np.exp(-logits))))
