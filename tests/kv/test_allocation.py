"""Layer budgets (mean exactly rho after clamping), integer counts, and AdaKV head budgets."""

from __future__ import annotations

import math

import pytest
import torch

from meda.kv.allocation import (
    entropy_budgets,
    fractions_to_counts,
    head_budgets,
    pyramid_budgets,
    uniform_budgets,
)

EPS = 1e-12


@pytest.mark.parametrize("rho", [0.02, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("tau", [0.3, 1.0, 5.0])
def test_entropy_budgets_mean_is_rho_and_bounded(rho, tau):
    entropy = torch.randn(24, generator=torch.Generator().manual_seed(0)) * 2
    res = entropy_budgets(entropy, rho, tau=tau)
    assert abs(float(res.fractions.mean()) - rho) < EPS
    assert (res.fractions >= res.alpha_min - EPS).all() and (res.fractions <= 1 + EPS).all()


def test_entropy_budgets_unclipped_is_the_paper_formula():
    entropy = torch.tensor([1.0, 1.5, 0.5, 1.2])
    res = entropy_budgets(entropy, 0.2, alpha_min=0.0)
    torch.testing.assert_close(res.fractions, torch.softmax(entropy.double(), 0) * 4 * 0.2)
    assert res.scale == 1.0 and res.clipped == 0 and res.clipped_layers == 0


def test_clipping_redistributes_proportionally():
    entropy = torch.tensor([5.0, 0.0, 1.0, 2.0, -3.0])
    res = entropy_budgets(entropy, 0.5, alpha_min=0.05)
    raw = torch.softmax(entropy.double(), 0) * 5 * 0.5
    assert float(res.fractions[0]) == 1.0 and float(res.fractions[4]) == pytest.approx(0.05)
    assert res.clipped_layers == 2 and res.clipped > 0
    free = res.fractions[1:4] / raw[1:4]  # one common scale on the unclipped layers
    torch.testing.assert_close(free, free[:1].expand(3))
    assert abs(float(res.fractions.mean()) - 0.5) < EPS


def test_tau_flattens_towards_uniform():
    entropy = torch.tensor([0.0, 3.0, 1.0])
    spread = [float(entropy_budgets(entropy, 0.3, tau=t).fractions.std()) for t in (0.5, 1.0, 100.0)]
    assert spread[0] > spread[1] > spread[2] and spread[2] < 0.01


def test_alpha_min_equal_rho_gives_uniform():
    res = entropy_budgets(torch.tensor([0.0, 4.0, 1.0]), 0.1, alpha_min=0.1)
    torch.testing.assert_close(res.fractions, torch.full((3,), 0.1, dtype=torch.float64))


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan")])
def test_bad_rho_raises(rho):
    with pytest.raises(ValueError, match="rho"):
        entropy_budgets(torch.zeros(3), rho)
    with pytest.raises(ValueError, match="rho"):
        pyramid_budgets(3, rho)
    with pytest.raises(ValueError, match="rho"):
        uniform_budgets(3, rho)


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha_min"):
        entropy_budgets(torch.zeros(3), 0.1, alpha_min=0.2)
    with pytest.raises(ValueError, match="tau"):
        entropy_budgets(torch.zeros(3), 0.1, tau=0.0)
    with pytest.raises(ValueError, match="finite"):
        entropy_budgets(torch.tensor([0.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="beta"):
        pyramid_budgets(3, 0.1, beta=0.5)
    with pytest.raises(ValueError, match="num_layers"):
        pyramid_budgets(0, 0.1)


def test_pyramid_is_pyramidkv_when_unclipped():
    res = pyramid_budgets(5, 0.2, beta=20.0, alpha_min=0.0)
    torch.testing.assert_close(res.fractions, torch.linspace(0.39, 0.01, 5, dtype=torch.float64))
    assert pyramid_budgets(1, 0.3).fractions.tolist() == [0.3]


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.6, 0.9])
def test_pyramid_mean_is_rho_and_non_increasing(rho):
    fractions = pyramid_budgets(30, rho).fractions
    assert abs(float(fractions.mean()) - rho) < EPS
    assert (fractions[1:] <= fractions[:-1] + EPS).all() and fractions.max() <= 1.0


def test_uniform_budgets():
    res = uniform_budgets(4, 0.25)
    assert res.fractions.tolist() == [0.25] * 4 and res.clipped == 0


@pytest.mark.parametrize("seed", range(5))
def test_counts_round_to_the_total_and_stay_within_one(seed):
    gen = torch.Generator().manual_seed(seed)
    rho = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
    alpha = entropy_budgets(torch.randn(17, generator=gen), rho).fractions
    n = torch.randint(40, 3000, (4,), generator=gen)
    counts = fractions_to_counts(alpha, n)
    assert counts.shape == (17, 4) and counts.dtype == torch.long
    exact = alpha[:, None] * n.double()
    assert ((counts - exact).abs() < 1).all()
    assert ((counts >= 1) & (counts <= n)).all()
    assert torch.equal(counts.sum(0), torch.round(rho * 17 * n.double()).long())


def test_counts_for_an_int_and_tiny_budgets():
    assert fractions_to_counts(torch.tensor([0.5, 0.36]), 10).tolist() == [[5], [4]]
    assert fractions_to_counts(torch.tensor([0.33, 0.34, 0.33]), 10).tolist() == [[3], [4], [3]]
    assert fractions_to_counts(torch.tensor([0.01, 0.01, 0.01]), 5).tolist() == [[1], [1], [1]]
    with pytest.raises(ValueError, match="n_tokens"):
        fractions_to_counts(torch.tensor([0.5]), 0)
    with pytest.raises(ValueError, match="fractions"):
        fractions_to_counts(torch.tensor([1.5]), 4)


def reference_head_budgets(scores, keep, valid, floor_fraction):
    batch, heads, _ = scores.shape
    out = torch.zeros(batch, heads, dtype=torch.long)
    for b in range(batch):
        n = int(valid[b].sum())
        k = min(int(keep[b]), n)
        floor = math.floor(k * floor_fraction)
        pool = []
        for h in range(heads):
            ranked = sorted((float(scores[b, h, j]) for j in range(valid.shape[1]) if valid[b, j]), reverse=True)
            pool += [(s, h) for s in ranked[floor:]]
            out[b, h] = floor
        for _, h in sorted(pool, reverse=True)[: heads * (k - floor)]:
            out[b, h] += 1
    return out


@pytest.mark.parametrize("floor_fraction", [0.0, 0.2, 0.5, 1.0])
def test_head_budgets_match_reference(floor_fraction):
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 4, 20, generator=gen) ** 3 * torch.tensor([1.0, 3.0, 0.2, 1.0])[:, None]
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, :8] = False
    valid[2, :17] = False
    keep = torch.tensor([6, 10, 5])  # row 2 has 3 valid tokens: capped
    got = head_budgets(scores.masked_fill(~valid[:, None], float("-inf")), keep, valid, floor_fraction=floor_fraction)
    assert torch.equal(got, reference_head_budgets(scores, keep, valid, floor_fraction))
    assert torch.equal(got.sum(1), 4 * torch.minimum(keep, valid.sum(1)))
    assert (got <= valid.sum(1, keepdim=True)).all()


