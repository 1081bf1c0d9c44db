"""The shared embedding layer every CTR model reads.

One :class:`FeatureEmbedding` turns a batch into one vector per field:

- categorical field: a row of its table ``[vocab_size, dim]``;
- numeric field: a learned vector ``[dim]`` scaled by the row's value;
- sequence field: the mean of its ids' rows (padding id 0 excluded).

Every field's table is a block of rows of one concatenated parameter, looked up once per batch;
with ``sparse=True`` its gradient is sparse (only the rows a batch touched), for a sparse-capable
optimiser (see :func:`meda.ctr.optim.build_optimizer`).

MEDA re-initialises these tables every epoch, so the layer knows its init
distribution and can redraw any subset of its fields from a given generator
(:meth:`FeatureEmbedding.reinitialise`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from meda.ctr.features import PAD_INDEX, FeatureMap

InitKind = Literal["normal", "uniform"]


@dataclass(frozen=True)
class EmbeddingInit:
    """Init distribution of embedding tables.

    ``normal``: N(0, std^2) (FuxiCTR's default, std 1e-4); ``uniform``: U(-std, std).
    """

    kind: InitKind = "normal"
    std: float = 1e-4

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "uniform"):
            raise ValueError(f"unknown embedding init {self.kind!r}; use 'normal' or 'uniform'")
        if not self.std > 0:
            raise ValueError(f"embedding init std must be > 0, got {self.std}")

    def fill_(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Overwrite ``tensor`` in place with a fresh draw.

        The draw happens on the generator's device (CPU generators are seeded the same way
        whatever device trains), then is copied into ``tensor``: the same seed gives the same
        tables on CPU and GPU.
        """
        with torch.no_grad():
            target = tensor
            if generator is not None and generator.device != tensor.device:
                target = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
            if self.kind == "normal":
                target.normal_(0.0, self.std, generator=generator)
            else:
                target.uniform_(-self.std, self.std, generator=generator)
            if target is not tensor:
                tensor.copy_(target)


@dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of an embedding parameter ``[rows, dim]``: one field's table inside the
    concatenated table (what :meth:`FeatureEmbedding.reinitialise` redrew, for the optimiser reset)."""

    param: nn.Parameter
    start: int
    stop: int


class FeatureEmbedding(nn.Module):
    """Every field of a :class:`FeatureMap` embedded by one lookup.

    The tables of all categorical and sequence fields are stacked into one parameter
    ``table`` ``[sum of vocab sizes, dim]`` (field ``f`` owns rows ``spans[f]``), and each
    field's ids are shifted by its first row, so a batch is one ``F.embedding`` call and one
    backward, whatever the number of fields. Numeric fields share one parameter ``numeric``
    ``[n_numeric * dim]`` (elements ``[i*dim, (i+1)*dim)``: the vector of numeric field ``i``).
    The initial draw and :meth:`reinitialise` fill exactly a field's rows, table by table, in the
    order of the former per-field tables, so the same seed gives the same tables as one table per
    field (a meda run on CPU, Adam or Adagrad, gave bit-identical metrics before and after the change).

    Args:
        feature_map: the fields to embed.
        dim: embedding size ``D`` (1 gives the first-order weights of LR/FM/Wide).
        init: init distribution (also used by :meth:`reinitialise`).
        generator: optional generator for the initial draw.
        sparse: give ``table`` a sparse gradient (``F.embedding(..., sparse=True)``); the numeric
            vectors stay dense. Settable later through the attribute ``sparse``.

    Output of :meth:`forward`: ``[batch, num_fields, dim]``, fields ordered
    categorical, then numeric, then sequence (each in feature-map order).
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        dim: int,
        init: EmbeddingInit | None = None,
        generator: torch.Generator | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.sparse = sparse
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.dim = dim
        self.init = init or EmbeddingInit()
        self.vocab_sizes = {f.name: f.vocab_size for f in feature_map.fields if f.kind != "numeric"}
        self.field_order = {kind: [f.name for f in feature_map.fields if f.kind == kind]
                            for kind in ("categorical", "numeric", "sequence")}  # fmt: skip
        self.num_fields = len(feature_map.fields)
        ids = [*self.field_order["categorical"], *self.field_order["sequence"]]
        starts = [0, *accumulate(self.vocab_sizes[n] for n in ids)]
        self.spans = {n: (starts[i], starts[i + 1]) for i, n in enumerate(ids)}  # rows of each field in `table`
        offsets = {kind: torch.tensor([self.spans[n][0] for n in self.field_order[kind]], dtype=torch.int64)
                   for kind in ("categorical", "sequence")}  # fmt: skip
        self.register_buffer("categorical_offsets", offsets["categorical"], persistent=False)
        self.register_buffer("sequence_offsets", offsets["sequence"], persistent=False)
        self.table = nn.Parameter(torch.empty(starts[-1], dim)) if ids else None
        # flat [n_numeric * dim]: dense weights, not a table (AdamAR's row decay acts on 2-D tables only)
        n_num = len(self.field_order["numeric"])
        self.numeric = nn.Parameter(torch.empty(n_num * dim)) if n_num else None
        # the draw order of the former per-field tables (sorted names per kind): same seed, same tables
        for kind in ("categorical", "numeric", "sequence"):
            for name in sorted(self.field_order[kind]):
                self.init.fill_(self.field_rows(name), generator)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed a batch.

        Args:
            batch: ``categorical`` int64 ``[B, n_cat]``, ``numeric`` float32 ``[B, n_num]``,
                ``sequence`` int64 ``[B, n_seq, L]`` (keys may be absent when a kind has no fields).

        Returns:
            ``[B, num_fields, dim]``.
        """
        n_cat, n_seq = len(self.field_order["categorical"]), len(self.field_order["sequence"])
        ids: list[torch.Tensor] = []
        if n_cat:
            ids.append(batch["categorical"] + self.categorical_offsets)  # [B, n_cat] rows of `table`
        if n_seq:
            seq = batch["sequence"]  # [B, n_seq, L]
            ids.append((seq + self.sequence_offsets.unsqueeze(1)).flatten(start_dim=1))
        rows = None
        if ids:  # one lookup of every field's rows: [B, n_cat + n_seq * L, D]
            rows = F.embedding(torch.cat(ids, dim=1) if len(ids) > 1 else ids[0], self.table, sparse=self.sparse)
        parts: list[torch.Tensor] = []
        if n_cat:
            parts.append(rows[:, :n_cat])  # [B, n_cat, D]
        if self.numeric is not None:
            parts.append(batch["numeric"].unsqueeze(-1) * self.numeric.view(-1, self.dim))  # [B, n_num, D]
        if n_seq:
            looked = rows[:, n_cat:].unflatten(1, (n_seq, seq.shape[2]))  # [B, n_seq, L, D]
            mask = (seq != PAD_INDEX).unsqueeze(-1).to(looked.dtype)  # [B, n_seq, L, 1]
            parts.append((looked * mask).sum(dim=2) / mask.sum(dim=2).clamp(min=1.0))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def field_rows(self, name: str) -> torch.Tensor:
        """The rows of field ``name``: its table ``[vocab_size, dim]`` (a view into ``table``), or for a
        numeric field its vector ``[dim]`` (a view into ``numeric``)."""
        if name in self.spans:
            start, stop = self.spans[name]
            return self.table[start:stop]
        if name in self.field_order["numeric"]:
            i = self.field_order["numeric"].index(name)
            return self.numeric[i * self.dim : (i + 1) * self.dim]
        raise KeyError(f"no field {name!r}; fields: {sorted([*self.spans, *self.field_order['numeric']])}")

    def table_names(self, min_cardinality: int = 0) -> list[str]:
        """Names of categorical/sequence fields whose vocabulary is larger than ``min_cardinality``."""
        return [name for name, size in self.vocab_sizes.items() if size > min_cardinality]

    def reinitialise(self, fields: Iterable[str] | None = None, generator: torch.Generator | None = None) -> list[Rows]:
        """Redraw embedding tables from the init distribution (MEDA's per-epoch reset).

        Args:
            fields: categorical/sequence field names to redraw, drawn in this order; None = every
                table (numeric vectors are never redrawn: they act as dense weights).
            generator: source of the fresh draw (seed it per epoch).

        Returns:
            the rows that were redrawn, one :class:`Rows` per field (so their optimiser state can be reset).
        """
        names = list(self.vocab_sizes) if fields is None else list(fields)
        unknown = [n for n in names if n not in self.spans]
        if unknown:
            raise KeyError(f"no embedding table for field(s) {unknown}; tables: {sorted(self.spans)}")
        for name in names:
            self.init.fill_(self.field_rows(name), generator)
        return [Rows(self.table, *self.spans[n]) for n in names]
