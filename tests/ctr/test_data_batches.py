"""Batches: every row once per epoch, shapes and dtypes, days and shards."""

import numpy as np
import pytest
import torch

from meda.ctr.batches import iterate_batches, split_by_day, split_into_chunks, take
from meda.ctr.features import EncodedData


def make_data(n: int = 103, with_group: bool = True) -> EncodedData:
    rows = np.arange(n)
    return EncodedData(
        categorical=np.stack([rows, rows * 2], axis=1).astype(np.int64),
        numeric=(rows[:, None] / 10.0).astype(np.float32),
        sequence=np.broadcast_to(rows[:, None, None], (n, 1, 4)).astype(np.int64),
        label=(rows % 2).astype(np.float32),
        day=(rows * 3 // n).astype(np.int64),
        group=rows % 5 if with_group else None,
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exactly_once_per_epoch(shuffle: bool) -> None:
    data = make_data()
    batches = list(iterate_batches(data, batch_size=16, shuffle=shuffle, seed=7))
    assert [len(b["label"]) for b in batches] == [16] * 6 + [7]
    seen = torch.cat([b["categorical"][:, 0] for b in batches]).numpy()
    assert sorted(seen.tolist()) == list(range(103))
    assert (seen == np.arange(103)).all() != shuffle
    b = batches[0]
    assert b["categorical"].dtype == torch.int64 and b["categorical"].shape == (16, 2)
    assert b["numeric"].dtype == torch.float32 and b["numeric"].shape == (16, 1)
    assert b["sequence"].dtype == torch.int64 and b["sequence"].shape == (16, 1, 4)
    assert b["label"].dtype == torch.float32 and b["label"].shape == (16,)
    # fields of one row stay together
    assert torch.equal(b["categorical"][:, 1], 2 * b["categorical"][:, 0])
    assert torch.equal(b["group"], b["categorical"][:, 0] % 5)


def test_shuffle_is_seeded() -> None:
    data = make_data(with_group=False)
    first = [b["label"] for b in iterate_batches(data, 10, shuffle=True, seed=1)]
    again = [b["label"] for b in iterate_batches(data, 10, shuffle=True, seed=1)]
    other = torch.cat([b["categorical"][:, 0] for b in iterate_batches(data, 10, shuffle=True, seed=2)])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert "group" not in next(iterate_batches(data, 10, shuffle=True, seed=1))
    assert not torch.equal(other, torch.cat([b["categorical"][:, 0] for b in iterate_batches(data, 10, True, 1)]))


def test_drop_last_and_shards() -> None:
    data = make_data()
    assert sum(len(b["label"]) for b in iterate_batches(data, 16, False, drop_last=True)) == 96
    shards = [take(data, slice(0, 50)), take(data, slice(50, 103))]
    rows = torch.cat([b["categorical"][:, 0] for b in iterate_batches(shards, 16, shuffle=True, seed=0)])
    assert sorted(rows.tolist()) == list(range(103))


def test_batches_from_read_only_memmap(tmp_path) -> None:
    data = make_data()
    np.save(tmp_path / "c.npy", data.categorical)
    data.categorical = np.load(tmp_path / "c.npy", mmap_mode="r")
    batch = next(iterate_batches(data, 8, shuffle=False))
    batch["categorical"] += 1  # writable copy
    assert batch["categorical"][:, 0].tolist() == list(range(1, 9))


def test_split_by_day_and_chunks() -> None:
    data = make_data(30)
    data.day = np.array([2, 0, 1] * 10)
    days = split_by_day(data)
    assert [len(d) for d in days] == [10, 10, 10]
    assert [int(d.day[0]) for d in days] == [0, 1, 2]
    assert days[0].categorical[:, 0].tolist() == list(range(1, 30, 3))  # original order kept
    chunks = split_into_chunks(data, 4)
    assert [len(c) for c in chunks] == [7, 8, 7, 8]
    assert chunks[1].label.tolist() == data.label[7:15].tolist()
    data.day = None
    with pytest.raises(ValueError, match="no day column"):
        split_by_day(data)


def test_unshuffled_shards_are_read_lazily() -> None:
    loaded = []

    def shards():
        for start in (0, 50):
            loaded.append(start)
            yield take(make_data(), slice(start, start + 50))

    batches = iterate_batches(shards(), 50, shuffle=False)
    next(batches)
    assert loaded == [0]
    assert next(batches)["categorical"][0, 0].item() == 50 and loaded == [0, 50]
