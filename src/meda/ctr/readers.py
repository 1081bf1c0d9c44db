"""Read CTR files (Criteo TSV, Avazu CSV, generic CSV, Parquet) into checked Arrow tables.

Every reader returns a :class:`RawTable` whose columns have fixed types:
label float32 (0/1), numeric float64 (null = missing), categorical and sequence
string ("" = missing token), day int64, group string. Rows that cannot be used
are dropped *and counted by reason* (``wrong_column_count``, ``bad_label``,
``non_numeric``, ``bad_day``); nothing is dropped silently. Parsing is columnar
(pyarrow); no Python object is created per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meda.ctr.schema import HOUR_OF_DAY, WEEKDAY, Schema

FORMATS = ("criteo", "avazu", "csv", "parquet")
_NUMBER = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"


class DataFormatError(ValueError):
    """A file cannot be read with the given format/schema; the message says how to fix it."""


@dataclass
class RawTable:
    """Checked rows of one or more files.

    Attributes:
        table: the schema's source columns plus derived ones, typed as described in the module doc.
        rows_read: data rows found in the files, skipped ones included.
        skipped: dropped rows by reason.
    """

    table: pa.Table
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)


def read_file(path: str | Path, fmt: str, schema: Schema) -> RawTable:
    """Read one file of format ``fmt`` (criteo, avazu, csv, parquet) with ``schema``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataFormatError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check the --data path")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path} is empty; point --data at a file with rows (or generate one)")
    if fmt == "parquet":
        table, skipped = _read_parquet(path, schema), {}
    else:
        table, skipped = _read_delimited(path, schema)
    raw = _check_and_type(table, schema, path)
    raw.rows_read += sum(skipped.values())
    for reason, n in skipped.items():
        raw.skipped[reason] = raw.skipped.get(reason, 0) + n
    if raw.rows_read == 0:
        raise DataFormatError(f"{path} has no data rows (only a header?); point --data at a file with rows")
    return raw


def read_files(paths: list[Path], fmt: str, schema: Schema) -> RawTable:
    """Read several files of one format and stack them (columns must agree)."""
    parts = [read_file(p, fmt, schema) for p in paths]
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, n in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    table = pa.concat_tables([p.table for p in parts]) if len(parts) > 1 else parts[0].table
    return RawTable(table, sum(p.rows_read for p in parts), skipped)


