"""Shard discovery and the train/valid/test split of a directory of shards.

``--data DIR`` (or a glob such as ``'data/part-*.parquet'``) names many files of one format.
A directory's split is one of:

- ``row`` (default): each row goes to train/valid/test by a seeded 64-bit hash of
  (seed, shard *file name*, row number among the shard's usable rows), compared with the
  split fractions. It does not depend on the shard order, the number of processes or the
  directory's location, and the same seed gives the same split on every machine.
- ``shard``: whole shards go to a split: a seeded permutation of the shard names, the last
  ``round(n * test)`` shards (at least one) test, the ``round(n * valid)`` (at least one)
  before them validation, the rest train. Needs at least 3 shards.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pyarrow as pa

from meda.ctr.schema import sidecar_path
from meda.ctr.vocab import stable_hash

SPLIT_BY = ("row", "shard")
SPLITS = ("train", "valid", "test")
_SUFFIXES = {"criteo": (".txt", ".tsv"), "avazu": (".csv",), "csv": (".csv", ".tsv", ".txt"), "parquet": (".parquet",)}
_GLOB_CHARS = set("*?[")


def is_sharded(data: str | Path | list[str | Path]) -> bool:
    """Whether ``data`` names shards (a directory or a glob) rather than files."""
    if isinstance(data, list | tuple):
        return False
    return Path(data).is_dir() or bool(_GLOB_CHARS & set(str(data)))


def list_shards(data: str | Path, fmt: str) -> list[Path]:
    """The shard files of a directory (files with ``fmt``'s suffixes, compressed ``.gz`` included) or a
    glob, sorted by name; schema sidecars are left out. Raises when there is none."""
    path = Path(data)
    if path.is_dir():
        suffixes = _SUFFIXES[fmt]
        found = [p for p in path.iterdir() if p.is_file() and p.name.removesuffix(".gz").endswith(suffixes)]
        where = f"directory {path} has no {fmt} shards (files ending in {', '.join(suffixes)})"
    else:
        found = [Path(p) for p in glob.glob(str(data)) if Path(p).is_file()]
        where = f"pattern {data!r} matches no file"
    shards = sorted((p for p in found if not p.name.endswith(".schema.json")), key=lambda p: p.name)
    if not shards:
        raise FileNotFoundError(f"{where}; check --data and --format")
    return shards


def schema_sidecar(shards: list[Path]) -> Path | None:
    """``<dir>/schema.json`` or the first shard's ``<shard>.schema.json``, if one exists."""
    for candidate in (shards[0].parent / "schema.json", sidecar_path(shards[0])):
        if candidate.is_file():
            return candidate
    return None


def assign_shards(shards: list[Path], fractions: tuple[float, float, float], seed: int) -> dict[str, list[Path]]:
    """``split_by="shard"``: whole shards per split (see the module doc), each list in name order."""
    n = len(shards)
    if n < 3:
        raise ValueError(f"--split-by shard needs at least 3 shards, found {n}; use --split-by row")
    n_test = max(1, round(n * fractions[2]))
    n_valid = max(1, round(n * fractions[1]))
    if n_test + n_valid >= n:
        raise ValueError(f"{n} shards leave none for training with split {fractions}; use --split-by row")
    order = np.random.default_rng(seed).permutation(n)
    parts = {"train": order[: n - n_valid - n_test], "valid": order[n - n_valid - n_test : n - n_test],
             "test": order[n - n_test :]}  # fmt: skip
    return {k: [shards[i] for i in sorted(v)] for k, v in parts.items()}


def row_splits(shard_name: str, n: int, seed: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """``split_by="row"``: split index (0 train, 1 valid, 2 test) of each of ``n`` rows, uint8 ``[n]``."""
    u = uniform(shard_name, n, seed, salt=0)
    return (u >= fractions[0]).astype(np.uint8) + (u >= fractions[0] + fractions[1]).astype(np.uint8)


def uniform(shard_name: str, n: int, seed: int, salt: int) -> np.ndarray:
    """Seeded uniform numbers in [0, 1) ``[n]`` for the rows of one shard (``salt`` picks a stream)."""
    return (row_keys(shard_name, n, seed, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_keys(shard_name: str, n: int, seed: int, salt: int) -> np.ndarray:
    """Seeded 64-bit keys ``[n]`` of the rows of one shard: splitmix64 of (seed, salt, name hash, row)."""
    base = int(stable_hash(pa.array([shard_name]))[0])
    start = _mix(np.array([(base ^ (seed * 0x9E3779B1) ^ (salt << 56)) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _mix(start + np.arange(n, dtype=np.uint64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
