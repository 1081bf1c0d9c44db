"""The training loop: every model learns, modes behave as specified, runs resume exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from learnable import learnable_dataset

from meda.ctr.checkpoint import CHECKPOINT_NAME, ResumeError
from meda.ctr.metrics import logloss
from meda.ctr.models import MODELS
from meda.ctr.modes import Mode
from meda.ctr.train import TrainConfig, Trainer, train

FAST = {"batch_size": 256, "lr": 3e-3, "embedding_dim": 8, "hidden_units": (32,)}


@pytest.fixture(scope="module")
def dataset():
    return learnable_dataset()


def _figures(payload: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in payload["epochs"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_beats_a_constant_predictor(dataset, name: str) -> None:
    result = train(dataset, TrainConfig(model=name, mode="multi-epoch", epochs=3, **FAST))
    final = result["epochs"][-1]
    constant = logloss(dataset.test.label, np.full(len(dataset.test), dataset.train.label.mean()))
    assert final["test_auc"] > 0.75, final
    assert final["test_logloss"] < constant - 0.02, (final, constant)


@pytest.mark.parametrize("mode", ["meda", "meda-continual"])
def test_run_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path: Path, mode: str) -> None:
    data = learnable_dataset(rows=3000, days=3 if mode == "meda-continual" else 0)
    cfg = TrainConfig(mode=mode, epochs=2, dropout=0.3, batch_norm=True, checkpoint_every=4, **FAST)
    full = train(data, cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at(step: int):
        def hook(global_step: int) -> None:
            if global_step == step:
                raise Killed

        return hook

    # steps per epoch: 2400 / 256 -> 10; step 14 is mid-epoch 2 (after meda's re-initialisation),
    # and the last checkpoint (step 12) is two steps earlier, so steps 13-14 are redone
    with pytest.raises(Killed):
        train(data, cfg, tmp_path / "killed", on_step=kill_at(14))
    resumed = train(data, cfg, tmp_path / "killed", resume=True)
    assert _figures(resumed) == _figures(full)
    assert (tmp_path / "killed" / "metrics.json").exists()


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    data = learnable_dataset(rows=1000)
    train(data, TrainConfig(mode="multi-epoch", epochs=1, **FAST), tmp_path)
    with pytest.raises(ValueError, match=r"settings \['lr'\] differ"):
        train(data, TrainConfig(mode="multi-epoch", epochs=1, **{**FAST, "lr": 0.1}), tmp_path, resume=True)


def test_resume_refuses_a_checkpoint_of_another_parameter_layout(tmp_path: Path) -> None:
    data = learnable_dataset(rows=1000)
    cfg = TrainConfig(mode="multi-epoch", epochs=1, **FAST)
    train(data, cfg, tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    state["model"]["embedding.categorical.c0"] = state["model"].pop("embedding.table")  # the per-field layout
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ResumeError, match=r"do not match this model's .*use a new --out folder"):
        train(data, cfg, tmp_path, resume=True)


def test_first_epoch_is_the_same_in_every_non_continual_mode(dataset) -> None:
    runs = {m: train(dataset, TrainConfig(mode=m, epochs=2, **FAST)) for m in ("one-epoch", "multi-epoch", "meda")}
    assert len(runs["one-epoch"]["epochs"]) == 1
    first = [_figures(r)[0] for r in runs.values()]
    assert first[0] == first[1] == first[2]
    assert _figures(runs["multi-epoch"])[1] != _figures(runs["meda"])[1]


@pytest.mark.parametrize("reset", [True, False])
def test_meda_redraws_embeddings_and_keeps_the_network(dataset, reset: bool) -> None:
    cfg = TrainConfig(mode="meda", epochs=2, meda_min_cardinality=30, meda_reset_optimizer=reset, **FAST)
    trainer = Trainer(dataset, cfg)
    seen: dict[str, object] = {}
    original = trainer._reinitialise

    def spy(epoch: int) -> None:
        emb = trainer.model.embedding
        net = trainer.model.mlp[0].weight
        rows = {n: slice(*emb.spans[n]) for n in ("c0", "c1", "c2")}
        seen["before"] = {n: emb.table[r].detach().clone() for n, r in rows.items()}
        seen["moments"] = {n: trainer.optimizer.state[emb.table]["exp_avg"][r].clone() for n, r in rows.items()}
        seen["net"] = net.detach().clone()
        original(epoch)
        seen["after"] = {n: emb.table[r].detach().clone() for n, r in rows.items()}
        seen["moments_after"] = {n: trainer.optimizer.state[emb.table]["exp_avg"][r].clone() for n, r in rows.items()}
        seen["net_after"] = net.detach().clone()
        seen["net_state"] = net in trainer.optimizer.state

    trainer._reinitialise = spy  # type: ignore[method-assign]
    trainer.fit()
    before, after, moments, moments_after = seen["before"], seen["after"], seen["moments"], seen["moments_after"]
    for name in ("c0", "c1"):  # 60 and 40 ids > 30: exactly these rows redrawn from N(0, 1e-4^2)
        assert not torch.equal(before[name], after[name])
        assert after[name].std().item() == pytest.approx(1e-4, rel=0.25)
        assert moments[name].abs().sum() > 0
        assert torch.equal(moments_after[name], torch.zeros_like(moments[name]) if reset else moments[name])
    assert torch.equal(before["c2"], after["c2"])  # 12 ids: kept, with their optimiser state
    assert torch.equal(moments["c2"], moments_after["c2"])
    assert torch.equal(seen["net"], seen["net_after"])
    assert seen["net_state"] is True


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_other_optimisers_train_with_meda(dataset, optimizer: str) -> None:
    lr = 0.05 if optimizer == "adagrad" else 0.5
    result = train(dataset, TrainConfig(mode="meda", epochs=2, optimizer=optimizer, **{**FAST, "lr": lr}))
    assert result["epochs"][-1]["test_auc"] > 0.6  # SGD escapes the 1e-4 init slowly


def test_early_stopping_stops_after_patience_epochs_without_improvement(dataset) -> None:
    cfg = TrainConfig(mode="multi-epoch", epochs=10, monitor="valid_logloss", patience=1, **{**FAST, "lr": 0.05})
    result = train(dataset, cfg)
    n = len(result["epochs"])
    assert result["stopped_early"] and n < 10
    assert result["best"]["epoch"] == n - 1
    assert result["best"]["valid_logloss"] == min(e["valid_logloss"] for e in result["epochs"])


def test_continual_mode_reports_progressive_and_serving_metrics(tmp_path: Path) -> None:
    data = learnable_dataset(rows=4000, days=4, with_group=True)
    result = train(data, TrainConfig(mode="meda-continual", epochs=2, serving="ensemble", **FAST), tmp_path)
    epochs = result["epochs"]
    assert [e["chunk"] for e in epochs] == [0, 1, 2, 3]
    assert "progressive_auc" not in epochs[0]
    assert all(e["progressive_auc"] > 0.6 for e in epochs[1:])
    last = epochs[-1]
    assert len(last["group_valid_auc"]) == 2
    assert set(last["serving"]) == {"last", "best", "ensemble"}
    assert last["test_auc"] == last["serving"]["ensemble"]["test_auc"]
    assert "test_gauc" in last


def test_continual_groups_start_independent_and_share_the_network(dataset) -> None:
    trainer = Trainer(learnable_dataset(rows=1000, days=2), TrainConfig(mode="meda-continual", epochs=3, **FAST))
    g = trainer.groups
    assert len(g) == 3
    tables = [g.layers(i)[0].field_rows("c0") for i in range(3)]
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])
    net = copy.copy(trainer.model.network_parameters())
    g.activate(2)
    assert trainer.model.embedding.table is g.layers(2)[0].table
    assert trainer.model.network_parameters() == net


def test_plans_of_the_modes() -> None:
    assert len(Mode("one-epoch").plan(5)) == 1
    assert [p.reinit for p in Mode("meda").plan(3)] == [False, True, True]
    assert not any(p.reinit for p in Mode("multi-epoch").plan(3))
    plan = Mode("meda-continual").plan(2, n_chunks=3)
    assert [(p.epoch, p.group, p.closes_epoch) for p in plan] == [
        (1, 0, False), (1, 1, True), (2, 0, False), (2, 1, True), (3, 0, False), (3, 1, True),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "two-epoch"}, "unknown mode 'two-epoch'; choose one of one-epoch"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"model": "gbdt"}, "unknown model 'gbdt'"),
        ({"serving": "random"}, "unknown serving policy"),
        ({"monitor": "test_auc"}, "unknown monitor"),
        ({"model_options": {"depth": 3}}, "has no option"),
    ],
)
def test_config_errors_name_the_problem(changes: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig(**changes)


def test_unknown_optimizer_is_reported(dataset) -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; choose one of adam"):
        Trainer(dataset, TrainConfig(optimizer="lbfgs"))


def test_optimizer_has_separate_embedding_and_network_l2(dataset) -> None:
    cfg = TrainConfig(optimizer="adam", embedding_l2=1e-5, net_l2=1e-3, **FAST)
    trainer = Trainer(dataset, cfg)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["embedding"]["weight_decay"] == 1e-5 and groups["network"]["weight_decay"] == 1e-3
    emb_ids = {id(p) for p in groups["embedding"]["params"]}
    assert {id(p) for p in trainer.model.embedding.parameters()} <= emb_ids
    assert not emb_ids & {id(p) for p in trainer.model.mlp.parameters()}


def test_serving_policies() -> None:
    from meda.ctr.continual import serve

    per_group = [np.array([0.0, 1.0]), np.array([2.0, 3.0]), np.array([4.0, -1.0])]
    assert serve(per_group, "last", best=0).tolist() == [4.0, -1.0]
    assert serve(per_group, "best", best=1).tolist() == [2.0, 3.0]
    assert serve(per_group, "ensemble", best=0).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="unknown serving policy"):
        serve(per_group, "vote", best=0)


def test_continual_without_days_uses_ordered_chunks() -> None:
    data = learnable_dataset(rows=1500)
    result = train(data, TrainConfig(mode="meda-continual", epochs=1, chunks=3, **FAST))
    assert [(e["chunk"], e["rows"]) for e in result["epochs"]] == [(0, 400), (1, 400), (2, 400)]


def test_device_option_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        TrainConfig(device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            TrainConfig(device="cuda")
    assert TrainConfig(device="auto").device == "auto"


@pytest.mark.gpu
def test_cuda_training_matches_cpu_closely(tmp_path) -> None:
    """Same seed on CPU and GPU: the same init and batches, so metrics agree up to float noise."""
    data = learnable_dataset()
    cpu = train(data, TrainConfig(mode="meda", epochs=2, device="cpu"))
    gpu = train(data, TrainConfig(mode="meda", epochs=2, device="cuda"))
    for a, b in zip(cpu["epochs"], gpu["epochs"], strict=True):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=5e-3)