def test_head_budgets_follow_the_scores():
    scores = torch.stack([torch.full((10,), 5.0), torch.zeros(10)])[None]  # head 0 owns every top key
    got = head_budgets(scores, 4, torch.ones(1, 10, dtype=torch.bool), floor_fraction=0.25)
    assert got.tolist() == [[7, 1]]


def test_head_budgets_errors():
    with pytest.raises(ValueError, match="floor_fraction"):
        head_budgets(torch.zeros(1, 2, 3), 1, torch.ones(1, 3, dtype=torch.bool), floor_fraction=1.5)
    with pytest.raises(ValueError, match="valid bool"):
        head_budgets(torch.zeros(1, 2, 3), 1, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.gpu
def test_cuda_inputs():
    alpha = pyramid_budgets(6, 0.3).fractions.cuda()
    n = torch.tensor([50, 700], device="cuda")
    assert torch.equal(fractions_to_counts(alpha, n).cpu(), fractions_to_counts(alpha.cpu(), n.cpu()))
    scores = torch.rand(2, 3, 40)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :9] = False
    keep = torch.tensor([7, 12])
    expected = head_budgets(scores, keep, valid)
    assert torch.equal(head_budgets(scores.cuda(), keep.cuda(), valid.cuda()).cpu(), expected)
    assert entropy_budgets(torch.rand(5, device="cuda"), 0.2).fractions.sum().item() == pytest.approx(1.0)


