"""The BARS schedule: LR / 10 after an epoch without improvement, early stop with patience 2."""

from __future__ import annotations

import json

import pytest
import torch
from learnable import learnable_dataset
from typer.testing import CliRunner

from meda.ctr.cli import app
from meda.ctr.schedule import MIN_LR, SCHEDULES, apply_schedule, decay_on_plateau
from meda.ctr.train import TrainConfig, Trainer


def test_decay_on_plateau_divides_every_group_and_stops_at_the_floor() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], lr=1e-3)
    assert decay_on_plateau(opt, 0.1) == pytest.approx(1e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3)
    for _ in range(5):
        decay_on_plateau(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [MIN_LR, MIN_LR]
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        decay_on_plateau(opt, 1.5)


def test_bars_preset_and_explicit_options_win() -> None:
    assert apply_schedule("bars", {}) == SCHEDULES["bars"]
    got = apply_schedule("bars", {"embedding_l2": 1e-2, "patience": None})
    assert got == {"embedding_l2": 1e-2, "lr_plateau_factor": 0.1, "patience": 2}
    assert apply_schedule("none", {"patience": None}) == {}
    with pytest.raises(ValueError, match="unknown schedule 'barz'"):
        apply_schedule("barz", {})


def test_trainer_decays_on_each_plateau_and_stops_after_patience() -> None:
    trainer = Trainer(learnable_dataset(rows=600), TrainConfig(epochs=6, lr=1e-3, **SCHEDULES["bars"]))
    history = trainer.progress.history
    lrs = []
    for auc in (0.70, 0.72, 0.71, 0.73, 0.72, 0.715):
        history.append({"epoch": len(history) + 1, "valid_auc": auc})
        trainer._early_stopping()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        if trainer.progress.stopped_early:
            break
    # epochs 3 and 5 did not improve: LR / 10 each time; epoch 6 is the second plateau in a row: stop
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6])
    assert trainer.progress.stopped_early and len(history) == 6
    assert [r.get("lr_after") for r in history] == pytest.approx([None, None, 1e-4, None, 1e-5, 1e-6])
    assert all(g["lr"] == lrs[-1] for g in trainer.optimizer.param_groups)


def test_cli_schedule_bars_fills_the_config(tmp_path) -> None:
    runner = CliRunner()
    data = tmp_path / "z.parquet"
    assert runner.invoke(app, ["generate", "--preset", "zipf", "--rows", "3000", "--out", str(data)]).exit_code == 0
    args = ["train", "--data", str(data), "--format", "parquet", "--out", str(tmp_path / "o"), "--mode", "multi-epoch",
            "--epochs", "1", "--hidden-units", "16", "--schedule", "bars", "--patience", "3", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "o" / "metrics.json").read_text())["config"]
    assert (config["embedding_l2"], config["lr_plateau_factor"], config["patience"]) == (1e-5, 0.1, 3)
    bad = runner.invoke(app, [*args[:-1], "--schedule", "barz"])
    assert bad.exit_code != 0 and "unknown schedule" in bad.output
