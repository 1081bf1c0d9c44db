"""Data larger than memory: a directory of shards, encoded once to disk, streamed in bounded memory.

:func:`load_sharded` (what :func:`meda.ctr.data.load_dataset` calls for a directory or a glob)
makes two passes over the shards, holding one shard's rows at a time:

1. **statistics**: every training shard is read and checked, its training rows (see
   :mod:`meda.ctr.shards` for the split) counted: exact token counts per field (memory grows with
   the number of *distinct* tokens, not with rows; fields with ``hash_buckets`` are not counted),
   the smallest day, and a uniform sample of at most ``numeric_sample`` numeric values per field
   (the rows with the smallest seeded hash keys) for the transforms that have parameters
   (``standardise``, ``bucket``, ``log-bucket``; exact when train has fewer rows).
2. **encoding**: every shard is read again, split, encoded with the fitted encoders and written as
   ``.npy`` arrays per (split, shard) under one cache entry, with ``meta.json`` last (an
   interrupted build leaves no entry). Later runs with the same shards and options reuse it.

:class:`StreamedSplit` then serves a split from those arrays (memory-mapped): training batches
come from a shuffle buffer that holds whole shards until it has ``shuffle_rows`` rows, is
permuted (seeded) and moved to the device in one block, while a worker thread prepares the next
buffer; rows left over after the last full batch carry into the next buffer. Memory is bounded by
a few buffers (the one trained on, the next being prepared), whatever the number of rows. Under
torchrun the shards are divided among the ranks round-robin in name order, each rank shuffles its
own; all ranks stop at the shortest rank's batch count (``timing`` in metrics.json counts the rows
trained). Evaluation keeps one label and one logit per validation/test row
(12 bytes a row) for the exact AUC.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from meda.ctr import cache
from meda.ctr.batches import take, to_tensors
from meda.ctr.encoding import EncodingOptions, _floats, build_encoders, encode_table, merge_counts, token_counts
from meda.ctr.features import EncodedData, FeatureMap, Field
from meda.ctr.readers import DataFormatError, RawTable, read_file
from meda.ctr.schema import Schema
from meda.ctr.shards import SPLIT_BY, SPLITS, assign_shards, list_shards, row_keys, row_splits, schema_sidecar
from meda.ctr.sources import rank_range
from meda.ctr.vocab import stable_hash

Batch = dict[str, torch.Tensor]
BAD_SHARDS = ("stop", "skip")
DEFAULT_SHUFFLE_ROWS = 500_000
NUMERIC_SAMPLE = 1_000_000
STREAM_VERSION = 1
_ARRAYS = ("categorical", "numeric", "sequence", "label", "day", "group")
_ROWS = "rows"  # role of a shard whose rows are split by hash


class StreamedSplit:
    """One split of a sharded data set, read from its encoded ``.npy`` parts (a :class:`BatchSource`).

    Args:
        root: the cache entry holding the parts.
        parts: ``{"file": "train/00003", "shard": name, "rows": n}`` per encoded part, in shard-name order.
        arrays: which arrays the parts have (``day`` and ``group`` are optional).
        shuffle_rows: rows the training shuffle buffer fills up to (whole shards at a time).
        device: where batches are delivered.
    """

    def __init__(
        self,
        root: Path,
        parts: list[dict[str, Any]],
        arrays: tuple[str, ...],
        shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
        device: torch.device | None = None,
    ) -> None:
        if shuffle_rows < 1:
            raise ValueError(f"shuffle_rows must be >= 1, got {shuffle_rows}")
        self.root, self.parts, self.arrays, self.shuffle_rows = root, parts, arrays, shuffle_rows
        self.device = device or torch.device("cpu")
        self._label: np.ndarray | None = None

    def on(self, device: torch.device) -> StreamedSplit:
        """The same split delivering batches on ``device``."""
        return StreamedSplit(self.root, self.parts, self.arrays, self.shuffle_rows, device)

    def __len__(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def label(self) -> np.ndarray:
        """float32 ``[rows]`` (read once, then kept: evaluation splits only)."""
        if self._label is None:
            self._label = self._concat("label", np.float32)
        return self._label

    @property
    def group(self) -> np.ndarray | None:
        return self._concat("group", np.int64) if "group" in self.arrays else None

    def chunks(self) -> list[StreamedSplit]:
        """One split per part (shard), in name order: the ordered chunks of meda-continual."""
        return [StreamedSplit(self.root, [p], self.arrays, self.shuffle_rows, self.device) for p in self.parts]

    def num_train_batches(self, batch_size: int, world: int = 1) -> int:
        """Batches per rank per epoch: the smallest rank's ``ceil(rows / (batch_size / world))``."""
        local = _local_batch(batch_size, world)
        return min(math.ceil(sum(p["rows"] for p in self.parts[r::world]) / local) for r in range(world))

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Shuffled batches of ``batch_size / world`` rows from this rank's shards (see the module doc)."""
        local = _local_batch(batch_size, world)
        steps = self.num_train_batches(batch_size, world)
        rng = np.random.default_rng(seed)
        mine = self.parts[rank::world]
        done = 0
        for host in _one_ahead(self._buffers([mine[i] for i in rng.permutation(len(mine))], rng, local)):
            block = self._device(host)
            n = block["label"].shape[0]
            for s in range(0, n, local):
                if done == steps:
                    return
                yield {k: v[s : s + local] for k, v in block.items()}
                done += 1

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """The rank's contiguous row range, in order, one part's slice on the device at a time."""
        lo, hi = rank_range(len(self), rank, world)
        offset = 0
        for part in self.parts:
            a, b = max(lo, offset), min(hi, offset + part["rows"])
            if a < b:
                block = self._device(to_tensors(self._load(part, a - offset, b - offset), slice(None)))
                for s in range(0, b - a, batch_size):
                    yield {k: v[s : s + batch_size] for k, v in block.items()}
            offset += part["rows"]

    def _buffers(self, parts: list[dict[str, Any]], rng: np.random.Generator, local: int) -> Iterator[Batch]:
        """Permuted host blocks of whole batches (the last block may end short)."""
        pending: list[EncodedData] = []
        rows = 0
        for i, part in enumerate(parts):
            pending.append(self._load(part))
            rows += part["rows"]
            last = i == len(parts) - 1
            if rows < self.shuffle_rows and not last:
                continue
            buffer = _concat_parts(pending)
            pending = []
            perm = rng.permutation(len(buffer))
            cut = len(buffer) if last else len(buffer) - len(buffer) % local
            yield to_tensors(buffer, perm[:cut])
            if cut < len(buffer):
                pending, rows = [take(buffer, perm[cut:])], len(buffer) - cut
            else:
                rows = 0

    def _device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _load(self, part: dict[str, Any], lo: int = 0, hi: int | None = None) -> EncodedData:
        """Rows ``[lo, hi)`` of one part, copied out of the memory-mapped arrays."""
        arrays = {a: np.array(np.load(self.root / f"{part['file']}.{a}.npy", mmap_mode="r")[lo:hi])
                  for a in self.arrays}  # fmt: skip
        return EncodedData(**arrays)

    def _concat(self, name: str, dtype: type) -> np.ndarray:
        out = np.empty(len(self), dtype=dtype)
        offset = 0
        for p in self.parts:
            out[offset : offset + p["rows"]] = np.load(self.root / f"{p['file']}.{name}.npy", mmap_mode="r")
            offset += p["rows"]
        return out


