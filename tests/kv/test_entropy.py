"""Cross-modal entropy against a dense loop reference and a dense tensor reference (the former PyTorch path)."""

from __future__ import annotations

import math

import pytest
import torch

from meda.kv.entropy import cross_modal_entropy, cross_modal_entropy_sums


def make_inputs(batch, kv_heads, group, n, dim, pads=(), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, n, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    vision = torch.rand(batch, n, generator=gen) < 0.5
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    return query, key, vision, valid


def reference_entropy(query, key, vision, valid, scaling, rows=None):
    """E = mean_h (E_TV + E_VT) by explicit loops over rows, skipping rows with no visible other-group key."""
    batch, q_heads, n, _ = query.shape
    group = q_heads // key.shape[1]
    out = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        positions = range(n) if rows is None else rows[b]
        for h in range(q_heads):
            sums, counts = [0.0, 0.0], [0, 0]
            for i in positions:
                if not valid[b, i]:
                    continue
                is_vision = bool(vision[b, i])
                seen = [j for j in range(i + 1) if valid[b, j] and bool(vision[b, j]) != is_vision]
                if not seen:
                    continue
                logits = key[b, h // group, seen].double() @ query[b, h, i].double() * scaling
                p = torch.softmax(logits, dim=0)
                sums[is_vision] += float(-(p * p.log()).sum())
                counts[is_vision] += 1
            out[b] += sum(s / c for s, c in zip(sums, counts, strict=True) if c) / q_heads
    return out


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 6, 4, ()), (2, 2, 3, 13, 8, (0, 5)), (3, 1, 2, 9, 4, (3, 0, 8))],
)
@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_matches_loop_reference(shape, chunk):
    batch, kv_heads, group, n, dim, pads = shape
    query, key, vision, valid = make_inputs(batch, kv_heads, group, n, dim, pads)
    got = cross_modal_entropy(query, key, vision, valid, scaling=dim**-0.5, query_chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (batch,)
    torch.testing.assert_close(
        got.double(), reference_entropy(query, key, vision, valid, dim**-0.5), rtol=1e-5, atol=1e-6
    )


def test_bf16_inputs():
    query, key, vision, valid = make_inputs(2, 2, 2, 11, 8, (0, 2), dtype=torch.bfloat16)
    got = cross_modal_entropy(query, key, vision, valid, scaling=8**-0.5, query_chunk=3)
    expected = reference_entropy(query.float(), key.float(), vision, valid, 8**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_query_subset_shared_and_per_row():
    query, key, vision, valid = make_inputs(2, 1, 3, 12, 4, (0, 3))
    shared = torch.tensor([0, 5, 7, 11])
    got = cross_modal_entropy(query, key, vision, valid, scaling=0.5, query_chunk=3, query_subset=shared)
    expected = reference_entropy(query, key, vision, valid, 0.5, rows=[shared.tolist()] * 2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    per_row = torch.tensor([[1, 2, 9], [4, 10, 11]])
    got = cross_modal_entropy(query, key, vision, valid, scaling=0.5, query_subset=per_row)
    expected = reference_entropy(query, key, vision, valid, 0.5, rows=per_row.tolist())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_uniform_attention_gives_log_of_visible_count():
    # Zero keys give uniform attention, so a row's entropy is log(#visible keys of the other group).
    # Tokens T V V T T V: text 0 sees no vision key (skipped); vision 1 and 2 see text {0} (entropy 0);
    # text 3 and 4 see vision {1, 2}; vision 5 sees text {0, 3, 4}.
    n = 6
    query = torch.randn(1, 2, n, 4)
    key = torch.zeros(1, 1, n, 4)
    vision = torch.tensor([[False, True, True, False, False, True]])
    valid = torch.ones(1, n, dtype=torch.bool)
    got = cross_modal_entropy(query, key, vision, valid, scaling=1.0)
    expected = math.log(2) + (0 + 0 + math.log(3)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_single_group_gives_zero():
    query, key, _, valid = make_inputs(2, 1, 2, 7, 4, (0, 2))
    for vision in (torch.zeros_like(valid), torch.ones_like(valid)):
        assert torch.equal(cross_modal_entropy(query, key, vision, valid, scaling=1.0), torch.zeros(2))


def test_bad_vision_mask_raises():
    query, key, _, valid = make_inputs(1, 1, 1, 5, 4)
    with pytest.raises(ValueError, match="vision"):
        cross_modal_entropy(query, key, torch.zeros(1, 5), valid, scaling=1.0)
    with pytest.raises(ValueError, match="query rows"):
        cross_modal_entropy(query, key, valid, valid, scaling=1.0, query_subset=torch.tensor([5]))


def dense_reference_sums(query, key, vision, valid, *, scaling, softcap=None, query_subset=None):
    """The plain dense computation: every chosen query row against all N keys, same-group keys masked out.

    Returns ``(sums [B, 2], counts [B, 2])`` over (text rows, vision rows), like ``cross_modal_entropy_sums``.
    """
    batch, q_heads, n_queries, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    rows = (torch.arange(n_queries) if query_subset is None else query_subset).expand(batch, -1)  # [B, S]
    positions = rows + (n - n_queries)
    q = query.float().gather(2, rows[:, None, :, None].expand(-1, q_heads, -1, dim))  # [B, Hq, S, D]
    k = key.float().repeat_interleave(q_heads // kv_heads, dim=1)  # [B, Hq, N, D]
    logits = q @ k.transpose(-1, -2) * scaling  # [B, Hq, S, N]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    query_vision = vision.gather(1, positions)  # [B, S]
    seen = (
        (torch.arange(n) <= positions[..., None])
        & valid[:, None, :]
        & valid.gather(1, positions)[..., None]
        & (vision[:, None, :] != query_vision[..., None])
    )  # [B, S, N]
    log_p = logits.masked_fill(~seen[:, None], float("-inf")).log_softmax(dim=-1)
    row_entropy = -(log_p.exp() * log_p).masked_fill(~seen[:, None], 0.0).sum(dim=(-1, 1))  # [B, S]
    side = torch.stack((~query_vision, query_vision), dim=-1) & seen.any(dim=-1)[..., None]  # [B, S, 2]
    return (row_entropy[..., None] * side).sum(dim=1), side.sum(dim=1).float()


# Token layouts of N = 24 ('t' text, 'v' vision, 'p' padding, 'P' padding flagged as vision).
LAYOUTS = {
    "padded_interleaved": "pPttvvvvvvttvvvvvvvttttt",
    "vision_first": "vvvvvvvtttvvvvvvvvvttttt",
    "no_vision": "tttttttttttttttttttttttt",
}


@pytest.mark.parametrize(
    "layout",
    [("padded_interleaved", "vision_first"), ("vision_first", "no_vision"), ("no_vision", "padded_interleaved")],
)
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("n_queries", [24, 17])
@pytest.mark.parametrize("subset", ["all", "shared", "per_row"])
@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_sums_match_dense_reference(layout, softcap, n_queries, subset, chunk):
    gen = torch.Generator().manual_seed(1)
    n, dim = 24, 8
    query = torch.randn(2, 4, n_queries, dim, generator=gen) * 2  # Hq = 4 over Hkv = 2 (G = 2)
    key = torch.randn(2, 2, n, dim, generator=gen)
    vision = torch.tensor([[c in "vP" for c in LAYOUTS[name]] for name in layout])
    valid = torch.tensor([[c not in "pP" for c in LAYOUTS[name]] for name in layout])
    rows = {
        "all": None,
        "shared": torch.tensor([0, 3, 4, 9, n_queries - 1]),
        "per_row": torch.tensor([[n_queries - 1, 2, 5, 5, 11], [1, 8, 12, 15, 0]]),
    }[subset]
    options = {"scaling": dim**-0.5, "softcap": softcap, "query_subset": rows}
    sums, counts = cross_modal_entropy_sums(query, key, vision, valid, query_chunk=chunk, **options)
    expected_sums, expected_counts = dense_reference_sums(query, key, vision, valid, **options)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-5)


def test_bad_query_chunk_raises():
    query, key, vision, valid = make_inputs(1, 1, 1, 5, 4)
    with pytest.raises(ValueError, match="query_chunk"):
        cross_modal_entropy(query, key, vision, valid, scaling=1.0, query_chunk=0)


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu():
    query, key, vision, valid = make_inputs(2, 2, 3, 300, 16, (0, 37), dtype=torch.bfloat16)
    subset = torch.tensor([[5, 100, 299], [40, 41, 200]])
    for rows in (None, subset):
        got = cross_modal_entropy(*(t.cuda() for t in (query, key, vision, valid)), scaling=0.25, query_subset=rows)
        expected = cross_modal_entropy(query, key, vision, valid, scaling=0.25, query_subset=rows)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
