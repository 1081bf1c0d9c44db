"""Load a CTR data set: read, check, split, fit vocabularies on train, encode, cache.

The one entry point is :func:`load_dataset`::

    ds = load_dataset("train.txt", "criteo", cache_dir="cache", min_count=1, numeric="log")
    ds.feature_map          # FeatureMap: what the model embeds
    ds.train, ds.valid, ds.test   # EncodedData
    ds.report               # rows read, skipped rows by reason, vocab sizes, cache hit, split sizes
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meda.ctr import cache
from meda.ctr.encoding import EncodingOptions, encode_table, fit_encoders
from meda.ctr.features import EncodedData, FeatureMap
from meda.ctr.readers import FORMATS, DataFormatError, RawTable, read_files
from meda.ctr.schema import BUILTIN_SCHEMAS, Schema, sidecar_path
from meda.ctr.shards import is_sharded
from meda.ctr.transforms import NUMERIC_TRANSFORMS

PathLike = str | Path
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


@dataclass
class Dataset:
    """Encoded train/valid/test splits and what every model needs to know about them."""

    feature_map: FeatureMap
    train: EncodedData
    valid: EncodedData
    test: EncodedData
    report: dict[str, Any]


def load_dataset(
    data: PathLike | list[PathLike],
    format: str,
    *,
    schema: Schema | dict[str, Any] | PathLike | None = None,
    valid: PathLike | list[PathLike] | None = None,
    test: PathLike | list[PathLike] | None = None,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
    min_count: int = 1,
    seed: int = 0,
    numeric: str = "log",
    n_buckets: int = 32,
    hash_buckets: int | None = None,
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    **sharded: Any,
) -> Dataset:
    """Read ``data`` (one file or a list, stacked) in ``format`` and return encoded splits.

    A directory or a glob of shards is streamed instead (:func:`meda.ctr.stream.load_sharded`,
    which also takes ``split_by``, ``bad_shards``, ``shuffle_rows``, ``numeric_sample``, ``log``);
    its splits are :class:`~meda.ctr.stream.StreamedSplit` objects rather than arrays.

    Args:
        data: training file(s); split at random (seeded, ``split`` ratios, default 8:1:1) into
            train/valid/test unless ``valid`` and ``test`` are given.
        format: "criteo" (TSV, no header), "avazu" (CSV with header), "csv" or "parquet".
        schema: a :class:`Schema`, its dict, or a JSON/YAML path. Default: the built-in schema of
            criteo/avazu; for csv/parquet the ``<file>.schema.json`` written next to the file by
            ``meda ctr generate``.
        valid, test: separate validation and test files (give both or neither).
        cache_dir: where encoded splits are cached (default ``$MEDA_CACHE_DIR`` or
            ``~/.cache/meda/ctr``); ``use_cache=False`` neither reads nor writes it.
        min_count: tokens seen fewer times in train map to OOV (1 keeps every train token, as BARS).
        seed: seed of the random split.
        numeric: numeric transform, one of "log", "standardise", "raw", "bucket", "log-bucket"
            (see :mod:`meda.ctr.transforms`).
        n_buckets: buckets of the "bucket" transform.
        hash_buckets: hash fields with more distinct train tokens than this into this many buckets.
        split: train/valid/test fractions of a single input.
    """
    started = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {FORMATS}")
    if numeric not in NUMERIC_TRANSFORMS:
        raise ValueError(f"unknown numeric transform {numeric!r}; use one of {NUMERIC_TRANSFORMS}")
    if is_sharded(data):
        from meda.ctr.stream import load_sharded

        return load_sharded(
            data, format, schema=schema, valid=valid, test=test, cache_dir=cache_dir, use_cache=use_cache,
            min_count=min_count, seed=seed, numeric=numeric, n_buckets=n_buckets, hash_buckets=hash_buckets,
            split=split, **sharded,
        )  # fmt: skip
    if sharded:
        raise TypeError(f"options {sorted(sharded)} apply to a directory or glob of shards, not to files")
    if (valid is None) != (test is None):
        raise ValueError("pass both valid= and test= files, or neither (then the data are split 8:1:1)")
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    files = {"train": _paths(data)}
    if valid is not None and test is not None:
        files |= {"valid": _paths(valid), "test": _paths(test)}
    for p in (p for ps in files.values() for p in ps):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file; check the data path")
    resolved = resolve_schema(format, schema, files["train"][0])
    options = EncodingOptions(min_count=min_count, numeric=numeric, n_buckets=n_buckets, hash_buckets=hash_buckets)
    settings = {
        "format": format,
        "schema": resolved.to_dict(),
        "options": asdict(options),
        "seed": seed,
        "split": list(split) if "valid" not in files else None,
        "files_per_role": {k: len(v) for k, v in files.items()},  # paths are in the cache key
    }
    entry = None
    if use_cache:
        all_files = [p for ps in files.values() for p in ps]
        entry = Path(cache_dir or cache.default_cache_dir()) / cache.cache_key(all_files, settings)
        hit = cache.load(entry)
        if hit is not None:
            fmap, splits, report = hit
            report = {
                **report,
                "cache": {"hit": True, "path": str(entry)},
                "seconds": round(time.perf_counter() - started, 3),
            }
            return Dataset(fmap, splits["train"], splits["valid"], splits["test"], report)

    tables, raw_report = _read_splits(files, format, resolved, split, seed)
    if raw_report["rows_used"] == 0:
        raise DataFormatError(
            f"no usable rows in {', '.join(str(p) for ps in files.values() for p in ps)}: "
            f"{raw_report['rows_read']} rows read, all skipped ({raw_report['skipped_rows']}); "
            "check --format and the schema (delimiter, column count)"
        )
    encoders = fit_encoders(tables["train"].table, resolved, options)
    fmap = encoders.feature_map(resolved)
    day_origin = _day_origin(tables, resolved)
    groups = _group_codes(tables, resolved)
    splits = {}
    for name, raw in tables.items():
        encoded = encode_table(raw.table, resolved, encoders, fmap, day_origin)
        encoded.group = groups.get(name)
        encoded.skipped_rows = dict(raw.skipped)
        splits[name] = encoded
    report = {
        "format": format,
        "files": {k: [str(p) for p in v] for k, v in files.items()},
        **raw_report,
        **_describe(splits, fmap),
        "encoders": encoders.state(),
        "options": {**asdict(options), "seed": seed, "split": settings["split"]},
    }
    if entry is not None:
        cache.save(entry, fmap, splits, report)
    report = {
        **report,
        "cache": {"hit": False, "path": str(entry) if entry else None},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Dataset(fmap, splits["train"], splits["valid"], splits["test"], report)


def resolve_schema(format: str, schema: Schema | dict[str, Any] | PathLike | None, first_file: Path) -> Schema:
    """The schema to read ``first_file`` with: given, built in, or the generator's sidecar file."""
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, dict):
        return Schema.from_dict(schema)
    if schema is not None:
        return Schema.load(schema)
    if format in BUILTIN_SCHEMAS:
        return BUILTIN_SCHEMAS[format]()
    sidecar = sidecar_path(first_file)
    if sidecar.is_file():
        return Schema.load(sidecar)
    raise DataFormatError(
        f"format {format!r} needs a schema: pass schema=Schema(...)/a JSON or YAML path, "
        f"or write one to {sidecar} (meda ctr generate does this for its files)"
    )