def load_sharded(
    data: str | Path,
    format: str,
    *,
    schema: Schema | dict[str, Any] | str | Path | None = None,
    valid: str | Path | None = None,
    test: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    min_count: int = 1,
    seed: int = 0,
    numeric: str = "log",
    n_buckets: int = 32,
    hash_buckets: int | None = None,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_by: str = "row",
    bad_shards: str = "stop",
    shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
    numeric_sample: int = NUMERIC_SAMPLE,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Encode a directory (or glob) of shards once and return a :class:`meda.ctr.data.Dataset` of
    :class:`StreamedSplit` splits. Options as :func:`meda.ctr.data.load_dataset`, plus:

    Args:
        split_by: "row" (seeded hash of each row) or "shard" (whole shards), see :mod:`meda.ctr.shards`;
            ignored when ``valid`` and ``test`` (files, directories or globs) are given.
        bad_shards: "stop" at the first shard that cannot be read, or "skip" it (listed in the
            report with the error) and go on.
        shuffle_rows: size of the training shuffle buffer in rows.
        numeric_sample: most train values per numeric field the transforms are fitted on.
        log: called with one line per skipped shard.
    """
    from meda.ctr.data import Dataset, resolve_schema

    started = time.perf_counter()
    if split_by not in SPLIT_BY:
        raise ValueError(f"unknown split_by {split_by!r}; use one of {', '.join(SPLIT_BY)}")
    if bad_shards not in BAD_SHARDS:
        raise ValueError(f"unknown bad_shards {bad_shards!r}; use one of {', '.join(BAD_SHARDS)}")
    if (valid is None) != (test is None):
        raise ValueError("pass both valid= and test= shards, or neither (then the data are split)")
    roles = _roles(data, format, valid, test, split, seed, split_by)
    shard_list = [p for p, _ in roles]
    resolved = resolve_schema(format, schema or schema_sidecar(shard_list), shard_list[0])
    options = EncodingOptions(min_count=min_count, numeric=numeric, n_buckets=n_buckets, hash_buckets=hash_buckets)
    settings = {"v": STREAM_VERSION, "format": format, "schema": resolved.to_dict(), "options": asdict(options),
                "seed": seed, "split": list(split), "split_by": split_by if valid is None else None,
                "numeric_sample": numeric_sample, "bad_shards": bad_shards,
                "roles": [[str(p.resolve()), role] for p, role in roles]}  # fmt: skip
    base = Path(cache_dir or cache.default_cache_dir())
    entry = base / ("stream-" + cache.cache_key(shard_list, settings)) if use_cache else _scratch_dir(base)
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        meta["report"]["cache"] = {"hit": True, "path": str(entry)}
    else:
        meta = _build(entry, roles, format, resolved, options, seed, split, numeric_sample, bad_shards, log)
        meta["report"]["cache"] = {"hit": False, "path": str(entry) if use_cache else None}
    meta["report"]["seconds"] = round(time.perf_counter() - started, 3)
    fmap = FeatureMap([Field(**f) for f in meta["feature_map"]["fields"]], label=meta["feature_map"]["label"])
    arrays = tuple(meta["arrays"])
    splits = {s: StreamedSplit(entry, meta["parts"][s], arrays, shuffle_rows) for s in SPLITS}
    return Dataset(fmap, splits["train"], splits["valid"], splits["test"], meta["report"])


def _roles(
    data: str | Path,
    fmt: str,
    valid: str | Path | None,
    test: str | Path | None,
    split: tuple[float, float, float],
    seed: int,
    split_by: str,
) -> list[tuple[Path, str]]:
    """Every shard with the split it feeds: "train", "valid", "test", or "rows" (split by row hash)."""
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    train = list_shards(data, fmt)
    if valid is not None and test is not None:
        return [(p, s) for s, spec in (("train", data), ("valid", valid), ("test", test))
                for p in (train if s == "train" else _files(spec, fmt))]  # fmt: skip
    if split_by == "row":
        return [(p, _ROWS) for p in train]
    assigned = assign_shards(train, split, seed)
    return [(p, s) for s in SPLITS for p in assigned[s]]


def _files(spec: str | Path, fmt: str) -> list[Path]:
    path = Path(spec)
    return [path] if path.is_file() else list_shards(spec, fmt)


def _build(
    entry: Path,
    roles: list[tuple[Path, str]],
    fmt: str,
    schema: Schema,
    options: EncodingOptions,
    seed: int,
    split: tuple[float, float, float],
    numeric_sample: int,
    bad_shards: str,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The two passes (module doc); writes the entry atomically and returns its ``meta.json`` content."""
    reader = _ShardReader(fmt, schema, bad_shards, log or (lambda _: None))
    stats = _TrainStats(schema, numeric_sample)
    for path, role in _progress([r for r in roles if r[1] in ("train", _ROWS)], "pass 1/2: vocabularies"):
        raw = reader.read(path)
        if raw is not None:
            stats.add(path.name, _parts(raw.table, role, path.name, seed, split).get("train"))
    if stats.rows == 0:
        raise DataFormatError(
            f"no usable training rows in {len(roles)} shard(s): {reader.summary()}; check --format, the schema "
            "and the shards"
        )
    encoders = build_encoders(stats.counts, stats.numeric_values(), schema, options)
    fmap = encoders.feature_map(schema)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        sizes = {s: 0 for s in SPLITS}
        clicks = {s: 0.0 for s in SPLITS}
        reader.reset_counts()
        for path, role in _progress(roles, "pass 2/2: encoding"):
            raw = reader.read(path)
            if raw is None:
                continue
            for s, table in _parts(raw.table, role, path.name, seed, split).items():
                if table.num_rows == 0:
                    continue
                encoded = encode_table(table, schema, encoders, fmap, stats.day_origin)
                if schema.group is not None:
                    encoded.group = stable_hash(table[schema.group]).view(np.int64)
                file = f"{s}/{len(parts[s]):05d}"
                (tmp / s).mkdir(exist_ok=True)
                for name in _ARRAYS:
                    if (arr := getattr(encoded, name)) is not None:
                        np.save(tmp / f"{file}.{name}.npy", np.ascontiguousarray(arr))
                parts[s].append({"file": file, "shard": path.name, "rows": len(encoded)})
                sizes[s] += len(encoded)
                clicks[s] += float(encoded.label.sum())
        optional = {"day": schema.day is not None, "group": schema.group is not None}
        arrays = [a for a in _ARRAYS if optional.get(a, True)]
        report = {
            "format": fmt,
            "shards": reader.per_shard,
            "bad_shards": reader.bad,
            **reader.totals(),
            "split_sizes": sizes,
            "label_mean": {s: clicks[s] / sizes[s] if sizes[s] else None for s in SPLITS},
            "vocab_sizes": {f.name: f.vocab_size for f in fmap.fields if f.kind != "numeric"},
            "fields": {kind: len(getattr(fmap, kind)) for kind in ("categorical", "numeric", "sequence")},
            "encoders": encoders.state(),
            "options": {
                **asdict(options), "seed": seed, "split": list(split), "numeric_sample": numeric_sample,
                "numeric_sampled_rows": len(stats.keys), "train_rows_counted": stats.rows,
            },
        }
        meta = {"feature_map": {"fields": [asdict(f) for f in fmap.fields], "label": fmap.label},
                "arrays": arrays, "parts": parts, "report": report}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if (entry / "meta.json").exists():  # another process finished first: keep its entry
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class _ShardReader:
    """Reads shards, counting rows per shard and handling unreadable ones (stop or skip)."""

    def __init__(self, fmt: str, schema: Schema, bad_shards: str, log: Callable[[str], None]) -> None:
        self.fmt, self.schema, self.bad_shards, self.log = fmt, schema, bad_shards, log
        self.bad: list[dict[str, str]] = []
        self.per_shard: list[dict[str, Any]] = []

    def reset_counts(self) -> None:
        """Pass 2 counts every shard again (valid/test shards are first read there)."""
        self.per_shard = []

    def read(self, path: Path) -> RawTable | None:
        if any(b["shard"] == path.name for b in self.bad):
            return None
        try:
            raw = read_file(path, self.fmt, self.schema)
        except (DataFormatError, OSError, pa.ArrowException) as err:
            if self.bad_shards == "stop":
                raise DataFormatError(
                    f"shard {path} cannot be read: {err}. Read before it: {self.summary()}. "
                    "Fix or remove the shard, or pass --bad-shards skip to leave unreadable shards out "
                    "(they are listed in metrics.json under data.bad_shards)"
                ) from err
            self.bad.append({"shard": path.name, "error": str(err)})
            self.log(f"skipped unreadable shard {path.name}: {err}")
            return None
        self.per_shard.append({"shard": path.name, "rows_read": raw.rows_read, "rows_used": raw.table.num_rows,
                               "skipped_rows": dict(raw.skipped)})  # fmt: skip
        return raw

    def totals(self) -> dict[str, Any]:
        skipped: dict[str, int] = {}
        for s in self.per_shard:
            for reason, n in s["skipped_rows"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        return {"rows_read": sum(s["rows_read"] for s in self.per_shard), "skipped_rows": skipped,
                "rows_used": sum(s["rows_used"] for s in self.per_shard)}  # fmt: skip

    def summary(self) -> str:
        t = self.totals()
        return (f"{len(self.per_shard)} shard(s), {t['rows_read']} rows read, {t['rows_used']} usable, "
                f"skipped {t['skipped_rows'] or 'none'}, {len(self.bad)} unreadable shard(s) skipped")  # fmt: skip


class _TrainStats:
    """Pass-1 statistics of the training rows: token counts, smallest day, numeric sample."""

    def __init__(self, schema: Schema, numeric_sample: int) -> None:
        self.schema, self.limit = schema, numeric_sample
        self.counted = [s for s in schema.fields if s.kind != "numeric" and s.hash_buckets is None]
        self.numeric = [s.name for s in schema.fields if s.kind == "numeric"]
        self.counts: dict[str, pa.Table] = {}
        self.keys = np.zeros(0, dtype=np.uint64)
        self.values = {n: np.zeros(0) for n in self.numeric}
        self.rows = 0
        self.day_origin = 0
        self._day: int | None = None

    def add(self, shard: str, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        self.rows += table.num_rows
        for spec in self.counted:
            part = token_counts(table, spec)
            self.counts[spec.name] = merge_counts(self.counts[spec.name], part) if spec.name in self.counts else part
        if self.schema.day is not None:
            day = int(np.min(table[self.schema.day].to_numpy()))
            self._day = day if self._day is None else min(self._day, day)
            self.day_origin = self._day
        if self.numeric:  # keep the rows with the smallest keys: a uniform sample of bounded size
            keys = np.concatenate([self.keys, row_keys(shard, table.num_rows, 0, salt=1)])
            values = {n: np.concatenate([self.values[n], _floats(table[n])]) for n in self.numeric}
            if len(keys) > self.limit:
                keep = np.argpartition(keys, self.limit)[: self.limit]
                keys, values = keys[keep], {n: v[keep] for n, v in values.items()}
            self.keys, self.values = keys, values

    def numeric_values(self) -> dict[str, np.ndarray]:
        return self.values


def _parts(table: pa.Table, role: str, name: str, seed: int, split: tuple[float, float, float]) -> dict[str, pa.Table]:
    """The shard's rows per split: all of them for a shard with one role, else by row hash."""
    if role != _ROWS:
        return {role: table}
    which = row_splits(name, table.num_rows, seed, split)
    return {s: table.filter(pa.array(which == i)) for i, s in enumerate(SPLITS)}


def _concat_parts(parts: list[EncodedData]) -> EncodedData:
    if len(parts) == 1:
        return parts[0]
    optional = {k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts])
                for k in ("day", "group")}  # fmt: skip
    return EncodedData(**{k: np.concatenate([getattr(p, k) for p in parts])
                          for k in ("categorical", "numeric", "sequence", "label")}, **optional)  # fmt: skip


def _one_ahead(blocks: Iterator[Batch]) -> Iterator[Batch]:
    """``blocks``, with the next one prepared in a worker thread while the caller trains on this one
    (numpy releases the GIL while it copies; the order, and so the shuffle, is unchanged)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, blocks, None)
        while (block := pending.result()) is not None:
            pending = pool.submit(next, blocks, None)
            yield block


def _local_batch(batch_size: int, world: int) -> int:
    if batch_size % world or batch_size < world:
        raise ValueError(f"batch size {batch_size} must be a multiple of the {world} processes")
    return batch_size // world


def _scratch_dir(base: Path) -> Path:
    """A fresh folder for a run without the cache, removed when the process exits."""
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="nocache-", dir=base)) / "entry"
    atexit.register(shutil.rmtree, path.parent, True)
    return path


def _progress(items: list[Any], desc: str) -> Any:
    return tqdm(items, desc=desc, unit="shard", leave=False, disable=not sys.stderr.isatty())

