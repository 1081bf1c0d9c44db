"""Batch sources: the resident (device) path cuts the same batches as the host path, ranks split
global batches without losing rows, and undefined metrics / empty splits are reported, not NaN."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from learnable import learnable_dataset

from meda.ctr.batches import iterate_batches, take
from meda.ctr.sources import InMemorySource, as_source, rank_range
from meda.ctr.train import TrainConfig, train

FAST = {"batch_size": 256, "lr": 3e-3, "embedding_dim": 8, "hidden_units": (32,)}
CPU = torch.device("cpu")


def _figures(payload: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in payload["epochs"]]


@pytest.mark.parametrize("resident", [True, False])
def test_sources_cut_the_batches_of_iterate_batches(resident: bool) -> None:
    data = learnable_dataset(rows=1000).train
    source = InMemorySource(data, CPU, resident)
    ours = list(source.train_batches(96, seed=5))
    ref = list(iterate_batches(data, 96, shuffle=True, seed=5))
    assert len(ours) == len(ref) == source.num_train_batches(96)
    for a, b in zip(ours, ref, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    evaluated = torch.cat([b["label"] for b in source.eval_batches(300)])
    assert torch.equal(evaluated, torch.from_numpy(data.label))


def test_ranks_share_every_global_batch_and_evaluate_contiguous_ranges() -> None:
    data = learnable_dataset(rows=1000).train  # 800 rows
    one = InMemorySource(data, CPU, resident=True)
    whole = list(one.train_batches(100, seed=1))
    parts = [list(one.train_batches(100, seed=1, rank=r, world=3)) for r in range(3)]
    assert [len(p) for p in parts] == [len(whole)] * 3
    for g, batch in enumerate(whole):
        joined = torch.cat([parts[r][g]["categorical"] for r in range(3)])
        assert torch.equal(joined, batch["categorical"])
    ranges = [rank_range(len(data), r, 3) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    labels = torch.cat([b["label"] for r in range(3) for b in one.eval_batches(64, rank=r, world=3)])
    assert torch.equal(labels, torch.from_numpy(data.label))
    # a last global batch with fewer rows than ranks is dropped, so no rank gets an empty batch
    small = take(data, slice(0, 201))
    assert InMemorySource(small, CPU, True).num_train_batches(100, world=2) == 2
    assert InMemorySource(small, CPU, True).num_train_batches(100, world=1) == 3


def test_resident_and_host_paths_train_to_the_same_metrics() -> None:
    data = learnable_dataset(rows=3000)
    cfg = TrainConfig(mode="meda", epochs=2, dropout=0.2, **FAST)
    resident = train(data, replace(cfg, resident="on"))
    host = train(data, replace(cfg, resident="off"))
    assert _figures(resident) == _figures(host)
    assert resident["timing"][0]["train_rows"] == len(data.train)
    assert resident["timing"][0]["samples_per_s"] > 0
    assert as_source(data.valid, CPU, "off").resident is False  # type: ignore[union-attr]


def test_bf16_autocast_trains() -> None:
    result = train(learnable_dataset(rows=3000), TrainConfig(mode="multi-epoch", epochs=2, precision="bf16", **FAST))
    assert result["epochs"][-1]["test_auc"] > 0.7


def test_one_class_validation_gives_null_auc_and_best_by_logloss(tmp_path: Path) -> None:
    data = learnable_dataset(rows=2000)
    data.valid.label = np.zeros_like(data.valid.label)
    result = train(data, TrainConfig(mode="multi-epoch", epochs=2, **FAST), tmp_path)

    def no_constants(name: str) -> None:
        raise AssertionError(f"metrics.json holds {name}")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_constants)
    assert [e["valid_auc"] for e in written["epochs"]] == [None, None]
    assert all(e["test_auc"] > 0.5 for e in written["epochs"])
    assert written["best_by"] == "valid_logloss"
    losses = [e["valid_logloss"] for e in written["epochs"]]
    assert written["best"]["epoch"] == 1 + int(np.argmin(losses))
    assert result["best"] == written["best"]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_split_without_rows_stops_with_the_reason(split: str) -> None:
    data = learnable_dataset(rows=500)
    setattr(data, split, take(getattr(data, split), slice(0, 0)))
    data.report["skipped_rows"] = {"wrong_column_count": 500}
    with pytest.raises(ValueError, match=f"the {split} split has no usable rows.*wrong_column_count"):
        train(data, TrainConfig(**FAST))


def test_new_options_are_validated() -> None:
    for name in ("precision", "compile", "resident"):
        with pytest.raises(ValueError, match=f"unknown {name}"):
            TrainConfig(**{name: "fast"})


@pytest.mark.slow
def test_compiled_forward_trains_like_eager_through_meda_redraws() -> None:
    data = learnable_dataset(rows=1500)
    eager = train(data, TrainConfig(mode="meda", epochs=2, **FAST))
    compiled = train(data, TrainConfig(mode="meda", epochs=2, compile="default", **FAST))
    for a, b in zip(eager["epochs"], compiled["epochs"], strict=True):
        assert b["test_auc"] == pytest.approx(a["test_auc"], abs=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resident_path_matches_host_batches() -> None:
    data = learnable_dataset(rows=3000)
    cfg = TrainConfig(mode="meda", epochs=2, device="cuda", **FAST)
    resident, host = train(data, replace(cfg, resident="on")), train(data, replace(cfg, resident="off"))
    for a, b in zip(resident["epochs"], host["epochs"], strict=True):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=1e-4)
    assert resident["timing"][0]["train_rows"] == len(data.train)