def _paths(data: PathLike | list[PathLike]) -> list[Path]:
    items = data if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError("no input files given")
    return [Path(p) for p in items]


def _read_splits(
    files: dict[str, list[Path]], fmt: str, schema: Schema, split: tuple[float, float, float], seed: int
) -> tuple[dict[str, RawTable], dict[str, Any]]:
    """Read the files; split a single source at random. Returns raw tables and the reading report."""
    raws = {name: read_files(paths, fmt, schema) for name, paths in files.items()}
    skipped: dict[str, int] = {}
    for raw in raws.values():
        for reason, n in raw.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    report = {
        "rows_read": sum(r.rows_read for r in raws.values()),
        "skipped_rows": skipped,
        "rows_used": sum(r.table.num_rows for r in raws.values()),
    }
    if "valid" in raws:
        return raws, report
    source = raws["train"]
    index = random_split(source.table.num_rows, split, seed)
    tables = {name: RawTable(source.table.take(pa.array(idx)), rows_read=0) for name, idx in index.items()}
    tables["train"] = RawTable(tables["train"].table, source.rows_read, dict(source.skipped))
    return tables, report


def random_split(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Seeded random split of ``n`` rows: sorted int64 row indices per split (valid/test floor-sized)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = int(n * fractions[1]), int(n * fractions[2])
    n_train = n - n_valid - n_test
    parts = {
        "train": perm[:n_train],
        "valid": perm[n_train : n_train + n_valid],
        "test": perm[n_train + n_valid :],
    }
    return {k: np.sort(v) for k, v in parts.items()}


def _describe(splits: dict[str, EncodedData], fmap: FeatureMap) -> dict[str, Any]:
    """Split sizes, click rates, day count, vocabulary sizes and field counts for the report."""
    last_days = [int(v.day.max()) for v in splits.values() if v.day is not None and len(v)]
    return {
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "label_mean": {k: float(v.label.mean()) if len(v) else None for k, v in splits.items()},
        "days": max(last_days) + 1 if last_days else None,  # day indices start at 0
        "vocab_sizes": {f.name: f.vocab_size for f in fmap.fields if f.kind != "numeric"},
        "fields": {kind: len(getattr(fmap, kind)) for kind in ("categorical", "numeric", "sequence")},
    }


def _day_origin(tables: dict[str, RawTable], schema: Schema) -> int:
    """Smallest day over every split, so day indices start at 0."""
    if schema.day is None:
        return 0
    mins = [pc.min(t.table[schema.day]).as_py() for t in tables.values() if t.table.num_rows]
    return int(min(m for m in mins if m is not None)) if mins else 0


def _group_codes(tables: dict[str, RawTable], schema: Schema) -> dict[str, np.ndarray]:
    """Group column -> int64 codes ``[rows]`` per split, consistent across splits."""
    if schema.group is None:
        return {}
    names = list(tables)
    joined = pa.chunked_array([tables[n].table[schema.group].combine_chunks() for n in names])
    codes = pc.dictionary_encode(joined.combine_chunks()).indices.to_numpy().astype(np.int64)
    bounds = np.cumsum([0, *(tables[n].table.num_rows for n in names)])
    return {n: codes[bounds[i] : bounds[i + 1]] for i, n in enumerate(names)}