def test_density_budgets_are_proportional_with_mean_rho() -> None:
    from meda.kv.allocation import density_budgets

    d = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    res = density_budgets(d, 0.2)
    torch.testing.assert_close(res.fractions, d / d.mean() * 0.2)
    clipped = density_budgets(torch.tensor([1.0, 1e-4, 1e-4, 1e-4]), 0.4, alpha_min=0.05)
    assert abs(float(clipped.fractions.mean()) - 0.4) < 1e-9 and float(clipped.fractions.min()) >= 0.05
    with pytest.raises(ValueError, match="positive"):
        density_budgets(torch.tensor([0.5, 0.0]), 0.2)


def test_allocator_table_covers_every_recipe_allocator() -> None:
    from meda.kv.allocation import ALLOCATORS
    from meda.kv.recipes import Allocator, resolve_recipe

    assert set(ALLOCATORS) == set(Allocator.__args__)
    stat = torch.tensor([1.0, 2.0, 3.0])
    for name, fn in ALLOCATORS.items():
        res = fn(stat if name in ("entropy", "density") else None, 3, 0.3, 1.0, 0.01)
        assert abs(float(res.fractions.mean()) - 0.3) < 1e-9, name
    assert resolve_recipe("meda").floor(0.2) == pytest.approx(0.1)  # the recommended recipe: half the budget
    assert resolve_recipe("meda-paper").floor(0.2) == pytest.approx(0.01)  # the paper: alpha_min only
    assert resolve_recipe("meda-paper", layer_floor=0.5).floor(0.6) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="layer_floor"):
        resolve_recipe("meda", layer_floor=2.0)


def test_post_vision_density_matches_a_plain_loop() -> None:
    from meda.kv.sparsity import post_vision_density, post_vision_queries

    gen = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, n, dim = 2, 4, 2, 12, 8
    query = torch.randn(batch, q_heads, n, dim, generator=gen) * 2
    key = torch.randn(batch, kv_heads, n, dim, generator=gen) * 2
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    vision = torch.zeros(batch, n, dtype=torch.bool)
    vision[0, 2:6] = True
    vision[1, 4:9] = True
    got = post_vision_density(query, key, vision, valid, scaling=dim**-0.5, threshold=0.05, query_chunk=2)
    post = post_vision_queries(vision, valid)
    assert post[0].nonzero().flatten().tolist() == list(range(6, n))
    assert post[1].nonzero().flatten().tolist() == list(range(9, n))
    for b in range(batch):
        dense = total = 0
        for h in range(q_heads):
            for i in range(n):
                if not post[b, i]:
                    continue
                keys = [j for j in range(i + 1) if valid[b, j]]
                logits = torch.stack([query[b, h, i] @ key[b, h // 2, j] * dim**-0.5 for j in keys])
                p = torch.softmax(logits, 0)
                dense += int((p >= 0.05 * p.max()).sum())
                total += len(keys)
        assert abs(float(got[b]) - dense / total) < 1e-6
