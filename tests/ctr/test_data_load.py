"""load_dataset: split, train-only vocabularies, feature map, report, cache."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meda.ctr.data import load_dataset, random_split
from meda.ctr.features import OOV_INDEX
from meda.ctr.readers import DataFormatError
from meda.ctr.schema import FieldSpec, Schema, sidecar_path


def write_parquet(path: Path, n: int, seed: int = 0) -> Schema:
    rng = np.random.default_rng(seed)
    pq.write_table(
        pa.table({
            "label": rng.integers(0, 2, n),
            "row": np.arange(n),  # a unique token per row: only train rows are in the vocabulary
            "small": rng.integers(0, 3, n),
            "price": rng.exponential(10.0, n),
        }),
        path,
    )  # fmt: skip
    schema = Schema(fields=(FieldSpec("row", "categorical"), FieldSpec("small", "categorical"),
                            FieldSpec("price", "numeric")))  # fmt: skip
    schema.save(sidecar_path(path))
    return schema


def test_random_split_sizes_and_determinism() -> None:
    a = random_split(1005, (0.8, 0.1, 0.1), seed=3)
    assert {k: len(v) for k, v in a.items()} == {"train": 805, "valid": 100, "test": 100}
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1005))
    b = random_split(1005, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], random_split(1005, (0.8, 0.1, 0.1), seed=4)["test"])


def test_load_dataset_splits_and_vocab_on_train_only(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    write_parquet(path, 1000)
    ds = load_dataset(path, "parquet", cache_dir=tmp_path / "cache", seed=1)
    assert ds.report["split_sizes"] == {"train": 800, "valid": 100, "test": 100}
    assert [(f.name, f.kind) for f in ds.feature_map.fields] == [
        ("row", "categorical"), ("small", "categorical"), ("price", "numeric")]  # fmt: skip
    assert ds.report["vocab_sizes"] == {"row": 802, "small": 5}
    assert ds.train.categorical.shape == (800, 2) and ds.train.numeric.shape == (800, 1)
    assert ds.train.sequence.shape == (800, 0, 0)
    # every train row token is known; valid/test row tokens were never seen in train
    assert (ds.train.categorical[:, 0] >= 2).all()
    assert (ds.valid.categorical[:, 0] == OOV_INDEX).all() and (ds.test.categorical[:, 0] == OOV_INDEX).all()
    assert (ds.test.categorical[:, 1] >= 2).all()
    table = pq.read_table(path)
    labels = table["label"].to_numpy()
    idx = random_split(1000, (0.8, 0.1, 0.1), seed=1)
    assert np.array_equal(ds.test.label, labels[idx["test"]].astype(np.float32))
    np.testing.assert_allclose(ds.test.numeric[:, 0], np.log1p(table["price"].to_numpy()[idx["test"]]), rtol=1e-6)
    assert ds.report["cache"]["hit"] is False


def test_cache_hit_returns_same_arrays_and_options_change_key(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    write_parquet(path, 300)
    first = load_dataset(path, "parquet", cache_dir=tmp_path / "c")
    second = load_dataset(path, "parquet", cache_dir=tmp_path / "c")
    assert second.report["cache"]["hit"] is True
    assert second.report["split_sizes"] == first.report["split_sizes"]
    for name in ("categorical", "numeric", "label"):
        assert np.array_equal(getattr(first.test, name), getattr(second.test, name))
    assert second.feature_map == first.feature_map
    other = load_dataset(path, "parquet", cache_dir=tmp_path / "c", numeric="bucket", n_buckets=4)
    assert other.report["cache"]["hit"] is False
    assert [f.kind for f in other.feature_map.fields] == ["categorical"] * 3
    assert other.train.categorical.shape == (240, 3) and other.train.numeric.shape == (240, 0)
    assert load_dataset(path, "parquet", use_cache=False).report["cache"]["hit"] is False


def test_skipped_rows_reach_encoded_data_and_report(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    good = "\t".join(["0", *["1"] * 13, *["ab"] * 26])
    path.write_text("\n".join([good] * 20 + ["1\t2", "\t".join(["7", *["1"] * 13, *["ab"] * 26])]) + "\n")
    ds = load_dataset(path, "criteo", cache_dir=tmp_path / "cache")
    assert ds.report["rows_read"] == 22 and ds.report["rows_used"] == 20
    assert ds.report["skipped_rows"] == {"wrong_column_count": 1, "bad_label": 1}
    assert ds.train.skipped_rows == {"wrong_column_count": 1, "bad_label": 1}
    cached = load_dataset(path, "criteo", cache_dir=tmp_path / "cache")
    assert cached.train.skipped_rows == ds.train.skipped_rows and cached.report["cache"]["hit"]


def test_separate_files_sequence_day_group(tmp_path: Path) -> None:
    schema = Schema(
        fields=(FieldSpec("item", "categorical"), FieldSpec("hist", "sequence", max_len=3)),
        label="click", day="day", group="user",
    )  # fmt: skip
    files = {}
    for name, text in {
        "train": "click,user,item,hist,day\n1,u1,a,x|y|z|w,5\n0,u2,b,,6\n1,u1,a,y,6\n",
        "valid": "click,user,item,hist,day\n0,u3,c,x|q,7\n",
        "test": "click,user,item,hist,day\n1,u2,b,z,7\n",
    }.items():
        files[name] = tmp_path / f"{name}.csv"
        files[name].write_text(text)
    ds = load_dataset(files["train"], "csv", schema=schema, valid=files["valid"], test=files["test"],
                      use_cache=False)  # fmt: skip
    assert ds.report["split_sizes"] == {"train": 3, "valid": 1, "test": 1}
    seq = ds.feature_map.sequence[0]
    assert (seq.max_len, seq.vocab_size) == (3, 2 + 4)  # x, y, z, w seen in train
    assert ds.train.sequence.shape == (3, 1, 3)
    assert ds.train.sequence[1, 0].tolist() == [0, 0, 0]  # empty history = all padding
    assert ds.train.sequence[0, 0, 2] > 1 and ds.valid.sequence[0, 0].tolist()[1:] == [OOV_INDEX, 0]
    assert ds.train.day.tolist() == [0, 1, 1] and ds.test.day.tolist() == [2]
    assert ds.train.group[0] == ds.train.group[2] and ds.train.group[1] == ds.test.group[0]
    assert ds.valid.group[0] not in set(ds.train.group.tolist())


def test_csv_without_schema_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("label,a\n1,u\n")
    with pytest.raises(DataFormatError, match=r"needs a schema.*x\.csv\.schema\.json"):
        load_dataset(path, "csv", use_cache=False)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset("x", "tsv")
    with pytest.raises(ValueError, match="both valid= and test="):
        load_dataset("x", "criteo", valid="y")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset("/nonexistent/x.tsv", "criteo")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_schema_file_round_trip(tmp_path: Path, suffix: str) -> None:
    schema = Schema(fields=(FieldSpec("a", "categorical", hash_buckets=10), FieldSpec("s", "sequence", max_len=4)),
                    label="click", day="d")  # fmt: skip
    path = tmp_path / f"s{suffix}"
    if suffix == ".json":
        schema.save(path)
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(schema.to_dict()))
    assert Schema.load(path) == schema


def test_schema_errors_are_explicit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown schema keys"):
        Schema.from_dict({"fields": [], "labl": "x"})
    with pytest.raises(ValueError, match="unknown kind"):
        FieldSpec("a", "float")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than once"):
        Schema(fields=(FieldSpec("a", "numeric"), FieldSpec("a", "categorical")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"fields": [{"name": "a"}]}')
    with pytest.raises(ValueError, match=r"invalid schema in .*bad\.json"):
        Schema.load(bad)


def test_hash_buckets_option_and_file_list(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(a, 600, seed=0)
    write_parquet(b, 400, seed=1)
    ds = load_dataset([a, b], "parquet", hash_buckets=100, use_cache=False)
    assert ds.report["rows_read"] == 1000 and ds.report["split_sizes"]["train"] == 800
    assert ds.report["vocab_sizes"] == {"row": 102, "small": 5}  # only the big field is hashed
    assert ds.report["encoders"]["row"] == {"type": "hashed", "size": 102, "buckets": 100}
    assert (ds.test.categorical[:, 0] >= 2).all()  # hashing has no OOV: unseen tokens get a bucket


def test_avazu_load_dataset_days_and_fields(tmp_path: Path) -> None:
    from meda.ctr.schema import AVAZU_CATEGORICAL

    rng = np.random.default_rng(0)
    lines = [",".join(["id", "click", "hour", *AVAZU_CATEGORICAL])]
    for i in range(200):
        hour = f"1410{21 + i % 3}{i % 24:02d}"
        lines.append(",".join([str(i), str(i % 2), hour, *(f"v{rng.integers(0, 4)}" for _ in AVAZU_CATEGORICAL)]))
    path = tmp_path / "avazu.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, "avazu", use_cache=False)
    names = [f.name for f in ds.feature_map.categorical]
    assert names[:3] == ["hour_of_day", "weekday", "C1"] and len(names) == 23
    assert ds.report["days"] == 3 and sorted(np.unique(ds.train.day).tolist()) == [0, 1, 2]
    assert ds.report["vocab_sizes"]["weekday"] == 2 + 3 and ds.report["vocab_sizes"]["hour_of_day"] == 2 + 24
