"""Token -> index encoders for categorical and sequence fields.

Index 0 is padding, index 1 the out-of-vocabulary (OOV) bucket; real tokens start
at 2 (see :mod:`meda.ctr.features`). A :class:`Vocabulary` is fitted on the
training split only: tokens seen fewer than ``min_count`` times there, and every
token first seen in valid/test, map to OOV. A :class:`HashedVocabulary` needs no
fitting: a stable 64-bit FNV-1a hash of the token's UTF-8 bytes picks one of
``buckets`` rows (for huge fields; collisions instead of OOV).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meda.ctr.features import OOV_INDEX

FIRST_TOKEN_INDEX = 2
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


class Encoder(Protocol):
    """Maps a string column to int64 indices ``[rows]`` in ``[0, size)``."""

    @property
    def size(self) -> int: ...

    def encode(self, tokens: pa.Array | pa.ChunkedArray) -> np.ndarray: ...

    def to_state(self) -> dict[str, Any]: ...


@dataclass
class Vocabulary:
    """Tokens kept from the training split; ``tokens[i]`` has index ``i + 2``.

    Attributes:
        tokens: kept tokens, most frequent first (ties by token), as a string array.
    """

    tokens: pa.Array

    @classmethod
    def fit(cls, tokens: pa.Array | pa.ChunkedArray, min_count: int = 1) -> Vocabulary:
        """Keep tokens seen at least ``min_count`` times in ``tokens`` (the training split)."""
        counts = pc.value_counts(tokens)
        return cls.from_counts(counts.field("values"), counts.field("counts"), min_count)

    @classmethod
    def from_counts(cls, values: pa.Array, freq: pa.Array, min_count: int = 1) -> Vocabulary:
        """Keep distinct tokens ``values`` whose train counts ``freq`` reach ``min_count`` (order-free:
        counts merged over shards give the vocabulary of the concatenated shards)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        kept = pc.greater_equal(freq, min_count)
        values, freq = values.filter(kept), freq.filter(kept)
        order = pc.sort_indices(pa.table({"n": freq, "v": values}), [("n", "descending"), ("v", "ascending")])
        return cls(values.take(order))

    @property
    def size(self) -> int:
        """Embedding rows: padding + OOV + kept tokens."""
        return len(self.tokens) + FIRST_TOKEN_INDEX

    def encode(self, tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Token column -> int64 ``[rows]``; unknown tokens -> OOV (1)."""
        pos = pc.index_in(tokens, value_set=self.tokens)
        return pc.fill_null(pc.add(pos, FIRST_TOKEN_INDEX), OOV_INDEX).to_numpy().astype(np.int64, copy=False)

    def to_state(self) -> dict[str, Any]:
        return {"type": "vocabulary", "size": self.size}


@dataclass(frozen=True)
class HashedVocabulary:
    """Tokens hashed into ``buckets`` rows (indices ``2 .. buckets + 1``)."""

    buckets: int

    @property
    def size(self) -> int:
        return self.buckets + FIRST_TOKEN_INDEX

    def encode(self, tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Token column -> int64 ``[rows]`` in ``[2, buckets + 2)``."""
        return (stable_hash(tokens) % np.uint64(self.buckets)).astype(np.int64) + FIRST_TOKEN_INDEX

    def to_state(self) -> dict[str, Any]:
        return {"type": "hashed", "size": self.size, "buckets": self.buckets}


def stable_hash(tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit FNV-1a of each token's UTF-8 bytes, uint64 ``[rows]``; the same on every machine.

    Vectorised: distinct tokens are hashed once, one byte position at a time.
    """
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    encoded = pc.dictionary_encode(pc.cast(tokens, pa.large_string()))
    words = encoded.dictionary
    offsets = np.frombuffer(words.buffers()[1], dtype=np.int64)[words.offset : words.offset + len(words) + 1]
    data_buf = words.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(words), _FNV_OFFSET, dtype=np.uint64)
    for pos in range(int(lengths.max(initial=0))):
        active = lengths > pos
        h[active] = (h[active] ^ data[starts[active] + pos].astype(np.uint64)) * _FNV_PRIME
    return h[encoded.indices.to_numpy(zero_copy_only=False)]
