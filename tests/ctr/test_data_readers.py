"""Readers: Criteo TSV, Avazu CSV, generic CSV and Parquet, with bad rows counted by reason."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meda.ctr.readers import DataFormatError, read_file
from meda.ctr.schema import FieldSpec, Schema, avazu_schema, criteo_schema


def criteo_line(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


def test_criteo_reads_values_and_missing(tmp_path: Path) -> None:
    ints = ["5", "", *[str(i) for i in range(11)]]
    cats = ["68fd1e64", "", *[f"{i:08x}" for i in range(24)]]
    path = tmp_path / "c.tsv"
    path.write_text(criteo_line("0", ints, cats) + "\n" + criteo_line("1") + "\n")
    raw = read_file(path, "criteo", criteo_schema())
    t = raw.table
    assert raw.rows_read == 2 and raw.skipped == {}
    assert t["label"].to_pylist() == [0.0, 1.0]
    assert t["I1"].to_pylist() == [5.0, 0.0]
    assert t["I2"].to_pylist() == [None, 1.0]  # empty -> missing
    assert t["C1"].to_pylist() == ["68fd1e64", "00000000"]
    assert t["C2"].to_pylist() == ["", "00000001"]  # missing token is ""


def test_criteo_bad_rows_are_counted_by_reason(tmp_path: Path) -> None:
    lines = [
        criteo_line("1"),
        criteo_line("1")[:-3] + "\textra\tcols",  # 41 -> 42 columns
        "1\t2\t3",  # too few columns
        criteo_line("2"),  # label not 0/1
        criteo_line("x"),  # label not a number
        criteo_line("0", ["abc", *[str(i) for i in range(12)]]),  # non-number in I1
        criteo_line("0", ["1e3", "-2", "0.5", *[""] * 10]),  # valid numbers
    ]
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    raw = read_file(path, "criteo", criteo_schema())
    assert raw.skipped == {"wrong_column_count": 2, "bad_label": 2, "non_numeric": 1}
    assert raw.rows_read == 7
    assert raw.table.num_rows == 2
    assert raw.table["I1"].to_pylist() == [0.0, 1000.0]
    assert raw.table["I2"].to_pylist() == [1.0, -2.0]


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.tsv"
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.tsv is empty"):
        read_file(path, "criteo", criteo_schema())


def test_header_only_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("label,a\n")
    schema = Schema(fields=(FieldSpec("a", "categorical"),))
    with pytest.raises(DataFormatError, match="no data rows"):
        read_file(path, "csv", schema)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("label,a\n1,u\n")
    schema = Schema(fields=(FieldSpec("a", "categorical"), FieldSpec("price", "numeric")))
    with pytest.raises(DataFormatError, match=r"x\.csv lacks column\(s\) \['price'\]"):
        read_file(path, "csv", schema)


def test_avazu_hour_expands_to_hour_weekday_day(tmp_path: Path) -> None:
    from meda.ctr.schema import AVAZU_CATEGORICAL

    header = ["id", "click", "hour", *AVAZU_CATEGORICAL]
    rows = [
        ["1", "0", "14102100", *["a"] * 21],  # 2014-10-21 00h, a Tuesday
        ["2", "1", "14102723", *["b"] * 21],  # 2014-10-27 23h, a Monday
    ]
    path = tmp_path / "avazu.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    t = read_file(path, "avazu", avazu_schema()).table
    assert t["click"].to_pylist() == [0.0, 1.0]
    assert t["hour_of_day"].to_pylist() == ["0", "23"]
    assert t["weekday"].to_pylist() == ["1", "0"]
    assert np.diff(t["day"].to_numpy()).tolist() == [6]
    assert t["site_id"].to_pylist() == ["a", "b"]


def test_generic_csv_with_sequence_day_group(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("click;user;hist;price;day\n1;u1;a|b;3.5;0\n0;u2;;;1\n1;u1;c;2;zz\n")
    schema = Schema(
        fields=(FieldSpec("hist", "sequence", max_len=3), FieldSpec("price", "numeric")),
        label="click", delimiter=";", day="day", group="user",
    )  # fmt: skip
    raw = read_file(path, "csv", schema)
    assert raw.skipped == {"bad_day": 1}
    assert raw.table["hist"].to_pylist() == ["a|b", ""]
    assert raw.table["price"].to_pylist() == [3.5, None]
    assert raw.table["day"].to_pylist() == [0, 1]
    assert raw.table["user"].to_pylist() == ["u1", "u2"]


def test_parquet_typed_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"label": [1, 0, 3], "cat": [7, None, 9], "num": [1.5, float("nan"), 2.0], "other": [1, 2, 3]}),
        path,
    )
    schema = Schema(fields=(FieldSpec("cat", "categorical"), FieldSpec("num", "numeric")))
    raw = read_file(path, "parquet", schema)
    assert raw.skipped == {"bad_label": 1}
    assert raw.table["cat"].to_pylist() == ["7", ""]
    assert raw.table["num"].to_pylist() == [1.5, None]
    assert "other" not in raw.table.column_names
