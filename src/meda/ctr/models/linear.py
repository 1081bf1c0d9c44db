"""Logistic regression and the factorisation machine (Rendle 2010)."""

from __future__ import annotations

import torch

from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import FeatureMap
from meda.ctr.models.base import Batch, CTRModel, LinearTerm, fm_interaction


class LR(CTRModel):
    """Logistic regression: ``logit = b + sum_f w(x_f)`` (one weight per id)."""

    def __init__(self, feature_map: FeatureMap, embedding_init: EmbeddingInit = EmbeddingInit()) -> None:
        super().__init__(feature_map, embedding_dim=1, embedding_init=embedding_init)
        self.linear = LinearTerm(self)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.linear(batch)


class FM(CTRModel):
    """Factorisation machine: ``logit = b + sum_f w(x_f) + sum_{i<j} <v_i, v_j>``."""

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        embedding_init: EmbeddingInit = EmbeddingInit(),
    ) -> None:
        super().__init__(feature_map, embedding_dim, embedding_init)
        self.linear = LinearTerm(self)
        self.embedding = self.embed()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.linear(batch) + fm_interaction(self.embedding(batch))
