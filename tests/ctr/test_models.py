"""Model shapes, the shared embedding layer and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meda.ctr.embedding import EmbeddingInit, FeatureEmbedding
from meda.ctr.features import FeatureMap, Field
from meda.ctr.models import MODELS, build_model, model_options
from meda.ctr.models.base import fm_interaction


def feature_map() -> FeatureMap:
    return FeatureMap(
        [
            Field("user", "categorical", vocab_size=50),
            Field("item", "categorical", vocab_size=30),
            Field("price", "numeric"),
            Field("history", "sequence", vocab_size=30, max_len=4),
        ]
    )


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 30, (n, 1, 4), generator=g)
    seq[0] = 0  # an all-padding sequence
    return {
        "categorical": torch.stack(
            [torch.randint(0, 50, (n,), generator=g), torch.randint(0, 30, (n,), generator=g)], 1
        ),
        "numeric": torch.rand(n, 1, generator=g),
        "sequence": seq,
        "label": torch.randint(0, 2, (n,), generator=g).float(),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_one_logit_per_row_and_backpropagates(name: str) -> None:
    model = build_model(name, feature_map(), **({} if name == "lr" else {"embedding_dim": 4}))
    b = batch()
    logits = model(b)
    assert logits.shape == (8,)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.embedding_layers(), "MEDA needs to find the embedding layers"
    assert all(layer.table.grad is not None for layer in model.embedding_layers().values())


def test_embedding_layer_shapes_and_sequence_mean_pooling() -> None:
    fm = feature_map()
    emb = FeatureEmbedding(fm, dim=3, init=EmbeddingInit("normal", 0.1))
    b = batch()
    out = emb(b)
    assert out.shape == (8, 4, 3)
    assert torch.allclose(out[:, 0], emb.field_rows("user")[b["categorical"][:, 0]])
    assert torch.allclose(out[:, 2], b["numeric"][:, :1] * emb.field_rows("price"))
    ids = b["sequence"][1, 0]
    kept = ids[ids != 0]
    assert torch.allclose(out[1, 3], emb.field_rows("history")[kept].mean(0))
    assert torch.equal(out[0, 3], torch.zeros(3))  # all padding -> zero vector


def test_reinitialise_redraws_only_the_named_tables_from_the_init_distribution() -> None:
    emb = FeatureEmbedding(feature_map(), dim=8, init=EmbeddingInit("normal", 1e-4))
    fields = ("user", "item", "price", "history")
    before = {n: emb.field_rows(n).detach().clone() for n in fields}
    redrawn = emb.reinitialise(["user"], generator=torch.Generator().manual_seed(1))
    after = {n: emb.field_rows(n).detach().clone() for n in fields}
    assert [(r.param, r.start, r.stop) for r in redrawn] == [(emb.table, 0, 50)]
    assert not torch.equal(before["user"], after["user"])
    assert all(torch.equal(before[n], after[n]) for n in ("item", "price", "history"))
    assert after["user"].std().item() == pytest.approx(1e-4, rel=0.2)
    assert emb.table_names(min_cardinality=40) == ["user"]
    with pytest.raises(KeyError, match="no embedding table"):
        emb.reinitialise(["price"])


def test_uniform_init_is_bounded() -> None:
    emb = FeatureEmbedding(feature_map(), dim=8, init=EmbeddingInit("uniform", 0.05))
    assert emb.table.abs().max().item() <= 0.05
    with pytest.raises(ValueError, match="unknown embedding init"):
        EmbeddingInit("xavier")  # type: ignore[arg-type]


def test_fm_interaction_equals_pairwise_sum() -> None:
    emb = torch.randn(5, 4, 3)
    brute = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    assert torch.allclose(fm_interaction(emb), brute, atol=1e-5)


def test_registry_errors_name_the_problem_and_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'xgboost'; choose one of lr, fm"):
        build_model("xgboost", feature_map())
    with pytest.raises(TypeError, match="has no option"):
        build_model("lr", feature_map(), hidden_units=(8,))
    assert build_model("Wide&Deep", feature_map(), embedding_dim=2).__class__.__name__ == "WideDeep"
    assert "cross_layers" in model_options("dcnv2")


def test_mlp_options_are_applied() -> None:
    model = build_model("dnn", feature_map(), embedding_dim=4, hidden_units=(16, 8), dropout=0.2, batch_norm=True)
    kinds = [type(m).__name__ for m in model.mlp]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
    ]
    assert np.prod(model.mlp[0].weight.shape) == 16 * 4 * 4
