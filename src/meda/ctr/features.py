"""The contract between CTR data and CTR models: a feature map and encoded arrays.

Data code (readers, vocabularies, the synthetic generator) produces an
:class:`EncodedData`; model and training code reads only :class:`FeatureMap`
and the arrays below, never the raw files. Index 0 of every categorical or
sequence vocabulary is padding, index 1 is the out-of-vocabulary bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FieldKind = Literal["categorical", "numeric", "sequence"]

PAD_INDEX = 0
OOV_INDEX = 1


@dataclass(frozen=True)
class Field:
    """One input field after encoding.

    Attributes:
        name: column name in the source data.
        kind: "categorical" (one id per row), "numeric" (one float per row, fed as a
            dense value) or "sequence" (a padded list of ids per row).
        vocab_size: number of embedding rows for categorical/sequence fields,
            padding and OOV included; 0 for numeric fields.
        max_len: padded length of a sequence field; 0 otherwise.
    """

    name: str
    kind: FieldKind
    vocab_size: int = 0
    max_len: int = 0


@dataclass
class FeatureMap:
    """Every field a model sees, in a fixed order per kind."""

    fields: list[Field]
    label: str = "label"

    @property
    def categorical(self) -> list[Field]:
        return [f for f in self.fields if f.kind == "categorical"]

    @property
    def numeric(self) -> list[Field]:
        return [f for f in self.fields if f.kind == "numeric"]

    @property
    def sequence(self) -> list[Field]:
        return [f for f in self.fields if f.kind == "sequence"]

    @property
    def num_fields(self) -> int:
        """Number of fields a model embeds (every kind gets one embedding vector per row)."""
        return len(self.fields)


@dataclass
class EncodedData:
    """One split of encoded rows, as plain arrays (in memory or memory-mapped).

    Attributes:
        categorical: int64 ``[rows, n_categorical]``, ids in ``[0, vocab_size)``.
        numeric: float32 ``[rows, n_numeric]``.
        sequence: int64 ``[rows, n_sequence, max_len]``, 0 = padding.
        label: float32 ``[rows]`` in {0, 1}.
        day: int64 ``[rows]`` chunk/day index for continual training, or None.
        group: int64 ``[rows]`` user (or other) id for group AUC, or None.
        skipped_rows: rows the reader could not use, by reason; reported, never hidden.
    """

    categorical: np.ndarray
    numeric: np.ndarray
    sequence: np.ndarray
    label: np.ndarray
    day: np.ndarray | None = None
    group: np.ndarray | None = None
    skipped_rows: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])
