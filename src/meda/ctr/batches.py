"""Mini-batches of encoded rows as torch tensors, and day/chunk views for continual training.

Batches are cut by vectorised numpy indexing (no per-row Python). Any function here
that takes data also takes an iterable of shards (each an :class:`EncodedData`), so
data can later stream from many shard files without changing the training loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from meda.ctr.features import EncodedData

Shards = EncodedData | Iterable[EncodedData]


def take(data: EncodedData, index: np.ndarray | slice) -> EncodedData:
    """Rows ``index`` of ``data`` as a new :class:`EncodedData` (skipped-row counts are not copied)."""
    return EncodedData(
        categorical=data.categorical[index],
        numeric=data.numeric[index],
        sequence=data.sequence[index],
        label=data.label[index],
        day=None if data.day is None else data.day[index],
        group=None if data.group is None else data.group[index],
    )


def to_tensors(data: EncodedData, index: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``index`` ``[B]`` as tensors: categorical int64 ``[B, n_cat]``, numeric float32
    ``[B, n_num]``, sequence int64 ``[B, n_seq, L]``, label float32 ``[B]``, and group int64 ``[B]``
    when present. Fancy indexing copies, so memory-mapped inputs give writable tensors."""
    batch = {
        "categorical": torch.from_numpy(np.ascontiguousarray(data.categorical[index], dtype=np.int64)),
        "numeric": torch.from_numpy(np.ascontiguousarray(data.numeric[index], dtype=np.float32)),
        "sequence": torch.from_numpy(np.ascontiguousarray(data.sequence[index], dtype=np.int64)),
        "label": torch.from_numpy(np.ascontiguousarray(data.label[index], dtype=np.float32)),
    }
    if data.group is not None:
        batch["group"] = torch.from_numpy(np.ascontiguousarray(data.group[index], dtype=np.int64))
    return batch


def iterate_batches(
    data: Shards, batch_size: int, shuffle: bool, seed: int = 0, *, drop_last: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield every row once, ``batch_size`` rows at a time, as :func:`to_tensors` dicts.

    With ``shuffle`` the row order (and the shard order, for several shards) is a seeded
    permutation; pass a different ``seed`` per epoch. Batches do not cross shard borders,
    so a shard's last batch may be short (``drop_last`` drops short batches).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for shard, rows in row_orders(data, shuffle, seed):
        n = len(rows)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield to_tensors(shard, rows[start : start + batch_size])


def row_orders(data: Shards, shuffle: bool, seed: int = 0) -> Iterator[tuple[EncodedData, np.ndarray]]:
    """Each shard with the order its rows are visited in (int64 ``[rows]``), as :func:`iterate_batches` does.

    With ``shuffle`` the shard order and each shard's row order are seeded permutations
    (one generator, shard order drawn first); unshuffled shards are consumed lazily.
    """
    rng = np.random.default_rng(seed)
    shards: Iterable[EncodedData] = [data] if isinstance(data, EncodedData) else data
    if shuffle:  # shard order too; unshuffled shards are consumed lazily, one at a time
        listed = list(shards)
        shards = [listed[i] for i in rng.permutation(len(listed))]
    for shard in shards:
        n = len(shard)
        yield shard, (rng.permutation(n) if shuffle else np.arange(n))


def split_by_day(data: EncodedData) -> list[EncodedData]:
    """One :class:`EncodedData` per distinct day, in increasing day order (rows keep their order)."""
    if data.day is None:
        raise ValueError("these data have no day column; pass a schema with day=... (or --days to generate)")
    order = np.argsort(data.day, kind="stable")
    days, starts = np.unique(data.day[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    return [take(data, order[bounds[i] : bounds[i + 1]]) for i in range(len(days))]


def split_into_chunks(data: EncodedData, n_chunks: int) -> list[EncodedData]:
    """``n_chunks`` consecutive, near-equal row ranges (for continual mode without a day column)."""
    if not 1 <= n_chunks <= max(len(data), 1):
        raise ValueError(f"n_chunks must be in [1, {len(data)}], got {n_chunks}")
    bounds = np.linspace(0, len(data), n_chunks + 1).astype(int)
    return [take(data, slice(bounds[i], bounds[i + 1])) for i in range(n_chunks)]
