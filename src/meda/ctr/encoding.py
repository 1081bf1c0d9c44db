"""Fit encoders on the training split and turn checked Arrow tables into :class:`EncodedData`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meda.ctr.features import PAD_INDEX, EncodedData, FeatureMap, Field
from meda.ctr.schema import FieldSpec, Schema
from meda.ctr.transforms import NumericTransform, fit_numeric
from meda.ctr.vocab import Encoder, HashedVocabulary, Vocabulary


@dataclass(frozen=True)
class EncodingOptions:
    """How raw fields become model inputs.

    Attributes:
        min_count: tokens seen fewer times in train map to OOV (BARS uses 1 for Criteo_x1).
        numeric: numeric transform, one of :data:`meda.ctr.transforms.NUMERIC_TRANSFORMS`.
        n_buckets: bucket count of the ``bucket`` transform.
        hash_buckets: hash every categorical/sequence field with more distinct train tokens than
            this into this many buckets (None: never; a field's own ``hash_buckets`` wins).
    """

    min_count: int = 1
    numeric: str = "log"
    n_buckets: int = 32
    hash_buckets: int | None = None


@dataclass
class FittedEncoders:
    """Encoders fitted on the training split, one per feature field (by name)."""

    tokens: dict[str, Encoder]
    numeric: dict[str, NumericTransform]

    def feature_map(self, schema: Schema) -> FeatureMap:
        """Fields in schema order; a bucketised numeric field becomes categorical."""
        fields = []
        for spec in schema.fields:
            if spec.kind == "numeric":
                t = self.numeric[spec.name]
                fields.append(Field(spec.name, "categorical" if t.categorical else "numeric", t.size))
            elif spec.kind == "sequence":
                fields.append(Field(spec.name, "sequence", self.tokens[spec.name].size, spec.max_len))
            else:
                fields.append(Field(spec.name, "categorical", self.tokens[spec.name].size))
        return FeatureMap(fields, label=schema.label)

    def state(self) -> dict[str, Any]:
        """A JSON-able summary (vocabulary sizes, transform parameters) for reports."""
        return {
            **{k: v.to_state() for k, v in self.tokens.items()},
            **{k: v.to_state() for k, v in self.numeric.items()},
        }


def fit_encoders(train: pa.Table, schema: Schema, options: EncodingOptions) -> FittedEncoders:
    """Fit every field's encoder on the training rows ``train`` only."""
    counts = {s.name: token_counts(train, s) for s in schema.fields if s.kind != "numeric" and s.hash_buckets is None}
    numeric = {s.name: _floats(train[s.name]) for s in schema.fields if s.kind == "numeric"}
    return build_encoders(counts, numeric, schema, options)


def token_counts(table: pa.Table, spec: FieldSpec) -> pa.Table:
    """Distinct tokens of a categorical/sequence column and their counts: columns ``v`` (string), ``n`` (int64)."""
    column = table[spec.name] if spec.kind == "categorical" else _sequence_tokens(table[spec.name], spec)[0]
    counts = pc.value_counts(column)
    return pa.table({"v": counts.field("values"), "n": counts.field("counts")})


def merge_counts(a: pa.Table, b: pa.Table) -> pa.Table:
    """Token counts of two parts added (same columns as :func:`token_counts`)."""
    return pa.concat_tables([a, b]).group_by("v").aggregate([("n", "sum")]).rename_columns(["v", "n"])


def build_encoders(
    counts: dict[str, pa.Table], numeric: dict[str, np.ndarray], schema: Schema, options: EncodingOptions
) -> FittedEncoders:
    """Encoders from train statistics: token counts of every field without ``hash_buckets``
    (:func:`token_counts`) and train values ``[rows]`` (or a uniform sample of them) of every numeric field."""
    tokens: dict[str, Encoder] = {}
    numeric_out: dict[str, NumericTransform] = {}
    for spec in schema.fields:
        if spec.kind == "numeric":
            numeric_out[spec.name] = fit_numeric(options.numeric, numeric[spec.name], n_buckets=options.n_buckets)
        else:
            tokens[spec.name] = _fit_tokens(counts.get(spec.name), spec, options)
    return FittedEncoders(tokens, numeric_out)


def encode_table(
    table: pa.Table, schema: Schema, encoders: FittedEncoders, feature_map: FeatureMap, day_origin: int = 0
) -> EncodedData:
    """Encode checked rows ``table`` with fitted ``encoders`` into arrays ordered as ``feature_map``."""
    n = table.num_rows
    specs = {s.name: s for s in schema.fields}
    cat_cols = [_encode_categorical(table, specs[f.name], encoders) for f in feature_map.categorical]
    num_cols = [encoders.numeric[f.name].apply(_floats(table[f.name])) for f in feature_map.numeric]
    seq_cols = [_encode_sequence(table[f.name], specs[f.name], encoders.tokens[f.name]) for f in feature_map.sequence]
    max_len = max((f.max_len for f in feature_map.sequence), default=0)
    sequence = np.zeros((n, len(seq_cols), max_len), dtype=np.int64)
    for j, s in enumerate(seq_cols):
        sequence[:, j, : s.shape[1]] = s
    return EncodedData(
        categorical=_stack(cat_cols, n, np.int64),
        numeric=_stack(num_cols, n, np.float32),
        sequence=sequence,
        label=table[schema.label].to_numpy().astype(np.float32),
        day=table[schema.day].to_numpy().astype(np.int64) - day_origin if schema.day else None,
        group=None,
    )


def _encode_categorical(table: pa.Table, spec: FieldSpec, encoders: FittedEncoders) -> np.ndarray:
    """One categorical column (a token field, or a bucketised numeric field) -> int64 ``[rows]``."""
    if spec.kind == "numeric":
        return encoders.numeric[spec.name].apply(_floats(table[spec.name]))
    return encoders.tokens[spec.name].encode(table[spec.name])


def _fit_tokens(counts: pa.Table | None, spec: FieldSpec, options: EncodingOptions) -> Encoder:
    if spec.hash_buckets is not None:
        return HashedVocabulary(spec.hash_buckets)
    if counts is None:
        raise KeyError(f"no train token counts for field {spec.name!r}")
    min_count = spec.min_count if spec.min_count is not None else options.min_count
    vocab = Vocabulary.from_counts(counts["v"].combine_chunks(), counts["n"].combine_chunks(), min_count)
    if options.hash_buckets is not None and len(vocab.tokens) > options.hash_buckets:
        return HashedVocabulary(options.hash_buckets)
    return vocab


def _sequence_tokens(column: pa.ChunkedArray, spec: FieldSpec) -> tuple[pa.Array, np.ndarray]:
    """Split a sequence column: (non-empty tokens flattened, row index of each token ``[tokens]``)."""
    lists = pc.split_pattern(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, spec.separator)
    flat = pc.list_flatten(lists)
    rows = pc.list_parent_indices(lists).to_numpy()
    nonempty = pc.not_equal(flat, "")
    return flat.filter(nonempty), rows[nonempty.to_numpy(zero_copy_only=False)]


def _encode_sequence(column: pa.ChunkedArray, spec: FieldSpec, encoder: Encoder) -> np.ndarray:
    """A sequence column -> int64 ``[rows, max_len]``, first ``max_len`` tokens, 0-padded."""
    tokens, rows = _sequence_tokens(column, spec)
    out = np.full((len(column), spec.max_len), PAD_INDEX, dtype=np.int64)
    if len(tokens) == 0:
        return out
    pos = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = pos < spec.max_len
    out[rows[keep], pos[keep]] = encoder.encode(tokens)[keep]
    return out


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Numeric column -> float64 ``[rows]`` with NaN for missing."""
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _stack(cols: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    if not cols:
        return np.zeros((n, 0), dtype=dtype)
    return np.stack(cols, axis=1).astype(dtype, copy=False)
