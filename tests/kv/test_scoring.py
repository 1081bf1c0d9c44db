"""Scorers against dense loop references (causal softmax, GQA groups, padding, chunking)."""

from __future__ import annotations

import math

import pytest
import torch

from meda.kv.scoring import causal_logit_chunks, cumulative_attention_scores, window_attention_scores


def make_inputs(batch, kv_heads, group, n, dim, pads=(), n_queries=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_queries = n if n_queries is None else n_queries
    query = torch.randn(batch, kv_heads * group, n_queries, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    return query, key, valid


def reference_attention(query, key, valid, scaling):
    """Dense causal attention probabilities ``[B, Hq, Nq, N]`` by explicit loops."""
    batch, q_heads, n_queries, _ = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    probs = torch.zeros(batch, q_heads, n_queries, n, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for r in range(n_queries):
                pos = n - n_queries + r
                if not valid[b, pos]:
                    continue
                seen = [j for j in range(pos + 1) if valid[b, j]]
                logits = key[b, h // group, seen].double() @ query[b, h, r].double() * scaling
                probs[b, h, r, seen] = torch.softmax(logits, dim=0)
    return probs


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


def per_kv_head(probs, kv_heads):
    batch, q_heads, n_queries, n = probs.shape
    return probs.view(batch, kv_heads, q_heads // kv_heads, n_queries, n).sum(dim=2)


SHAPES = [  # batch, kv_heads, group, tokens, head_dim, left pads
    (1, 1, 1, 5, 4, ()),
    (2, 2, 3, 13, 8, (0, 4)),
    (3, 1, 4, 11, 8, (2, 0, 10)),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_cumulative_matches_loop_reference(shape, chunk):
    batch, kv_heads, group, n, dim, pads = shape
    query, key, valid = make_inputs(batch, kv_heads, group, n, dim, pads)
    scores = cumulative_attention_scores(query, key, valid, scaling=dim**-0.5, query_chunk=chunk)
    expected = per_kv_head(reference_attention(query, key, valid, dim**-0.5), kv_heads).sum(dim=2)
    assert scores.dtype == torch.float32 and scores.shape == (batch, kv_heads, n)
    assert torch.isneginf(scores[~valid[:, None].expand_as(scores)]).all()
    mask = valid[:, None].expand_as(scores)
    assert_close(scores[mask], expected[mask])


def test_cumulative_average_over_queries_divides_by_visible_queries():
    query, key, valid = make_inputs(2, 2, 2, 9, 4, (0, 3))
    scores = cumulative_attention_scores(query, key, valid, scaling=0.5, query_chunk=4, average_over_queries=True)
    probs = per_kv_head(reference_attention(query, key, valid, 0.5), 2).sum(dim=2)
    seen_by = torch.stack([torch.tensor([int(valid[b, j:].sum()) for j in range(9)]) for b in range(2)])
    expected = probs / seen_by.clamp_min(1)[:, None]
    mask = valid[:, None].expand_as(scores)
    assert_close(scores[mask], expected[mask])


def test_cumulative_over_a_query_subset():
    query, key, valid = make_inputs(2, 2, 2, 11, 4, (0, 3))
    rows = torch.tensor([[0, 4, 10], [2, 7, 9]])
    scores = cumulative_attention_scores(query, key, valid, scaling=0.5, query_chunk=2, query_subset=rows)
    probs = per_kv_head(reference_attention(query, key, valid, 0.5), 2)
    expected = torch.stack([probs[b, :, rows[b]].sum(dim=1) for b in range(2)])
    mask = valid[:, None].expand_as(scores)
    assert_close(scores[mask], expected[mask])


def test_cumulative_with_queries_of_a_trailing_chunk():
    query, key, valid = make_inputs(2, 1, 3, 10, 4, (0, 2), n_queries=4)
    scores = cumulative_attention_scores(query, key, valid, scaling=0.3, query_chunk=3)
    expected = per_kv_head(reference_attention(query, key, valid, 0.3), 1).sum(dim=2)
    mask = valid[:, None].expand_as(scores)
    assert_close(scores[mask], expected[mask])


def test_bf16_inputs_are_scored_in_float32():
    query, key, valid = make_inputs(1, 2, 2, 12, 8, dtype=torch.bfloat16)
    scores = cumulative_attention_scores(query, key, valid, scaling=8**-0.5, query_chunk=5)
    expected = per_kv_head(reference_attention(query.float(), key.float(), valid, 8**-0.5), 2).sum(dim=2)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def reference_window(query, key, valid, scaling, window, kernel, pooling="max"):
    kv_heads, n = key.shape[1], key.shape[2]
    probs = per_kv_head(reference_attention(query, key, valid, scaling), kv_heads)
    summed = probs[:, :, -window:].sum(dim=2)
    pooled = summed.clone()
    half = kernel // 2
    for j in range(n):
        neighbours = summed[..., max(0, j - half) : j + half + 1]
        pooled[..., j] = neighbours.amax(dim=-1) if pooling == "max" else neighbours.sum(dim=-1) / kernel
    return pooled.masked_fill(~valid[:, None], -math.inf)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("window", "kernel"), [(1, 1), (3, 3), (4, 7), (32, 5)])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_window_matches_loop_reference(shape, window, kernel, pooling):
    batch, kv_heads, group, n, dim, pads = shape
    query, key, valid = make_inputs(batch, kv_heads, group, n, dim, pads, seed=1)
    scores = window_attention_scores(
        query, key, valid, scaling=dim**-0.5, window=window, pool_kernel=kernel, pooling=pooling
    )
    expected = reference_window(query, key, valid, dim**-0.5, window, kernel, pooling)
    assert scores.dtype == torch.float32
    assert_close(scores, expected)


def test_window_scores_are_finite_at_valid_tokens_including_the_window():
    query, key, valid = make_inputs(2, 2, 2, 10, 4, (0, 3))
    scores = window_attention_scores(query, key, valid, scaling=0.5, window=4, pool_kernel=3)
    assert torch.isfinite(scores[valid[:, None].expand_as(scores)]).all()


def test_chunks_never_hold_more_than_chunk_rows():
    query, key, valid = make_inputs(1, 2, 3, 50, 4)
    shapes = [logits.shape for _, logits, _ in causal_logit_chunks(query, key, valid, scaling=1.0, query_chunk=8)]
    assert max(s[3] for s in shapes) == 8 and sum(s[3] for s in shapes) == 50
    assert all(s[:3] == (1, 2, 3) and s[4] == 50 for s in shapes)


@pytest.mark.parametrize(
    ("query_shape", "key_shape", "valid", "match"),
    [
        ((1, 3, 4, 8), (1, 2, 4, 8), torch.ones(1, 4, dtype=torch.bool), "multiple of KV heads"),
        ((1, 2, 4, 8), (1, 2, 4, 8), torch.ones(1, 4), "bool tensor"),
        ((1, 2, 5, 8), (1, 2, 4, 8), torch.ones(1, 4, dtype=torch.bool), "more queries"),
        ((1, 2, 4, 8), (1, 2, 4, 4), torch.ones(1, 4, dtype=torch.bool), "head_dim"),
    ],
)
def test_bad_inputs_raise(query_shape, key_shape, valid, match):
    with pytest.raises(ValueError, match=match):
        cumulative_attention_scores(torch.zeros(query_shape), torch.zeros(key_shape), valid, scaling=1.0)


def test_bad_pooling_raises():
    query, key, valid = make_inputs(1, 1, 1, 6, 4)
    with pytest.raises(ValueError, match="odd"):
        window_attention_scores(query, key, valid, scaling=1.0, pool_kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        window_attention_scores(query, key, valid, scaling=1.0, pooling="mean")


def test_non_contiguous_queries_from_a_projection():
    query, key, valid = make_inputs(1, 2, 2, 9, 4)
    transposed = query.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, N, D] view of [B, N, Hq, D]
    assert not transposed.is_contiguous()
    assert torch.equal(
        cumulative_attention_scores(transposed, key, valid, scaling=0.5),
        cumulative_attention_scores(query, key, valid, scaling=0.5),
    )


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu():
    query, key, valid = make_inputs(2, 2, 3, 300, 16, (0, 37), dtype=torch.bfloat16)
    on_gpu = [t.cuda() for t in (query, key, valid)]
    for scorer, options in ((cumulative_attention_scores, {"query_chunk": 64}), (window_attention_scores, {})):
        got = scorer(*on_gpu, scaling=0.25, **options)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), scorer(query, key, valid, scaling=0.25, **options), rtol=1e-4, atol=1e-4)
