"""Evaluation metrics for click prediction: AUC, logloss and group AUC (numpy, exact)."""

from __future__ import annotations

import numpy as np

LOGLOSS_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC by ranks (Mann-Whitney U); tied scores share their mean rank.

    Equals the fraction of (positive, negative) pairs ordered correctly, ties counting 1/2.
    Returns NaN when ``labels`` has only one class.
    """
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # mean 1-based rank of each distinct score: ranks before it + (count + 1) / 2
    mean_rank = np.cumsum(counts) - counts + (counts + 1) / 2.0
    rank_sum = mean_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    if labels.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {labels.shape[0]} vs {p.shape[0]}")
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups that have both classes.

    Returns NaN when no group has both a click and a non-click.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    order = np.argsort(groups, kind="stable")
    g_sorted = groups[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    ends = np.r_[starts[1:], g_sorted.size]
    total, weight = 0.0, 0
    for s, e in zip(starts, ends, strict=True):
        idx = order[s:e]
        y = labels[idx]
        if 0 < y.sum() < y.size:
            total += auc(y, scores[idx]) * y.size
            weight += y.size
    return total / weight if weight else float("nan")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None
) -> dict[str, float]:
    """``{"auc", "logloss"}`` (plus ``"gauc"`` when ``groups`` is given) from click logits."""
    out = {"auc": auc(labels, logits), "logloss": logloss(labels, sigmoid(logits))}
    if groups is not None:
        out["gauc"] = group_auc(labels, logits, groups)
    return out
