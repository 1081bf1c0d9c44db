"""AdamAR / AdagradAR against a plain per-row reference, and their place in training."""

from __future__ import annotations

import math

import pytest
import torch
from learnable import learnable_dataset

from meda.ctr.adaptive_reg import LAST_UPDATE, decay_coefficient
from meda.ctr.embedding import Rows
from meda.ctr.optim import build_optimizer, reset_state
from meda.ctr.train import TrainConfig, Trainer, train

ROWS, DIM, STEPS = 7, 3, 12


def _sparse_grads(seed: int) -> list[torch.Tensor]:
    """Per step a gradient ``[ROWS, DIM]`` that touches a random subset of rows (the rest exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(STEPS):
        g = torch.randn(ROWS, DIM, generator=gen)
        g[torch.rand(ROWS, generator=gen) < 0.6] = 0.0
        grads.append(g)
    return grads


def _reference(kind: str, table: list[list[float]], grads: list[torch.Tensor], lr: float, alpha: float,
               decay: float) -> list[list[float]]:  # fmt: skip
    """Plain per-row, per-value loops: Adam (or Adagrad) on every value, then for each row
    with a non-zero gradient the decay ``lr * decay * min(1, alpha * interval) * value_before``."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    rows = [list(r) for r in table]
    m = [[0.0] * DIM for _ in range(ROWS)]
    v = [[0.0] * DIM for _ in range(ROWS)]
    last = [0] * ROWS
    for t, grad in enumerate(grads, start=1):
        g = grad.tolist()
        before = [list(r) for r in rows]
        for i in range(ROWS):
            for j in range(DIM):
                if kind == "adam":
                    m[i][j] = b1 * m[i][j] + (1 - b1) * g[i][j]
                    v[i][j] = b2 * v[i][j] + (1 - b2) * g[i][j] ** 2
                    m_hat, v_hat = m[i][j] / (1 - b1**t), v[i][j] / (1 - b2**t)
                    rows[i][j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
                else:  # adagrad, initial accumulator 0, eps 1e-10
                    v[i][j] += g[i][j] ** 2
                    rows[i][j] -= lr * g[i][j] / (math.sqrt(v[i][j]) + 1e-10)
            if any(x != 0.0 for x in g[i]):
                lam = min(1.0, alpha * (t - last[i]))
                last[i] = t
                for j in range(DIM):
                    rows[i][j] -= lr * decay * lam * before[i][j]
    return rows


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
@pytest.mark.parametrize(("alpha", "decay"), [(0.15, 1.0), (0.4, 5.0), (1e-3, 50.0)])
def test_matches_the_per_row_reference(kind: str, alpha: float, decay: float) -> None:
    table = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = _sparse_grads(2)
    param = torch.nn.Parameter(table.clone())
    opt = build_optimizer(f"{kind}ar", [param], [], lr=0.05, options={"ar_alpha": alpha, "ar_decay": decay})
    for g in grads:
        param.grad = g.to(torch.float64)
        opt.step()
    expected = torch.tensor(_reference(kind, table.tolist(), grads, 0.05, alpha, decay), dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-9)  # fused kernels order eps differently
    # the cap at 1 was reached somewhere with these settings (a long-unseen row)
    assert float(opt.state[param][LAST_UPDATE].max()) <= STEPS


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_alpha_zero_is_the_base_optimiser_and_the_network_group_is_never_decayed(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    table, weight = torch.randn(ROWS, DIM, generator=gen), torch.randn(DIM, DIM, generator=gen)
    grads = _sparse_grads(4)
    ar = [torch.nn.Parameter(table.clone()), torch.nn.Parameter(weight.clone())]
    base = [torch.nn.Parameter(table.clone()), torch.nn.Parameter(weight.clone())]
    opt_ar = build_optimizer(f"{kind}ar", [ar[0]], [ar[1]], lr=0.01, options={"ar_alpha": 0.0})
    opt_base = build_optimizer(kind, [base[0]], [base[1]], lr=0.01)
    decayed = build_optimizer(f"{kind}ar", [], [torch.nn.Parameter(weight.clone())], lr=0.01)
    for g in grads:
        for p, q in ((ar[0], base[0]), (ar[1], base[1])):
            p.grad = q.grad = g[:DIM] if p.shape[0] == DIM else g
        decayed.param_groups[0]["params"][0].grad = g[:DIM]
        opt_ar.step()
        opt_base.step()
        decayed.step()
    assert torch.equal(ar[0], base[0]) and torch.equal(ar[1], base[1])
    assert torch.equal(decayed.param_groups[0]["params"][0], base[1])  # network group: plain base optimiser


def test_decay_coefficient_is_capped_at_one() -> None:
    got = decay_coefficient(torch.tensor([0, 1, 10, 1000]), 0.01)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.01, 0.1, 1.0]))


def test_reset_state_restarts_the_intervals_at_the_reinitialisation() -> None:
    param = torch.nn.Parameter(torch.ones(ROWS, DIM))
    opt = build_optimizer("adamar", [param], [], lr=0.1, options={"ar_alpha": 0.1})
    only_row = torch.zeros(ROWS, DIM)
    only_row[0] = 1.0
    for _ in range(5):
        param.grad = only_row
        opt.step()
    reset_state(opt, [Rows(param, 0, ROWS)])
    assert LAST_UPDATE not in opt.state[param]
    touched = torch.zeros(ROWS, DIM)
    touched[3] = 1.0  # row 3, never updated before: interval counts from the reset (1 step), not from step 0
    before = param.detach()[3].clone()
    param.grad = touched
    opt.step()
    plain = torch.optim.Adam([torch.nn.Parameter(before.clone().unsqueeze(0))], lr=0.1)
    plain.param_groups[0]["params"][0].grad = torch.ones(1, DIM)
    plain.step()
    expected = plain.param_groups[0]["params"][0].detach()[0] - 0.1 * 0.1 * before
    torch.testing.assert_close(param.detach()[3], expected)


def test_unknown_optimizer_option_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no option.*ar_alhpa.*ar_alpha"):
        TrainConfig(optimizer="adamar", optimizer_options={"ar_alhpa": 0.1})
    with pytest.raises(ValueError, match="takes none"):
        TrainConfig(optimizer="adam", optimizer_options={"ar_alpha": 0.1})


def test_adamar_trains_resumes_and_combines_with_meda(tmp_path) -> None:
    data = learnable_dataset(rows=3000)
    fast = {"batch_size": 256, "lr": 3e-3, "embedding_dim": 8, "hidden_units": (32,)}
    cfg = TrainConfig(mode="meda", epochs=2, optimizer="adamar", optimizer_options={"ar_alpha": 0.05},
                      checkpoint_every=4, **fast)  # fmt: skip
    full = train(data, cfg, tmp_path / "full")
    assert full["epochs"][-1]["test_auc"] > 0.7

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if step == 14:
            raise Killed

    with pytest.raises(Killed):
        train(data, cfg, tmp_path / "killed", on_step=kill)
    resumed = train(data, cfg, tmp_path / "killed", resume=True)
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in full["epochs"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in resumed["epochs"]]
    trainer = Trainer(data, cfg)
    assert trainer.optimizer.param_groups[0]["ar_alpha"] == 0.05
    assert "ar_alpha" not in trainer.optimizer.param_groups[1]
