"""Bounded-memory AUC (:class:`meda.ctr.metrics.BinnedMetrics`) against the exact ``auc()``: random,
tied and degenerate scores, the stated error bound, split accumulation (what ranks do), and a
training run with ``eval_auc="binned"`` against ``"exact"``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from learnable import learnable_dataset
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic
from meda.ctr import train as train_module
from meda.ctr.metrics import AUC_BINS, AUC_LOGIT_RANGE, BinnedMetrics, auc, binned_auc, logloss, sigmoid
from meda.ctr.sources import InMemorySource
from meda.ctr.train import TrainConfig, Trainer, train

WIDTH = (AUC_LOGIT_RANGE[1] - AUC_LOGIT_RANGE[0]) / AUC_BINS
FAST = {"batch_size": 256, "lr": 3e-3, "embedding_dim": 8, "hidden_units": (32,), "epochs": 2}


def _binned(labels: np.ndarray, scores: np.ndarray, parts: int = 1) -> BinnedMetrics:
    acc = BinnedMetrics()
    for y, s in zip(np.array_split(labels, parts), np.array_split(scores, parts), strict=True):
        acc.update(torch.from_numpy(y), torch.from_numpy(s))
    return acc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scores_within_the_bound_and_the_bin_width_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(200_000) < 0.2).astype(np.float32)
    scores = (rng.normal(size=labels.size) + 0.7 * labels - 2.0).astype(np.float32)  # std 1: density <= 0.4
    got = _binned(labels, scores).compute()
    exact = auc(labels, scores)
    assert abs(got["auc"] - exact) <= got["auc_bound"] + 1e-12
    # the docstring's bin-width bound: density of the negatives <= 1/sqrt(2 pi) per unit logit -> d * w / 2
    assert got["auc_bound"] <= WIDTH / math.sqrt(2 * math.pi) / 2 * 1.1  # 10%: sampling noise of the histogram
    assert abs(got["auc"] - exact) < 1e-4
    assert got["logloss"] == pytest.approx(logloss(labels, sigmoid(scores)), rel=1e-12)


def test_the_bound_is_reached_when_every_pair_shares_a_bin() -> None:
    labels = np.array([0, 0, 1, 1], dtype=np.float32)
    scores = np.array([0.0, WIDTH / 8, WIDTH / 4, WIDTH / 2], dtype=np.float32)  # one bin, perfectly ordered
    got = _binned(labels, scores).compute()
    assert auc(labels, scores) == 1.0
    assert got["auc"] == 0.5 and got["auc_bound"] == 0.5  # |error| = bound: the bound cannot be tightened


def test_ties_in_distinct_bins_equal_the_exact_auc() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(50_000) < 0.3).astype(np.float32)
    scores = rng.integers(-6, 7, labels.size).astype(np.float32) + labels * rng.integers(0, 2, labels.size)
    got = _binned(labels, scores).compute()  # every distinct score in its own bin, tied pairs 1/2 in both
    assert got["auc"] == pytest.approx(auc(labels, scores), abs=1e-12)


def test_degenerate_inputs() -> None:
    ones = np.ones(100, dtype=np.float32)
    scores = np.linspace(-3, 3, 100).astype(np.float32)
    assert math.isnan(_binned(ones, scores).compute()["auc"]) and math.isnan(auc(ones, scores))  # one class
    assert math.isnan(_binned(0 * ones, scores).compute()["auc"])
    labels = (np.arange(100) % 3 == 0).astype(np.float32)
    assert _binned(labels, np.full(100, 0.25, np.float32)).compute()["auc"] == 0.5  # all scores equal
    assert auc(labels, np.full(100, 0.25)) == 0.5
    clipped = np.where(labels > 0, 50.0, -50.0).astype(np.float32)  # beyond the range: the end bins, still ordered
    assert _binned(labels, clipped).compute()["auc"] == 1.0
    empty = BinnedMetrics().compute()
    assert math.isnan(empty["auc"]) and math.isnan(empty["logloss"])
    assert all(map(math.isnan, binned_auc(np.zeros(4), np.ones(4))))  # no positives: NaN, not 0


def test_two_parts_merged_equal_one_accumulation() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random(30_001) < 0.25).astype(np.float32)
    scores = rng.normal(size=labels.size).astype(np.float32) * 3
    whole = _binned(labels, scores, parts=7)
    first, second = _binned(labels[:12_345], scores[:12_345]), _binned(labels[12_345:], scores[12_345:])
    first.merge(second)
    assert torch.equal(first.counts, whole.counts)
    a, b = first.compute(), whole.compute()
    assert a["auc"] == b["auc"] and a["auc_bound"] == b["auc_bound"]  # exact: integer counts add
    assert a["logloss"] == pytest.approx(b["logloss"], rel=1e-12)  # float64 sums in another order


@pytest.fixture(scope="module")
def dataset():
    return learnable_dataset(rows=4000)


def test_training_binned_matches_exact(dataset, tmp_path: Path) -> None:
    exact = train(dataset, TrainConfig(mode="meda", eval_auc="exact", **FAST))
    binned = train(dataset, TrainConfig(mode="meda", eval_auc="binned", **FAST), tmp_path)
    for e, b in zip(exact["epochs"], binned["epochs"], strict=True):
        for split in ("valid", "test"):
            assert abs(e[f"{split}_auc"] - b[f"{split}_auc"]) < 1e-3
            assert abs(e[f"{split}_auc"] - b[f"{split}_auc"]) <= b[f"{split}_auc_bound"] + 1e-12
            assert b[f"{split}_logloss"] == pytest.approx(e[f"{split}_logloss"], rel=1e-6)
    assert exact["evaluation"]["auc"] == {"valid": "exact", "test": "exact"}  # auto/exact: small splits
    note = json.loads((tmp_path / "metrics.json").read_text())["evaluation"]
    assert note["auc"] == {"valid": "binned", "test": "binned"} and note["auc_bins"] == AUC_BINS


def test_binned_evaluation_keeps_no_row_of_the_split(dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant memory: binned evaluation never gathers logits nor reads a split's label array."""

    def refuse(*_: object) -> None:
        raise AssertionError("binned evaluation must not hold every row")

    monkeypatch.setattr(Trainer, "predict", refuse)
    monkeypatch.setattr(InMemorySource, "label", property(refuse))
    result = train(dataset, TrainConfig(mode="multi-epoch", eval_auc="binned", **{**FAST, "epochs": 1}))
    assert result["epochs"][0]["test_auc"] > 0.6


