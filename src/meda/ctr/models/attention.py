"""AutoInt (Song et al. 2019): multi-head self-attention over field embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import FeatureMap
from meda.ctr.models.base import MLP, Batch, CTRModel


class InteractingLayer(nn.Module):
    """One AutoInt interacting layer: multi-head self-attention across fields with a
    projected residual and ReLU. ``[B, F, d_in]`` -> ``[B, F, heads * head_dim]``."""

    def __init__(self, in_dim: int, head_dim: int, num_heads: int, residual: bool = True) -> None:
        super().__init__()
        out_dim = head_dim * num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(in_dim, 3 * out_dim, bias=False)
        self.residual = nn.Linear(in_dim, out_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, _ = x.shape
        q, k, v = self.qkv(x).view(b, f, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)  # [B, H, F, F]
        out = (attn @ v).transpose(1, 2).reshape(b, f, -1)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


class AutoInt(CTRModel):
    """AutoInt: stacked interacting layers, flattened into a logit; with ``hidden_units`` an MLP
    on the embeddings is added in parallel (AutoInt+)."""

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        attention_layers: int = 3,
        num_heads: int = 2,
        head_dim: int = 16,
        residual: bool = True,
        hidden_units: Sequence[int] = (),
        dropout: float = 0.0,
        batch_norm: bool = False,
        embedding_init: EmbeddingInit = EmbeddingInit(),
    ) -> None:
        super().__init__(feature_map, embedding_dim, embedding_init)
        self.embedding = self.embed()
        dims = [embedding_dim] + [num_heads * head_dim] * attention_layers
        self.interacting = nn.Sequential(
            *(InteractingLayer(dims[i], head_dim, num_heads, residual) for i in range(attention_layers))
        )
        self.attention_head = nn.Linear(feature_map.num_fields * dims[-1], 1)
        n_in = feature_map.num_fields * embedding_dim
        self.mlp = MLP(n_in, hidden_units, dropout, batch_norm, output_dim=1) if hidden_units else None

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embedding(batch)
        logit = self.attention_head(self.interacting(emb).flatten(start_dim=1)).squeeze(-1)
        if self.mlp is not None:
            logit = logit + self.mlp(emb.flatten(start_dim=1)).squeeze(-1)
        return logit
