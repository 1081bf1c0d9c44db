"""Synthetic generator: determinism, knobs, Zipf shape, and round trips through the readers."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic
from meda.ctr.data import load_dataset
from meda.ctr.schema import CRITEO_CATEGORICAL, CRITEO_NUMERIC


def test_generate_is_deterministic_and_seeded() -> None:
    a = synthetic.generate("zipf", 2000, seed=5)
    b = synthetic.generate("zipf", 2000, seed=5)
    c = synthetic.generate("zipf", 2000, seed=6)
    assert a.equals(b)
    assert not a.equals(c)
    assert a.column_names == ["label", "user_id", "item_id", "ad_type", "position", "category"]
    assert set(np.unique(a["label"].to_numpy()).tolist()) == {0, 1}
    assert 0.2 < a["label"].to_numpy().mean() < 0.3  # preset ctr 0.25


def test_knobs_change_cardinality_zipf_and_days() -> None:
    t = synthetic.generate("zipf", 20_000, seed=0, cardinality=50, days=4)
    assert t["user_id"].to_numpy().max() < 50 and len(t["user_id"].unique()) == 50
    assert t["category"].to_numpy().max() < 120  # small fields keep their size
    assert np.unique(t["day"].to_numpy()).tolist() == [0, 1, 2, 3]
    assert (np.diff(t["day"].to_numpy()) >= 0).all()  # rows ordered by day
    uniform = synthetic.generate("zipf", 20_000, seed=0, zipf=0.0)["user_id"].to_numpy()
    skewed = synthetic.generate("zipf", 20_000, seed=0, zipf=1.5)["user_id"].to_numpy()
    top = lambda x: np.bincount(x).max() / x.size  # noqa: E731
    assert top(skewed) > 0.1 > 100 * top(uniform)


def test_high_cardinality_preset_is_mostly_rare_ids() -> None:
    ids = synthetic.generate("zipf", 100_000, seed=0)["user_id"].to_numpy()
    counts = np.bincount(ids)
    counts = counts[counts > 0]
    assert counts.size > 15_000  # many distinct ids
    assert (counts == 1).mean() > 0.5  # most of them seen once: memorisable noise


def test_label_depends_on_ids() -> None:
    t = synthetic.generate("low-cardinality", 200_000, seed=0, noise=0.0)
    ids, y = t["user_id"].to_numpy(), t["label"].to_numpy()
    rate = np.bincount(ids, weights=y) / np.maximum(np.bincount(ids), 1)
    frequent = np.bincount(ids) > 500
    assert rate[frequent].std() > 0.05  # per-id click rates differ: a learnable signal


def test_unknown_preset_and_criteo_layout_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        synthetic.generate("nope", 10)
    with pytest.raises(ValueError, match="--format csv"):
        synthetic.schema_for("zipf", "criteo")


def test_criteo_preset_round_trip_through_criteo_reader(tmp_path: Path) -> None:
    table = synthetic.generate("criteo", 3000, seed=1, cardinality=5000)
    assert table.column_names == ["label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL]
    out = tmp_path / "x.tsv"
    assert synthetic.write(table, out, "criteo", synthetic.schema_for("criteo", "criteo")) == [out]
    first = out.read_text().splitlines()[0].split("\t")
    assert len(first) == 40 and len(first[14]) == 8  # label, 13 ints, 26 hex tokens
    ds = load_dataset(out, "criteo", cache_dir=tmp_path / "cache")
    assert ds.report["rows_read"] == 3000 and ds.report["skipped_rows"] == {}
    assert len(ds.feature_map.numeric) == 13 and len(ds.feature_map.categorical) == 26
    labels = np.concatenate([ds.train.label, ds.valid.label, ds.test.label])
    assert labels.sum() == table["label"].to_numpy().sum()
    missing = table["I1"].null_count
    assert missing > 0  # numeric missing values survive as empty fields


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cli_generate_round_trip(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"d.{fmt}"
    result = CliRunner().invoke(
        app, ["ctr", "generate", "--preset", "days", "--rows", "5000", "--out", str(out), "--seed", "3",
              "--cardinality", "1000", "--days", "3", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == 5000 and summary["format"] == fmt
    assert (tmp_path / f"d.{fmt}.schema.json").is_file()
    ds = load_dataset(out, fmt, cache_dir=tmp_path / "cache", seed=3)
    assert ds.report["rows_read"] == 5000
    assert ds.report["split_sizes"] == {"train": 4000, "valid": 500, "test": 500}
    assert ds.report["days"] == 3 and set(np.unique(ds.test.day).tolist()) == {0, 1, 2}
    assert [f.name for f in ds.feature_map.categorical] == ["user_id", "item_id", "ad_type", "position", "category"]
    # a random split: most test ids were also seen in training
    assert (ds.test.categorical[:, 0] > 1).mean() > 0.5
