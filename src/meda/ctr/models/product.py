"""PNN with inner products, IPNN (Qu et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import FeatureMap
from meda.ctr.models.base import MLP, Batch, CTRModel


class PNN(CTRModel):
    """IPNN: the product layer concatenates the field embeddings (linear signal, ``F*D``) with
    the inner product of every field pair (``F(F-1)/2``), followed by an MLP."""

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        hidden_units: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        batch_norm: bool = False,
        embedding_init: EmbeddingInit = EmbeddingInit(),
    ) -> None:
        super().__init__(feature_map, embedding_dim, embedding_init)
        self.embedding = self.embed()
        n = feature_map.num_fields
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.mlp = MLP(n * embedding_dim + rows.numel(), hidden_units, dropout, batch_norm, output_dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embedding(batch)  # [B, F, D]
        products = (emb[:, self.pair_rows] * emb[:, self.pair_cols]).sum(dim=-1)  # [B, F(F-1)/2]
        return self.mlp(torch.cat([emb.flatten(start_dim=1), products], dim=1)).squeeze(-1)
