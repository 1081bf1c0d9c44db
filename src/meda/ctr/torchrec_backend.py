"""Optional embedding backend on torchrec's ``EmbeddingBagCollection`` (torchrec 1.8 + fbgemm-gpu 1.8).

:func:`use_torchrec` swaps every :class:`~meda.ctr.embedding.FeatureEmbedding` of a model for a
:class:`TorchrecEmbedding` holding the *same* tables: categorical fields become ``SUM`` bags of one
id, sequence fields ``MEAN`` bags of their non-padding ids, numeric fields keep their vectors.
Outputs, MEDA's re-initialisation (the same generator draws, table by table) and the optimiser
reset are unchanged, so a model gives the same logits on either backend (tested on CPU).

Under ``torchrun`` the collection trains data-parallel like the native tables (DDP). For tables
that outgrow one GPU, torchrec's ``DistributedModelParallel`` shards the collection (table-wise,
row-wise or column-wise, chosen by its planner) over the GPUs; :mod:`meda.ctr.train` does not
wrap models in it yet (docs/ctr.md says what that takes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from meda.ctr.embedding import EmbeddingInit, FeatureEmbedding, Rows
from meda.ctr.features import PAD_INDEX, FeatureMap
from meda.ctr.models import CTRModel

INSTALL = (
    "the torchrec backend needs torchrec 1.8 and fbgemm-gpu(-cpu) 1.8 (built for torch 2.13): "
    "pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 tensordict pyvers torchmetrics==1.0.3 "
    "pyre-extensions typing-inspect mypy-extensions lightning-utilities (docs/ctr.md)"
)


def available() -> bool:
    """Whether torchrec (and fbgemm's operators) import here."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


class TorchrecEmbedding(FeatureEmbedding):
    """A :class:`FeatureEmbedding` whose categorical and sequence tables live in one torchrec
    ``EmbeddingBagCollection`` (``self.bags``; table ``name`` is ``bags.embedding_bags[name]``).

    Args:
        feature_map: the fields to embed.
        layer: the native layer whose tables (and init) are taken over.

    Output of :meth:`forward`: ``[batch, num_fields, dim]`` in the native layer's field order.
    """

    def __init__(self, feature_map: FeatureMap, layer: FeatureEmbedding) -> None:
        if not available():
            raise ImportError(INSTALL)
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        with torch.random.fork_rng(devices=[]):  # the parent's own draw must not move the global RNG
            super().__init__(feature_map, layer.dim, EmbeddingInit(layer.init.kind, layer.init.std))
        self.numeric = layer.numeric
        self.table = None  # the bags hold the tables
        tables = {n: layer.field_rows(n) for n in layer.spans}
        pooled = [(n, PoolingType.SUM) for n in self.field_order["categorical"]]
        pooled += [(n, PoolingType.MEAN) for n in self.field_order["sequence"]]
        self.bag_order = [n for n, _ in pooled]
        configs = [EmbeddingBagConfig(name=n, embedding_dim=layer.dim, num_embeddings=self.vocab_sizes[n],
                                      feature_names=[n], pooling=pool) for n, pool in pooled]  # fmt: skip
        device = layer.table.device if layer.table is not None else torch.device("cpu")
        self.bags = EmbeddingBagCollection(tables=configs, device=device)
        with torch.no_grad():
            for n in self.bag_order:
                self.bags.embedding_bags[n].weight.copy_(tables[n])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed a batch (same keys and shapes as :meth:`FeatureEmbedding.forward`); ``[B, F, D]``."""
        from torchrec import KeyedJaggedTensor

        parts: dict[str, torch.Tensor] = {}
        if self.bag_order:
            values, lengths = [], []
            if self.field_order["categorical"]:
                ids = batch["categorical"]  # one id per bag, key-major layout
                values.append(ids.t().reshape(-1))
                lengths.append(torch.ones(ids.numel(), dtype=torch.int64, device=ids.device))
            for i, _ in enumerate(self.field_order["sequence"]):
                ids = batch["sequence"][:, i, :]
                keep = ids != PAD_INDEX
                values.append(ids[keep])
                lengths.append(keep.sum(dim=1))
            kjt = KeyedJaggedTensor(keys=self.bag_order, values=torch.cat(values), lengths=torch.cat(lengths))
            parts.update(self.bags(kjt).to_dict())
        if self.numeric is not None:
            numeric = batch["numeric"].unsqueeze(-1) * self.numeric.view(-1, self.dim)  # [B, n_num, D]
            parts.update({n: numeric[:, i] for i, n in enumerate(self.field_order["numeric"])})
        order = [n for kind in ("categorical", "numeric", "sequence") for n in self.field_order[kind]]
        return torch.stack([parts[n] for n in order], dim=1)

    def field_rows(self, name: str) -> torch.Tensor:
        """Field ``name``'s table (its bag's weight ``[vocab_size, dim]``) or numeric vector ``[dim]``."""
        if name in getattr(self, "bag_order", ()):  # not yet set while the parent class draws its own tables
            return self.bags.embedding_bags[name].weight
        return super().field_rows(name)

    def reinitialise(
        self, fields: Iterable[str] | None = None, generator: torch.Generator | None = None
    ) -> list[Rows]:
        """MEDA's redraw of the named bag tables (all of them for None), in the native layer's order."""
        names = list(self.vocab_sizes) if fields is None else list(fields)
        unknown = [n for n in names if n not in self.bag_order]
        if unknown:
            raise KeyError(f"no embedding table for field(s) {unknown}; tables: {sorted(self.bag_order)}")
        redrawn = [self.bags.embedding_bags[n].weight for n in names]
        for p in redrawn:
            self.init.fill_(p, generator)
        return [Rows(p, 0, p.shape[0]) for p in redrawn]


def use_torchrec(model: CTRModel) -> CTRModel:
    """Replace every embedding layer of ``model`` by a :class:`TorchrecEmbedding` with the same tables."""
    for name, layer in model.embedding_layers().items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, TorchrecEmbedding(model.feature_map, layer))
    return model
