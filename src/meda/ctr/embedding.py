"""The shared embedding layer every CTR model reads.

One :class:`FeatureEmbedding` turns a batch into one vector per field:

- categorical field: a row of its own table ``[vocab_size, dim]``;
- numeric field: a learned vector ``[dim]`` scaled by the row's value;
- sequence field: the mean of its ids' rows (padding id 0 excluded).

MEDA re-initialises these tables every epoch, so the layer knows its init
distribution and can redraw any subset of its fields from a given generator
(:meth:`FeatureEmbedding.reinitialise`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


class FeatureEmbedding(nn.Module):
    """Per-field embeddings for every field of a :class:`FeatureMap`.

    Args:
        feature_map: the fields to embed.
        dim: embedding size ``D`` (1 gives the first-order weights of LR/FM/Wide).
        init: init distribution (also used by :meth:`reinitialise`).
        generator: optional generator for the initial draw.

    Output of :meth:`forward`: ``[batch, num_fields, dim]``, fields ordered
    categorical, then numeric, then sequence (each in feature-map order).
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        dim: int,
        init: EmbeddingInit | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.dim = dim
        self.init = init or EmbeddingInit()
        self.vocab_sizes = {f.name: f.vocab_size for f in feature_map.fields if f.kind != "numeric"}
        # ParameterDict sorts its keys: the field order of the output is kept here
        self.field_order = {kind: [f.name for f in feature_map.fields if f.kind == kind]
                            for kind in ("categorical", "numeric", "sequence")}  # fmt: skip
        self.categorical = _tables({f.name: (f.vocab_size, dim) for f in feature_map.categorical})
        self.numeric = _tables({f.name: (dim,) for f in feature_map.numeric})
        self.sequence = _tables({f.name: (f.vocab_size, dim) for f in feature_map.sequence})
        self.num_fields = len(self.categorical) + len(self.numeric) + len(self.sequence)
        for p in self.parameters():
            self.init.fill_(p, generator)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed a batch.

        Args:
            batch: ``categorical`` int64 ``[B, n_cat]``, ``numeric`` float32 ``[B, n_num]``,
                ``sequence`` int64 ``[B, n_seq, L]`` (keys may be absent when a kind has no fields).

        Returns:
            ``[B, num_fields, dim]``.
        """
        parts: list[torch.Tensor] = []
        if self.categorical:
            ids = batch["categorical"]
            names = self.field_order["categorical"]
            parts += [F.embedding(ids[:, i], self.categorical[n]) for i, n in enumerate(names)]
        if self.numeric:
            values = batch["numeric"]
            names = self.field_order["numeric"]
            parts += [values[:, i : i + 1] * self.numeric[n] for i, n in enumerate(names)]
        if self.sequence:
            seq = batch["sequence"]
            for i, name in enumerate(self.field_order["sequence"]):
                table, ids = self.sequence[name], seq[:, i, :]
                mask = (ids != PAD_INDEX).unsqueeze(-1).to(table.dtype)  # [B, L, 1]
                summed = (F.embedding(ids, table) * mask).sum(dim=1)
                parts.append(summed / mask.sum(dim=1).clamp(min=1.0))
        return torch.stack(parts, dim=1)

    def table_names(self, min_cardinality: int = 0) -> list[str]:
        """Names of categorical/sequence fields whose vocabulary is larger than ``min_cardinality``."""
        return [name for name, size in self.vocab_sizes.items() if size > min_cardinality]

    def reinitialise(
        self, fields: Iterable[str] | None = None, generator: torch.Generator | None = None
    ) -> list[nn.Parameter]:
        """Redraw embedding tables from the init distribution (MEDA's per-epoch reset).

        Args:
            fields: categorical/sequence field names to redraw; None = every table
                (numeric vectors are never redrawn: they act as dense weights).
            generator: source of the fresh draw (seed it per epoch).

        Returns:
            the parameters that were redrawn (so their optimiser state can be reset).
        """
        names = list(self.vocab_sizes) if fields is None else list(fields)
        tables = {**self.categorical, **self.sequence}
        unknown = [n for n in names if n not in tables]
        if unknown:
            raise KeyError(f"no embedding table for field(s) {unknown}; tables: {sorted(tables)}")
        redrawn = [tables[n] for n in names]
        for p in redrawn:
            self.init.fill_(p, generator)
        return redrawn


def _tables(shapes: dict[str, tuple[int, ...]]) -> nn.ParameterDict:
    return nn.ParameterDict({name: nn.Parameter(torch.empty(shape)) for name, shape in shapes.items()})
