"""Cross networks: DCN (Wang et al. 2017) and DCNv2 (Wang et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import FeatureMap
from meda.ctr.models.base import MLP, Batch, CTRModel


class CrossLayerV1(nn.Module):
    """DCN cross layer: ``x_{l+1} = x_0 * (x_l . w) + b + x_l`` on ``[B, d]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(dim, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + self.b + x


class CrossLayerV2(nn.Module):
    """DCNv2 cross layer: ``x_{l+1} = x_0 * (W x_l + b) + x_l``; ``W = U V^T`` when ``low_rank`` is set."""

    def __init__(self, dim: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.proj: nn.Module = nn.Linear(dim, dim)
        else:
            self.proj = nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class CrossNetwork(nn.Module):
    """A stack of cross layers applied to ``x_0`` ``[B, d]`` -> ``[B, d]``."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class DCN(CTRModel):
    """Deep & Cross Network: cross network and MLP in parallel on the concatenated embeddings,
    their outputs concatenated into one logit."""

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        hidden_units: Sequence[int] = (256, 128),
        cross_layers: int = 3,
        dropout: float = 0.0,
        batch_norm: bool = False,
        embedding_init: EmbeddingInit = EmbeddingInit(),
    ) -> None:
        super().__init__(feature_map, embedding_dim, embedding_init)
        self.embedding = self.embed()
        dim = feature_map.num_fields * embedding_dim
        self.cross = CrossNetwork([CrossLayerV1(dim) for _ in range(cross_layers)])
        self.mlp = MLP(dim, hidden_units, dropout, batch_norm)
        self.head = nn.Linear(dim + self.mlp.out_dim, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = self.embedding(batch).flatten(start_dim=1)
        return self.head(torch.cat([self.cross(x0), self.mlp(x0)], dim=1)).squeeze(-1)


class DCNv2(CTRModel):
    """DCN-V2: full-matrix (or low-rank) cross layers with an MLP.

    ``structure``: ``"parallel"`` (cross and MLP side by side, concatenated),
    ``"stacked"`` (MLP on top of the cross network) or ``"crossnet_only"``.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        hidden_units: Sequence[int] = (256, 128),
        cross_layers: int = 3,
        low_rank: int | None = None,
        structure: Literal["parallel", "stacked", "crossnet_only"] = "parallel",
        dropout: float = 0.0,
        batch_norm: bool = False,
        embedding_init: EmbeddingInit = EmbeddingInit(),
    ) -> None:
        super().__init__(feature_map, embedding_dim, embedding_init)
        if structure not in ("parallel", "stacked", "crossnet_only"):
            raise ValueError(f"unknown DCNv2 structure {structure!r}; use parallel, stacked or crossnet_only")
        self.structure = structure
        self.embedding = self.embed()
        dim = feature_map.num_fields * embedding_dim
        self.cross = CrossNetwork([CrossLayerV2(dim, low_rank) for _ in range(cross_layers)])
        self.mlp = MLP(dim, hidden_units if structure != "crossnet_only" else (), dropout, batch_norm)
        head_in = {"parallel": dim + self.mlp.out_dim, "stacked": self.mlp.out_dim, "crossnet_only": dim}
        self.head = nn.Linear(head_in[structure], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = self.embedding(batch).flatten(start_dim=1)
        if self.structure == "parallel":
            h = torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        elif self.structure == "stacked":
            h = self.mlp(self.cross(x0))
        else:
            h = self.cross(x0)
        return self.head(h).squeeze(-1)
