"""Selection rules against a plain Python reference; gather_kv against direct indexing."""

from __future__ import annotations

import pytest
import torch

from meda.kv.selection import Selection, gather_kv, select_indices


def reference_kept(scores, keep, valid, sink, recent, priority):
    """Kept positions of one head: sinks, recent (latest first), priority by score, rest by score."""
    positions = [j for j in range(len(valid)) if valid[j]]
    if keep >= len(positions):
        return positions
    sinks = positions[:sink]
    recents = [j for j in reversed(positions[len(positions) - recent :]) if j not in sinks] if recent else []
    rest = [j for j in positions if j not in sinks and j not in recents]
    by_score = sorted(rest, key=lambda j: (not bool(priority[j]), -float(scores[j]), j))
    return sorted((sinks + recents + by_score)[:keep])


def check_against_reference(scores, keep, valid, sink=0, recent=0, priority=None):
    sel = select_indices(scores, keep, valid, sink_tokens=sink, recent_window=recent, priority=priority)
    batch, heads, n = scores.shape
    keep = torch.as_tensor(keep).reshape(-1, 1) if torch.as_tensor(keep).dim() < 2 else keep
    keep = torch.as_tensor(keep).expand(batch, heads)
    prio = torch.zeros(batch, n, dtype=torch.bool) if priority is None else priority
    for b in range(batch):
        for h in range(heads):
            expected = reference_kept(scores[b, h], int(keep[b, h]), valid[b], sink, recent, prio[b])
            got = sel.indices[b, h][sel.mask[b, h]].tolist()
            assert got == expected, (b, h)
            assert sel.mask[b, h].tolist() == [True] * len(expected) + [False] * (sel.mask.shape[-1] - len(expected))
    return sel


def random_case(batch=3, heads=2, n=12, pads=(0, 3, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n, generator=gen)
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    priority = torch.rand(batch, n, generator=gen) < 0.3
    return scores, valid, priority


@pytest.mark.parametrize(("sink", "recent"), [(0, 0), (1, 0), (0, 3), (2, 2), (4, 9)])
@pytest.mark.parametrize("use_priority", [False, True])
def test_matches_reference_with_per_head_keep(sink, recent, use_priority):
    scores, valid, priority = random_case()
    keep = torch.tensor([[3, 6], [1, 9], [2, 12]])
    check_against_reference(scores, keep, valid, sink, recent, priority if use_priority else None)


@pytest.mark.parametrize("keep", [4, torch.tensor([2, 5, 1]), torch.tensor([[3], [0], [4]])])
def test_keep_broadcasts(keep):
    scores, valid, _ = random_case()
    check_against_reference(scores, keep, valid, sink=1, recent=1)


def test_padding_is_never_kept_even_with_top_scores():
    scores, valid, _ = random_case()
    scores = scores.masked_fill(~valid[:, None], 100.0)
    sel = select_indices(scores, 20, valid)
    kept = sel.token_mask(12)
    assert not (kept & ~valid[:, None]).any()
    assert torch.equal(sel.counts, valid.sum(1, keepdim=True).expand(-1, 2))


def test_keep_at_least_valid_tokens_keeps_everything_in_order():
    scores, valid, _ = random_case(pads=(0, 0, 0))
    sel = select_indices(scores, 12, valid)
    assert torch.equal(sel.indices, torch.arange(12).expand(3, 2, 12)) and sel.mask.all()


def test_streaming_llm_is_sinks_plus_recent_with_zero_scores():
    valid = torch.ones(1, 10, dtype=torch.bool)
    sel = select_indices(torch.zeros(1, 1, 10), 5, valid, sink_tokens=2, recent_window=3)
    assert sel.indices.tolist() == [[[0, 1, 7, 8, 9]]]


def test_sinks_and_recent_count_valid_tokens_only():
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    sel = select_indices(torch.zeros(1, 1, 8), 3, valid, sink_tokens=1, recent_window=2)
    assert sel.indices[sel.mask].tolist() == [2, 6, 7]


def test_priority_equals_adding_max_score():
    scores, valid, priority = random_case(pads=(0, 0, 0), seed=3)
    sel = select_indices(scores, 5, valid, priority=priority)
    boosted = scores + priority[:, None] * scores.amax(dim=-1, keepdim=True)
    expected = boosted.topk(5, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sel.indices, expected)


def test_zero_keep_gives_empty_selection():
    scores, valid, _ = random_case()
    sel = select_indices(scores, 0, valid)
    assert sel.indices.shape == (3, 2, 0) and sel.mask.shape == (3, 2, 0)


def test_token_mask_marks_kept_positions():
    scores, valid, _ = random_case()
    sel = select_indices(scores, torch.tensor([[3, 6], [1, 9], [2, 12]]), valid)
    mask = sel.token_mask(12)
    for b in range(3):
        for h in range(2):
            assert set(torch.nonzero(mask[b, h]).flatten().tolist()) == set(sel.indices[b, h][sel.mask[b, h]].tolist())


def test_gather_kv_matches_indexing_and_keeps_dtype():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 7, 4, generator=gen).bfloat16()
    values = torch.randn(2, 3, 7, 5, generator=gen).bfloat16()
    indices = torch.randint(0, 7, (2, 3, 4), generator=gen)
    k, v = gather_kv(keys, values, Selection(indices, torch.ones(2, 3, 4, dtype=torch.bool)))
    assert k.dtype == torch.bfloat16 and k.shape == (2, 3, 4, 4) and v.shape == (2, 3, 4, 5)
    for b in range(2):
        for h in range(3):
            assert torch.equal(k[b, h], keys[b, h, indices[b, h]])
            assert torch.equal(v[b, h], values[b, h, indices[b, h]])


def test_errors_name_the_problem():
    scores, valid, _ = random_case()
    with pytest.raises(ValueError, match="scores must be"):
        select_indices(scores[0], 3, valid)
    with pytest.raises(ValueError, match="valid must be"):
        select_indices(scores, 3, valid.float())
    with pytest.raises(ValueError, match="priority must be"):
        select_indices(scores, 3, valid, priority=valid[:, :5])
    with pytest.raises(ValueError, match="broadcast"):
        select_indices(scores, torch.ones(3, 5, dtype=torch.long), valid)
    with pytest.raises(ValueError, match="integer"):
        select_indices(scores, torch.tensor([0.5]), valid)
    with pytest.raises(ValueError, match=">= 0"):
        select_indices(scores, -1, valid)
    with pytest.raises(ValueError, match="NaN"):
        select_indices(torch.full_like(scores, float("nan")), 3, valid)
    with pytest.raises(ValueError, match="kv_heads"):
        gather_kv(torch.zeros(3, 2, 12, 4), torch.zeros(3, 2, 11, 4), select_indices(scores, 3, valid))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    scores, valid, priority = random_case()
    keep = torch.tensor([[3, 6], [1, 9], [2, 12]])
    options = {"sink_tokens": 1, "recent_window": 2}
    expected = select_indices(scores, keep, valid, priority=priority, **options)
    got = select_indices(scores.cuda(), keep.cuda(), valid.cuda(), priority=priority.cuda(), **options)
    assert torch.equal(got.indices.cpu(), expected.indices) and torch.equal(got.mask.cpu(), expected.mask)
