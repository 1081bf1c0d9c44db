"""--sparse-grad: sparse gradients for the concatenated embedding table and a sparse-capable optimiser for
it (SparseAdam for adam; Adagrad / SGD take sparse gradients themselves), the network's optimiser unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from learnable import learnable_dataset
from test_distributed import ARGS, _torchrun
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic
from meda.ctr.embedding import FeatureEmbedding
from meda.ctr.metrics import logloss
from meda.ctr.optim import SplitOptimizer, build_optimizer, reset_state
from meda.ctr.train import TrainConfig, Trainer

FAST = {"batch_size": 256, "hidden_units": (16,), "embedding_dim": 4, "lr": 0.01}


@pytest.fixture(scope="module")
def dataset():
    return learnable_dataset(3000)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_sparse_matches_dense_where_the_update_is_the_same(dataset, optimizer: str) -> None:
    """Adagrad's and SGD's sparse updates equal their dense ones (an untouched row has a zero gradient, so
    its dense update is zero too); MEDA's redraw and state reset included (2 epochs of mode meda)."""
    cfg = TrainConfig(model="deepfm", mode="meda", epochs=2, optimizer=optimizer, **FAST)
    dense = Trainer(dataset, cfg)
    sparse = Trainer(dataset, TrainConfig(**{**cfg.__dict__, "sparse_grad": True}))
    assert isinstance(sparse.optimizer, SplitOptimizer) and not isinstance(dense.optimizer, SplitOptimizer)
    a, b = dense.fit(), sparse.fit()
    for (name, x), y in zip(dense.model.state_dict().items(), sparse.model.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert abs(ea["test_auc"] - eb["test_auc"]) < 1e-4


def test_sparse_adam_trains_with_a_sparse_table_gradient(dataset) -> None:
    trainer = Trainer(dataset, TrainConfig(model="dnn", mode="multi-epoch", epochs=2, sparse_grad=True, **FAST))
    table = trainer.model.embedding.table
    parts = trainer.optimizer.parts
    assert type(parts[0]) is torch.optim.SparseAdam and parts[0].param_groups[0]["params"] == [table]
    assert type(parts[1]) is torch.optim.Adam
    assert all(p is not table for g in parts[1].param_groups for p in g["params"])
    seen: list[bool] = []
    result = trainer.fit(on_step=lambda _: seen.append(table.grad.is_sparse))
    assert seen and all(seen)
    losses = [e["train_loss"] for e in result["epochs"]]
    constant = logloss(dataset.test.label, np.full(len(dataset.test), dataset.train.label.mean()))
    assert losses[1] < losses[0]
    assert result["epochs"][-1]["test_logloss"] < constant - 0.02
    assert result["epochs"][-1]["test_auc"] > 0.7


def test_continual_groups_each_train_their_sparse_table(dataset) -> None:
    trainer = Trainer(dataset, TrainConfig(model="dnn", mode="meda-continual", epochs=2, sparse_grad=True, **FAST))
    tables = [layer.table for g in range(2) for layer in trainer.groups.layers(g)]
    start = [t.detach().clone() for t in tables]
    assert trainer.optimizer.parts[0].param_groups[0]["params"] == tables
    trainer.fit()
    assert all(not torch.equal(t, s) for t, s in zip(tables, start, strict=True))


def test_reinitialisation_resets_exactly_the_fields_rows_of_the_sparse_adam_state(dataset) -> None:
    emb = FeatureEmbedding(dataset.feature_map, 4, sparse=True, generator=torch.Generator().manual_seed(0))
    opt = build_optimizer("adam", [emb.numeric], [], lr=0.01, sparse_params=[emb.table])
    batch = {"categorical": torch.as_tensor(dataset.train.categorical[:512]),
             "numeric": torch.as_tensor(dataset.train.numeric[:512]),
             "sequence": torch.as_tensor(dataset.train.sequence[:512])}  # fmt: skip
    for _ in range(3):
        opt.zero_grad()
        emb(batch).pow(2).sum().backward()
        assert emb.table.grad.is_sparse
        opt.step()
    state = opt.parts[0].state[emb.table]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    table_before = emb.table.detach().clone()
    start, stop = emb.spans["c1"]
    assert before["exp_avg_sq"][start:stop].abs().sum() > 0  # the field had state to lose
    reset_state(opt, emb.reinitialise(["c1"], generator=torch.Generator().manual_seed(1)))
    inside = torch.zeros(emb.table.shape[0], dtype=torch.bool)
    inside[start:stop] = True
    for key, value in before.items():
        assert torch.all(state[key][inside] == 0), key
        assert torch.equal(state[key][~inside], value[~inside]), key
    assert state["step"] == 3  # the table's step count (bias correction) carries on
    assert not torch.equal(emb.table[inside], table_before[inside])
    assert torch.equal(emb.table[~inside], table_before[~inside])
    reset_state(opt, emb.reinitialise())  # every table redrawn: the state goes, as a fresh parameter's
    assert emb.table not in opt.parts[0].state
    opt.zero_grad()
    emb(batch).pow(2).sum().backward()
    opt.step()
    assert opt.parts[0].state[emb.table]["step"] == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "adamar"}, "--sparse-grad has no sparse form of --optimizer adamar"),
        ({"optimizer": "adagradar"}, "--sparse-grad has no sparse form of --optimizer adagradar"),
        ({"embedding_l2": 1e-5}, "--sparse-grad cannot apply embedding L2.*use --embedding-l2 0"),
        ({"compile": "default"}, "--sparse-grad cannot be compiled.*use --compile off"),
        ({"embedding_backend": "torchrec"}, "--sparse-grad acts on the native tables.*--embedding-backend native"),
    ],
)
def test_refused_combinations_name_the_flag_and_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(sparse_grad=True, **changes)
    TrainConfig(**changes)  # fine without --sparse-grad


