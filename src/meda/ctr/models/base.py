"""Building blocks every CTR model shares: the model base class and the MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from meda.ctr.embedding import EmbeddingInit, FeatureEmbedding
from meda.ctr.features import FeatureMap

Batch = dict[str, torch.Tensor]


class MLP(nn.Sequential):
    """``Linear -> [BatchNorm] -> ReLU -> [Dropout]`` per hidden layer, then an optional output layer.

    Input ``[B, in_dim]``; output ``[B, hidden_units[-1]]`` or ``[B, output_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        dropout: float = 0.0,
        batch_norm: bool = False,
        output_dim: int | None = None,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for units in hidden_units:
            layers.append(nn.Linear(width, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.out_dim = width


class CTRModel(nn.Module):
    """Base class: a model maps a batch to click logits ``[B]``.

    Subclasses create their :class:`FeatureEmbedding` layers (MEDA finds them
    with :meth:`embedding_layers`) and implement :meth:`forward`.
    """

    def __init__(self, feature_map: FeatureMap, embedding_dim: int, embedding_init: EmbeddingInit) -> None:
        super().__init__()
        if feature_map.num_fields == 0:
            raise ValueError("the feature map has no fields; a CTR model needs at least one input field")
        self.feature_map = feature_map
        self.embedding_dim = embedding_dim
        self.embedding_init = embedding_init

    def embed(self, dim: int | None = None) -> FeatureEmbedding:
        """A new embedding layer over this model's fields (``dim`` defaults to ``embedding_dim``)."""
        return FeatureEmbedding(self.feature_map, dim or self.embedding_dim, self.embedding_init)

    def embedding_layers(self) -> dict[str, FeatureEmbedding]:
        """Every embedding layer, by qualified module name (e.g. ``"embedding"``, ``"wide.weights"``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, FeatureEmbedding)}

    def network_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the embedding layers (MLP, interaction layers, biases)."""
        emb = {id(p) for layer in self.embedding_layers().values() for p in layer.parameters()}
        return [p for p in self.parameters() if id(p) not in emb]

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LinearTerm(nn.Module):
    """First-order term ``b + sum_f w_f(x_f)``: one weight per id (or per numeric field). Output ``[B]``."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.weights = model.embed(dim=1)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.weights(batch).sum(dim=(1, 2)) + self.bias


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Factorisation-machine pairwise term ``sum_{i<j} <v_i, v_j>`` of ``[B, F, D]`` -> ``[B]``."""
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)
