"""A small, learnable CTR dataset built directly as encoded arrays (no readers involved)."""

from __future__ import annotations

import numpy as np

from meda.ctr.data import Dataset
from meda.ctr.features import EncodedData, FeatureMap, Field

VOCABS = (60, 40, 12)


def learnable_dataset(rows: int = 6000, seed: int = 0, days: int = 0, with_group: bool = False) -> Dataset:
    """Three categorical fields, one numeric and one sequence field; the click logit is a sum of
    per-id effects, a numeric slope and one pairwise interaction, so every model can learn it.
    Split 8:1:1 in row order; with ``days`` the training rows carry a day index."""
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(2, v, rows) for v in VOCABS], axis=1)
    num = rng.normal(size=(rows, 1)).astype(np.float32)
    seq = rng.integers(0, VOCABS[1], (rows, 1, 3))
    effects = [rng.normal(0, 1.0, v) for v in VOCABS]
    logit = sum(e[cat[:, i]] for i, e in enumerate(effects)) + 0.8 * num[:, 0]
    logit += 0.8 * np.sign(effects[0][cat[:, 0]] * effects[1][cat[:, 1]])
    label = (rng.random(rows) < 1 / (1 + np.exp(-(logit - 1.0)))).astype(np.float32)
    group = rng.integers(0, 50, rows) if with_group else None
    data = EncodedData(cat, num, seq, label, group=group)
    fmap = FeatureMap(
        [Field(f"c{i}", "categorical", vocab_size=v) for i, v in enumerate(VOCABS)]
        + [Field("n0", "numeric"), Field("s0", "sequence", vocab_size=VOCABS[1], max_len=3)]
    )
    a, b = int(rows * 0.8), int(rows * 0.9)
    parts = [_take(data, slice(0, a)), _take(data, slice(a, b)), _take(data, slice(b, rows))]
    if days:
        parts[0].day = np.repeat(np.arange(days), int(np.ceil(a / days)))[:a]
    return Dataset(fmap, *parts, report={"rows_read": rows, "skipped_rows": {}})


def _take(d: EncodedData, s: slice) -> EncodedData:
    group = None if d.group is None else d.group[s]
    return EncodedData(d.categorical[s], d.numeric[s], d.sequence[s], d.label[s], group=group)
