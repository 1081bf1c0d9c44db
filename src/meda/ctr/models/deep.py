"""MLP-based models: DNN, Wide&Deep (Cheng et al. 2016), DeepFM (Guo et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import FeatureMap
from meda.ctr.models.base import MLP, Batch, CTRModel, LinearTerm, fm_interaction


class DNN(CTRModel):
    """Embedding -> concatenation ``[B, F*D]`` -> MLP -> logit."""

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
        in_dim = feature_map.num_fields * embedding_dim
        self.mlp = MLP(in_dim, hidden_units, dropout, batch_norm, output_dim=1)

    def deep_logit(self, batch: Batch) -> torch.Tensor:
        """MLP logit ``[B]`` over the concatenated embeddings."""
        return self.mlp(self.embedding(batch).flatten(start_dim=1)).squeeze(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.deep_logit(batch)


class WideDeep(DNN):
    """Wide&Deep: a linear (wide) model over the raw ids plus a DNN; the logits add up."""

    def __init__(self, feature_map: FeatureMap, **options: Any) -> None:
        """Options as :class:`DNN`."""
        super().__init__(feature_map, **options)
        self.wide = LinearTerm(self)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.wide(batch) + self.deep_logit(batch)


class DeepFM(DNN):
    """DeepFM: FM (first order + pairwise) and a DNN sharing one embedding; the logits add up."""

    def __init__(self, feature_map: FeatureMap, **options: Any) -> None:
        """Options as :class:`DNN`."""
        super().__init__(feature_map, **options)
        self.linear = LinearTerm(self)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embedding(batch)
        deep = self.mlp(emb.flatten(start_dim=1)).squeeze(-1)
        return self.linear(batch) + fm_interaction(emb) + deep
