"""Streaming a directory of shards: the same vocabularies and encoding as one file, every training row
once per epoch from a bounded shuffle buffer, documented splits, bad shards reported by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic
from meda.ctr.data import load_dataset
from meda.ctr.readers import DataFormatError
from meda.ctr.shards import assign_shards, list_shards, row_splits
from meda.ctr.stream import StreamedSplit

KNOBS = {"cardinality": 500}
SHARD_ROWS = 1000


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthetic.generate("criteo", 5 * SHARD_ROWS, seed=2, **KNOBS)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, table: pa.Table) -> Path:
    root = tmp_path_factory.mktemp("shards")
    schema = synthetic.schema_for("criteo", "parquet", **KNOBS)
    for i in range(5):
        synthetic.write(table.slice(i * SHARD_ROWS, SHARD_ROWS), root / f"part-{i:02d}.parquet", "parquet", schema)
    return root


def test_explicit_splits_encode_exactly_like_one_file(shard_dir: Path, table: pa.Table, tmp_path: Path) -> None:
    """Train shards 0-2 + valid shard 3 + test shard 4 against one file of shards 0-2 with the same valid/test."""
    schema = synthetic.schema_for("criteo", "parquet", **KNOBS)
    synthetic.write(table.slice(0, 3 * SHARD_ROWS), tmp_path / "train.parquet", "parquet", schema)
    valid, test = shard_dir / "part-03.parquet", shard_dir / "part-04.parquet"
    for numeric in ("log", "bucket"):
        one = load_dataset(tmp_path / "train.parquet", "parquet", valid=valid, test=test, numeric=numeric,
                           use_cache=False)  # fmt: skip
        streamed = load_dataset(f"{shard_dir}/part-0[012].parquet", "parquet", valid=valid, test=test,
                                numeric=numeric, use_cache=False)  # fmt: skip
        assert streamed.feature_map == one.feature_map
        assert streamed.report["encoders"] == one.report["encoders"]
        for split in ("train", "valid", "test"):
            s, o = getattr(streamed, split), getattr(one, split)
            rows = torch.cat([b["categorical"] for b in s.eval_batches(700)]).numpy()
            assert np.array_equal(rows, o.categorical)
            values = torch.cat([b["numeric"] for b in s.eval_batches(700)]).numpy()
            assert np.array_equal(values, o.numeric) and values.shape[1] == (13 if numeric == "log" else 0)
            assert np.array_equal(s.label, o.label)


def test_every_training_row_once_per_epoch_from_a_bounded_buffer(shard_dir: Path) -> None:
    ds = load_dataset(shard_dir, "parquet", use_cache=False, shuffle_rows=1500)
    train: StreamedSplit = ds.train  # type: ignore[assignment]
    expected = np.sort(torch.cat([b["categorical"][:, 0] for b in train.eval_batches(4096)]).numpy())
    blocks = list(train._buffers(train.parts, np.random.default_rng(0), 128))
    largest_shard = max(p["rows"] for p in train.parts)
    assert max(b["label"].shape[0] for b in blocks) <= 1500 + largest_shard  # the memory bound
    batches = list(train.train_batches(128, seed=3))
    assert len(batches) == train.num_train_batches(128)
    assert all(b["label"].shape[0] == 128 for b in batches[:-1])
    seen = np.sort(torch.cat([b["categorical"][:, 0] for b in batches]).numpy())
    assert np.array_equal(seen, expected)
    again = torch.cat([b["label"] for b in train.train_batches(128, seed=3)])
    other = torch.cat([b["label"] for b in train.train_batches(128, seed=4)])
    assert torch.equal(again, torch.cat([b["label"] for b in batches])) and not torch.equal(again, other)
    # two ranks: shards round-robin, the same number of steps, half the batch each
    per_rank = [list(train.train_batches(128, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == train.num_train_batches(128, world=2)
    assert per_rank[0][0]["label"].shape[0] == 64


def test_row_split_is_a_seeded_hash_and_shard_split_keeps_shards_whole(shard_dir: Path) -> None:
    which = row_splits("part-00.parquet", 100_000, seed=0, fractions=(0.8, 0.1, 0.1))
    shares = np.bincount(which, minlength=3) / which.size
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.01)
    assert np.array_equal(which, row_splits("part-00.parquet", 100_000, 0, (0.8, 0.1, 0.1)))
    assert not np.array_equal(which, row_splits("part-00.parquet", 100_000, 1, (0.8, 0.1, 0.1)))
    shards = list_shards(shard_dir, "parquet")
    parts = assign_shards(shards, (0.8, 0.1, 0.1), seed=0)
    assert sorted(p for ps in parts.values() for p in ps) == shards
    assert (len(parts["train"]), len(parts["valid"]), len(parts["test"])) == (3, 1, 1)
    ds = load_dataset(shard_dir, "parquet", split_by="shard", use_cache=False)
    assert ds.report["split_sizes"] == {"train": 3 * SHARD_ROWS, "valid": SHARD_ROWS, "test": SHARD_ROWS}
    with pytest.raises(ValueError, match="at least 3 shards"):
        assign_shards(shards[:2], (0.8, 0.1, 0.1), 0)


def test_encoded_shards_are_cached(shard_dir: Path, tmp_path: Path) -> None:
    first = load_dataset(shard_dir, "parquet", cache_dir=tmp_path)
    again = load_dataset(f"{shard_dir}/*.parquet", "parquet", cache_dir=tmp_path)
    assert not first.report["cache"]["hit"] and again.report["cache"]["hit"]
    assert again.report["split_sizes"] == first.report["split_sizes"]
    assert sum(first.report["split_sizes"].values()) == 5 * SHARD_ROWS


def test_unreadable_shard_stops_or_is_skipped_and_reported(shard_dir: Path, tmp_path: Path) -> None:
    for p in list_shards(shard_dir, "parquet"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
        (tmp_path / f"{p.name}.schema.json").write_bytes(Path(f"{p}.schema.json").read_bytes())
    (tmp_path / "part-02.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataFormatError, match=r"shard .*part-02.parquet cannot be read.*2 shard\(s\), 2000 rows read"):
        load_dataset(tmp_path, "parquet", use_cache=False)
    ds = load_dataset(tmp_path, "parquet", use_cache=False, bad_shards="skip")
    assert [b["shard"] for b in ds.report["bad_shards"]] == ["part-02.parquet"]
    assert ds.report["rows_read"] == 4 * SHARD_ROWS
    assert [s["shard"] for s in ds.report["shards"]] == [f"part-0{i}.parquet" for i in (0, 1, 3, 4)]


def test_shards_without_usable_rows_stop_with_a_clear_error(tmp_path: Path) -> None:
    for i in range(2):  # criteo TSV whose rows have 3 columns instead of 40
        (tmp_path / f"day_{i}.txt").write_text("1\ta\tb\n0\tc\td\n")
    with pytest.raises(DataFormatError, match=r"no usable training rows.*wrong_column_count"):
        load_dataset(tmp_path, "criteo", use_cache=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_dataset(f"{tmp_path}/*.parquet", "parquet", use_cache=False)


def test_cli_trains_on_a_directory_with_the_metrics_contract(shard_dir: Path, tmp_path: Path) -> None:
    args = ["ctr", "train", "--data", str(shard_dir), "--format", "parquet", "--out", str(tmp_path), "--mode", "meda",
            "--epochs", "2", "--batch-size", "256", "--hidden-units", "16", "--embedding-dim", "4",
            "--cache-dir", str(tmp_path / "cache"), "--shuffle-rows", "2000"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert {"valid_auc", "test_auc", "test_logloss", "train_loss"} <= set(metrics["epochs"][0])
    assert metrics["timing"][0]["train_rows"] == metrics["data"]["split_sizes"]["train"]
    assert len(metrics["data"]["shards"]) == 5


def test_streamed_run_killed_mid_epoch_resumes_to_the_same_metrics(shard_dir: Path, tmp_path: Path) -> None:
    from meda.ctr.train import TrainConfig, train

    ds = load_dataset(shard_dir, "parquet", cache_dir=tmp_path / "cache", shuffle_rows=1500)
    cfg = TrainConfig(mode="meda", epochs=2, batch_size=512, embedding_dim=4, hidden_units=(16,), checkpoint_every=5)
    full = train(ds, cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if step == 12:  # mid-epoch 2 (8 steps an epoch), two steps after the step-10 checkpoint
            raise Killed

    with pytest.raises(Killed):
        train(ds, cfg, tmp_path / "killed", on_step=kill)
    resumed = train(ds, cfg, tmp_path / "killed", resume=True)
    figures = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["epochs"]] for r in (full, resumed)]
    assert figures[0] == figures[1]