def _read_delimited(path: Path, schema: Schema) -> tuple[pa.Table, dict[str, int]]:
    import pyarrow.csv as pacsv

    needed = schema.source_columns()
    present = list(schema.columns) if schema.columns is not None else _header(path, schema.delimiter)
    _require_columns(path, needed, present, schema)
    bad = {"wrong_column_count": 0}

    def on_invalid(row: object) -> str:
        bad["wrong_column_count"] += 1
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=None if schema.header else list(present),
                block_size=1 << 24,
            ),
            parse_options=pacsv.ParseOptions(delimiter=schema.delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=needed,
                column_types={c: pa.string() for c in needed},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataFormatError(f"cannot parse {path}: {e}. Check --format and the schema's delimiter") from e
    return table, {k: v for k, v in bad.items() if v}


def _header(path: Path, delimiter: str) -> list[str]:
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        line = fh.readline().rstrip("\r\n")
    return [c.strip().strip('"') for c in line.split(delimiter)]


def _require_columns(path: Path, needed: list[str], present: list[str], schema: Schema) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataFormatError(
            f"{path} lacks column(s) {missing} (it has {present[:12]}{' ...' if len(present) > 12 else ''}); "
            "pass the right --format, or a schema whose fields/label/day name columns of this file"
            + ("" if schema.header else " (schema.columns lists the columns of a headerless file)")
        )


def _read_parquet(path: Path, schema: Schema) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        present = pq.read_schema(path).names
    except pa.ArrowInvalid as e:
        raise DataFormatError(f"{path} is not a Parquet file ({e}); pass the right --format") from e
    needed = schema.source_columns()
    _require_columns(path, needed, present, schema)
    return pq.read_table(path, columns=needed)


def _check_and_type(table: pa.Table, schema: Schema, path: Path) -> RawTable:
    """Drop and count rows with a bad label, a non-numeric number or a bad day; type every column."""
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    skipped: dict[str, int] = {}

    def drop(reason: str, bad: np.ndarray) -> None:
        newly = bad & keep
        if newly.any():
            skipped[reason] = skipped.get(reason, 0) + int(newly.sum())
            keep[newly] = False

    label, label_ok = _as_float(table[schema.label])
    drop("bad_label", ~(label_ok & ~np.isnan(label) & ((label == 0) | (label == 1))))
    numeric_cols = [f.name for f in schema.fields if f.kind == "numeric"]
    if schema.hour is not None:
        numeric_cols.append(schema.hour)
    parsed: dict[str, np.ndarray] = {}
    for name in numeric_cols:
        parsed[name], ok = _as_float(table[name])
        drop("non_numeric", ~ok)
    if schema.hour is not None:
        drop("non_numeric", np.isnan(parsed[schema.hour]))  # the hour column cannot be missing
    if schema.day is not None and schema.day not in schema.derived_columns():
        day, ok = _as_float(table[schema.day])
        drop("bad_day", ~ok | np.isnan(day) | (day != np.floor(day)))
        parsed[schema.day] = day

    columns: dict[str, pa.Array] = {schema.label: pa.array(label[keep].astype(np.float32))}
    for spec in schema.fields:
        if spec.kind == "numeric":
            columns[spec.name] = pa.array(parsed[spec.name][keep], from_pandas=True)  # NaN -> null
        elif spec.name in table.column_names:
            columns[spec.name] = _as_string(table[spec.name]).filter(pa.array(keep))
    if schema.hour is not None:
        columns.update(_expand_hour(parsed[schema.hour][keep], schema))
    if schema.day is not None and schema.day in parsed:
        columns[schema.day] = pa.array(parsed[schema.day][keep].astype(np.int64))
    if schema.group is not None:
        columns[schema.group] = _as_string(table[schema.group]).filter(pa.array(keep))
    missing = [f.name for f in schema.fields if f.name not in columns]
    if missing:  # a derived name listed without the column it derives from
        raise DataFormatError(f"{path}: schema fields {missing} are neither columns nor derived; fix the schema")
    return RawTable(pa.table(columns), rows_read=n, skipped=skipped)


def _as_float(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A column as float64 ``[rows]`` (NaN = missing) and a mask of rows that parsed."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        empty = pc.equal(text, "")
        ok = pc.or_(pc.match_substring_regex(text, _NUMBER), empty)
        ok_np = ok.to_numpy(zero_copy_only=False).astype(bool)
        clean = pc.if_else(pc.or_(empty, pc.invert(ok)), pa.scalar(None, text.type), text)
        values = pc.cast(clean, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64), ok_np
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64), np.ones(len(col), dtype=bool)
    raise DataFormatError(f"column of type {col.type} cannot hold numbers; declare it categorical in the schema")


def _as_string(col: pa.ChunkedArray) -> pa.Array:
    """A column as one string array, nulls replaced by "" (the missing token)."""
    out = col if pa.types.is_string(col.type) else pc.cast(col, pa.string())
    return pc.fill_null(out, "").combine_chunks()


def _expand_hour(hour: np.ndarray, schema: Schema) -> dict[str, pa.Array]:
    """``YYMMDDHH`` floats ``[rows]`` -> hour-of-day and weekday tokens, and the epoch day if wanted."""
    h = np.nan_to_num(hour).astype(np.int64)
    months = (h // 1_000_000 + 30) * 12 + (h // 10_000 % 100 - 1)  # months since 1970-01
    days = (np.datetime64("1970-01", "M") + months.astype("timedelta64[M]")).astype("datetime64[D]")
    epoch_day = days.astype(np.int64) + h // 100 % 100 - 1
    out = {
        HOUR_OF_DAY: pc.cast(pa.array(h % 100), pa.string()),
        WEEKDAY: pc.cast(pa.array((epoch_day + 3) % 7), pa.string()),  # 0 = Monday
    }
    if schema.day is not None:
        out[schema.day] = pa.array(epoch_day)
    return out
