"""Embedding groups for meda-continual: k independently initialised embedding layers
sharing one network, and serving from them (last, best, or ensemble of logits).

A model owns one set of :class:`~meda.ctr.embedding.FeatureEmbedding` layers at a time;
:meth:`EmbeddingGroups.activate` swaps group ``g``'s layers into the model. With k = 1
(every non-continual mode) the single group is simply the model's own layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from meda.ctr.embedding import FeatureEmbedding
from meda.ctr.models import CTRModel

SERVING = ("last", "best", "ensemble")


class EmbeddingGroups(nn.Module):
    """k sets of the model's embedding layers; group 0 starts as the model's own.

    Args:
        model: the model whose embedding layers are grouped.
        k: number of groups.
        seed: groups 1..k-1 are redrawn from the init distribution with seeds derived from it.
    """

    def __init__(self, model: CTRModel, k: int, seed: int = 0) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"the number of embedding groups must be >= 1, got {k}")
        self.model_ref = [model]  # a list, so the model is not registered as a submodule
        self.names = list(model.embedding_layers())
        first = nn.ModuleDict({_key(n): layer for n, layer in model.embedding_layers().items()})
        groups = [first]
        for g in range(1, k):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + g)
            group = copy.deepcopy(first)
            for layer in group.values():
                layer.reinitialise(generator=gen)
            groups.append(group)
        self.groups = nn.ModuleList(groups)
        self.active = 0

    def __len__(self) -> int:
        return len(self.groups)

    def layers(self, g: int) -> list[FeatureEmbedding]:
        """Embedding layers of group ``g``."""
        return list(self.groups[g].values())

    def activate(self, g: int) -> None:
        """Make group ``g``'s layers the model's embedding layers."""
        model = self.model_ref[0]
        for name in self.names:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, self.groups[g][_key(name)])
        self.active = g

    def logits_per_group(self, predict: Callable[[], np.ndarray]) -> list[np.ndarray]:
        """Each group's logits ``[rows]``: ``predict`` runs the model with the active group.

        The active group is restored afterwards.
        """
        active = self.active
        out = []
        for g in range(len(self)):
            self.activate(g)
            out.append(predict())
        self.activate(active)
        return out


def serve(per_group: list[np.ndarray], serving: str, best: int) -> np.ndarray:
    """Served logits ``[rows]`` from every group's logits.

    ``last``: the last group (k-1, trained last on each chunk); ``best``: group ``best``
    (the best on validation); ``ensemble``: the mean of every group's logits.
    """
    if serving == "last":
        return per_group[-1]
    if serving == "best":
        return per_group[best]
    if serving == "ensemble":
        return np.mean(per_group, axis=0)
    raise ValueError(f"unknown serving policy {serving!r}; choose one of {', '.join(SERVING)}")


def _key(name: str) -> str:
    return name.replace(".", "__")