def test_cli_refuses_bars_with_sparse_grad(tmp_path: Path) -> None:
    args = ["ctr", "train", "--data", str(tmp_path / "none.parquet"), "--format", "parquet", "--out", str(tmp_path),
            "--sparse-grad", "--schedule", "bars"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "--sparse-grad cannot apply embedding L2" in " ".join(result.output.split())


def test_sparse_run_killed_mid_epoch_resumes_to_the_same_metrics(dataset, tmp_path: Path) -> None:
    cfg = TrainConfig(model="dnn", mode="meda", epochs=2, sparse_grad=True, checkpoint_every=4, **FAST)
    full = Trainer(dataset, cfg, tmp_path / "full").fit()

    def kill(global_step: int) -> None:  # step 14: mid-epoch 2, after the redraw; last checkpoint at 12
        if global_step == 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(dataset, cfg, tmp_path / "killed").fit(on_step=kill)
    resumed = Trainer(dataset, cfg, tmp_path / "killed").fit(resume=True)
    drop = ("seconds",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed["epochs"]] == [
        {k: v for k, v in e.items() if k not in drop} for e in full["epochs"]
    ]


@pytest.mark.slow
def test_two_processes_with_sparse_grad_match_one(tmp_path: Path) -> None:
    """DDP all-reduces the table's sparse gradient (gloo): 2 processes train as 1 does with the same global batch."""
    schema = synthetic.schema_for("low-cardinality", "parquet")
    synthetic.write(synthetic.generate("low-cardinality", 6000, seed=3), tmp_path / "d.parquet", "parquet", schema)
    two = _torchrun(tmp_path / "d.parquet", tmp_path / "two", "--sparse-grad")
    data, out = str(tmp_path / "d.parquet"), str(tmp_path / "one")
    args = ["ctr", "train", "--data", data, "--out", out, *ARGS, "--sparse-grad"]
    assert CliRunner().invoke(app, args).exit_code == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["config"]["sparse_grad"] is True
    assert two["distributed"] == {"world_size": 2, "replicas_identical": True}
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert abs(a["test_auc"] - b["test_auc"]) < 0.01 and abs(a["test_logloss"] - b["test_logloss"]) < 0.01, (a, b)