def test_more_bins_tighten_the_bound(dataset) -> None:
    one_epoch = {**FAST, "epochs": 1}
    runs = {b: train(dataset, TrainConfig(eval_auc="binned", eval_auc_bins=b, **one_epoch)) for b in (2**12, 2**20)}
    coarse, fine = (runs[b]["epochs"][0] for b in (2**12, 2**20))
    assert fine["test_auc_bound"] < coarse["test_auc_bound"]
    assert runs[2**20]["evaluation"]["auc_bins"] == 2**20
    with pytest.raises(ValueError, match="eval_auc_bins"):
        TrainConfig(eval_auc_bins=1)


def test_auto_switches_to_binned_above_the_row_bound(dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "EXACT_AUC_MAX_ROWS", 399)  # valid and test hold 400 rows each
    result = train(dataset, TrainConfig(mode="multi-epoch", **{**FAST, "epochs": 1}))
    assert result["evaluation"]["auc"] == {"valid": "binned", "test": "binned"}
    assert "test_auc_bound" in result["epochs"][0]


def test_binned_refuses_group_auc_and_meda_continual() -> None:
    with pytest.raises(ValueError, match="group AUC"):
        Trainer(learnable_dataset(rows=1000, with_group=True), TrainConfig(eval_auc="binned", **FAST))
    with pytest.raises(ValueError, match="meda-continual"):
        TrainConfig(mode="meda-continual", eval_auc="binned")
    with pytest.raises(ValueError, match="eval_auc"):
        TrainConfig(eval_auc="approx")


def test_one_class_split_is_null_under_binned(tmp_path: Path) -> None:
    data = learnable_dataset(rows=2000)
    data.test.label[:] = 0.0
    train(data, TrainConfig(eval_auc="binned", **{**FAST, "epochs": 1}), tmp_path)
    epoch = json.loads((tmp_path / "metrics.json").read_text())["epochs"][0]
    assert epoch["test_auc"] is None and epoch["test_auc_bound"] is None and epoch["valid_auc"] is not None


def test_help_documents_eval_auc() -> None:
    result = CliRunner().invoke(app, ["ctr", "train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--eval-auc" in result.output and "binned" in result.output


@pytest.mark.slow
def test_two_processes_all_reduce_the_histograms(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes: binned metrics from all-reduced histograms vs exact from gathered logits."""
    schema = synthetic.schema_for("low-cardinality", "parquet")
    synthetic.write(synthetic.generate("low-cardinality", 8000, seed=3), tmp_path / "d.parquet", "parquet", schema)
    runs, env = {}, {**os.environ, "OMP_NUM_THREADS": "1"}
    for method in ("exact", "binned"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "meda",
               "ctr", "train", "--data", str(tmp_path / "d.parquet"), "--format", "parquet", "--out",
               str(tmp_path / method), "--mode", "meda", "--epochs", "2", "--batch-size", "512", "--hidden-units",
               "32", "--embedding-dim", "8", "--lr", "0.003", "--no-cache", "--eval-auc", method]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[method] = json.loads((tmp_path / method / "metrics.json").read_text())
    assert runs["binned"]["evaluation"]["auc"] == {"valid": "binned", "test": "binned"}
    for e, b in zip(runs["exact"]["epochs"], runs["binned"]["epochs"], strict=True):
        for split in ("valid", "test"):
            assert abs(e[f"{split}_auc"] - b[f"{split}_auc"]) <= b[f"{split}_auc_bound"] + 1e-12
            assert abs(e[f"{split}_auc"] - b[f"{split}_auc"]) < 1e-3
            assert b[f"{split}_logloss"] == pytest.approx(e[f"{split}_logloss"], rel=1e-6)
