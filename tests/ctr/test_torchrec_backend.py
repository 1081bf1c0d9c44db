"""The torchrec EmbeddingBagCollection backend gives the native layer's outputs, MEDA re-initialises
it with the same draws, and training on it reaches the native run's metrics (CPU).

Skipped where torchrec 1.8 / fbgemm-gpu-cpu 1.8 are not installed (CI installs neither)."""

from __future__ import annotations

import pytest
import torch
from learnable import learnable_dataset

from meda.ctr.models import build_model
from meda.ctr.sources import InMemorySource
from meda.ctr.torchrec_backend import TorchrecEmbedding, available, use_torchrec
from meda.ctr.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not available(), reason="torchrec 1.8 + fbgemm-gpu-cpu 1.8 are not installed")
FAST = {"batch_size": 256, "lr": 3e-3, "embedding_dim": 8, "hidden_units": (32,)}


@pytest.mark.parametrize("name", ["dnn", "deepfm", "widedeep"])
def test_same_logits_and_same_meda_redraw_as_the_native_tables(name: str) -> None:
    data = learnable_dataset(rows=600)
    torch.manual_seed(0)
    native = build_model(name, data.feature_map, embedding_dim=4)
    torch.manual_seed(0)
    backed = use_torchrec(build_model(name, data.feature_map, embedding_dim=4))
    assert all(isinstance(m, TorchrecEmbedding) for m in backed.embedding_layers().values())
    batch = next(InMemorySource(data.train, torch.device("cpu"), True).eval_batches(200))
    assert torch.allclose(native(batch), backed(batch), atol=1e-6)
    for layer_n, layer_b in zip(native.embedding_layers().values(), backed.embedding_layers().values(), strict=True):
        names = layer_n.table_names(30)
        layer_n.reinitialise(names, generator=torch.Generator().manual_seed(5))
        redrawn = layer_b.reinitialise(names, generator=torch.Generator().manual_seed(5))
        for n, rows in zip(names, redrawn, strict=True):
            assert torch.equal(rows.param, layer_n.field_rows(n))
            assert rows.param is layer_b.bags.embedding_bags[n].weight and rows.stop == rows.param.shape[0]
    assert torch.allclose(native(batch), backed(batch), atol=1e-6)


def test_meda_trains_on_the_torchrec_backend_like_the_native_one() -> None:
    data = learnable_dataset(rows=3000)
    cfg = TrainConfig(mode="meda", epochs=2, **FAST)
    native = train(data, cfg)
    backed = train(data, TrainConfig(mode="meda", epochs=2, embedding_backend="torchrec", **FAST))
    for a, b in zip(native["epochs"], backed["epochs"], strict=True):
        assert b["test_auc"] == pytest.approx(a["test_auc"], abs=2e-3)
    assert backed["epochs"][-1]["test_auc"] > 0.7
