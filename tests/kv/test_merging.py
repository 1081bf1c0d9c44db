"""Merging against a plain Python loop over evicted tokens, for every mode."""

from __future__ import annotations

import pytest
import torch

from meda.kv.merging import merge_evicted, scored_targets
from meda.kv.selection import Selection, gather_kv, select_indices


def reference_merge(
    keys, values, selection, valid, mode, scores=None, targets=None, merge_keys=True, threshold=None, cap=None
):
    """Assign each evicted valid token to its most key-cosine-similar kept slot (only slots in ``targets``
    when given; dropped when its best similarity is below ``threshold``), then combine per mode (values
    only when ``merge_keys`` is False); with ``cap``, at most that share of a merged pair comes from the
    pairs it absorbed."""
    keys, values = keys.double(), values.double()
    out_k, out_v = (x.double().clone() for x in gather_kv(keys, values, selection))
    batch, heads, n, _ = keys.shape
    for b in range(batch):
        for h in range(heads):
            kept = {
                int(selection.indices[b, h, s]) for s in range(selection.indices.shape[-1]) if selection.mask[b, h, s]
            }
            slots = [
                s
                for s in range(selection.indices.shape[-1])
                if selection.mask[b, h, s] and (targets is None or targets[b, h, s])
            ]
            groups = {s: [] for s in slots}
            for j in range(n):
                if not valid[b, j] or j in kept or not slots:
                    continue
                sims = [
                    float(torch.cosine_similarity(keys[b, h, j], keys[b, h, selection.indices[b, h, s]], dim=0))
                    for s in slots
                ]
                if threshold is None or max(sims) >= threshold:
                    groups[slots[sims.index(max(sims))]].append(j)
            for s, members in groups.items():
                if not members:
                    continue
                own = int(selection.indices[b, h, s])
                for x, out in ((keys, out_k), (values, out_v))[0 if merge_keys else 1 :]:
                    merged = x[b, h, members]
                    w = scores[b, h, [own, *members]].double() if mode == "weighted" else None
                    if mode == "pivot":
                        share, mean = 0.5, merged.mean(0)
                    elif mode == "weighted" and w.sum() > 0:
                        share, mean = (
                            float(w[1:].sum() / w.sum()),
                            (w[1:, None] * merged).sum(0) / max(w[1:].sum(), 1e-30),
                        )
                    else:  # average, and weighted whose weights sum to 0
                        share, mean = len(members) / (1 + len(members)), merged.mean(0)
                    share = share if cap is None else min(share, cap)
                    out[b, h, s] = (1 - share) * x[b, h, own] + share * mean
    return out_k, out_v


def make_case(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, n = 3, 2, 14  # GQA-shaped: 2 KV heads
    keys = torch.randn(batch, heads, n, 6, generator=gen).to(dtype)
    values = torch.randn(batch, heads, n, 5, generator=gen).to(dtype)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :11] = False
    scores = torch.rand(batch, heads, n, generator=gen)
    keep = torch.tensor([[3, 6], [1, 5], [2, 4]])  # per-head keep; row 2 has 3 valid tokens
    return keys, values, valid, scores, select_indices(scores, keep, valid)


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_matches_loop_reference(mode, chunk):
    keys, values, valid, scores, sel = make_case()
    k, v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, chunk=chunk)
    ref_k, ref_v = reference_merge(keys, values, sel, valid, mode, scores)
    assert k.shape == ref_k.shape and v.shape == ref_v.shape and k.dtype == keys.dtype
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), ref_k * mask)
    torch.testing.assert_close((v * mask).double(), ref_v * mask)


def test_weighted_group_with_zero_weights_falls_back_to_average():
    keys, values, valid, scores, sel = make_case(seed=1)
    zero = torch.zeros_like(scores)
    k, v = merge_evicted(keys, values, sel, valid, mode="weighted", scores=zero)
    avg_k, avg_v = merge_evicted(keys, values, sel, valid, mode="average")
    torch.testing.assert_close(k, avg_k)
    torch.testing.assert_close(v, avg_v)
    torch.testing.assert_close(
        (k * sel.mask[..., None]).double(),
        reference_merge(keys, values, sel, valid, "weighted", zero)[0] * sel.mask[..., None],
    )


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
def test_nothing_evicted_equals_gather_exactly(mode):
    keys, values, valid, scores, _ = make_case(dtype=torch.bfloat16)
    sel = select_indices(scores, 14, valid)
    k, v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores)
    gk, gv = gather_kv(keys, values, sel)
    assert torch.equal(k, gk) and torch.equal(v, gv)


def test_bf16_matches_reference():
    keys, values, valid, _, sel = make_case(seed=2, dtype=torch.bfloat16)
    k, _ = merge_evicted(keys, values, sel, valid, mode="average", chunk=3)
    ref_k, _ = reference_merge(keys.float(), values.float(), sel, valid, "average")
    assert k.dtype == torch.bfloat16
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), (ref_k * mask).bfloat16().double(), rtol=1e-2, atol=1e-2)


def test_similarity_is_chunked(monkeypatch):
    keys, values, valid, _, sel = make_case()
    real_matmul = torch.matmul
    rows = []

    def spy(a, b):
        rows.append(a.shape[-2])
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    merge_evicted(keys, values, sel, valid, chunk=4)
    assert rows and max(rows) <= 4


def test_similarity_steps_stay_under_the_element_cap(monkeypatch):
    """A step never builds more than MAX_SIMILARITIES similarities, whatever ``chunk`` asks, and the result is the
    loop reference's."""
    from meda.kv import merging

    keys, values, valid, scores, sel = make_case()
    batch, heads, width = sel.mask.shape
    monkeypatch.setattr(merging, "MAX_SIMILARITIES", batch * heads * width * 2)  # two evicted positions per step
    real_matmul = torch.matmul
    sizes = []

    def spy(a, b):
        sizes.append(a.shape[:-1].numel() * b.shape[-1])
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    k, v = merge_evicted(keys, values, sel, valid, mode="average", chunk=4096)
    monkeypatch.setattr(torch, "matmul", real_matmul)
    assert sizes and max(sizes) <= merging.MAX_SIMILARITIES and len(sizes) == 7  # 14 positions, 2 per step
    ref_k, ref_v = reference_merge(keys, values, sel, valid, "average", scores)
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), ref_k * mask)
    torch.testing.assert_close((v * mask).double(), ref_v * mask)


def test_errors():
    keys, values, valid, scores, sel = make_case()
    with pytest.raises(ValueError, match="mode must be"):
        merge_evicted(keys, values, sel, valid, mode="max")
    with pytest.raises(ValueError, match="needs scores"):
        merge_evicted(keys, values, sel, valid, mode="weighted")
    with pytest.raises(ValueError, match="non-negative"):
        merge_evicted(keys, values, sel, valid, mode="weighted", scores=-scores)
    with pytest.raises(ValueError, match="valid must be"):
        merge_evicted(keys, values, sel, valid[:, :3])


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
@pytest.mark.parametrize("chunk", [1, 4096])
def test_targets_match_loop_reference(mode, chunk):
    keys, values, valid, scores, sel = make_case(seed=5)
    gen = torch.Generator().manual_seed(7)
    targets = torch.rand(sel.mask.shape, generator=gen) < 0.5
    targets[0, 1] = False  # a head with no allowed slot: its evicted tokens are dropped
    k, v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, targets=targets, chunk=chunk)
    ref_k, ref_v = reference_merge(keys, values, sel, valid, mode, scores, targets=targets)
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), ref_k * mask)
    torch.testing.assert_close((v * mask).double(), ref_v * mask)
    gk, gv = gather_kv(keys, values, sel)
    untouched = (sel.mask & ~targets)[..., None]
    assert torch.equal(k * untouched, gk * untouched) and torch.equal(v * untouched, gv * untouched)
    all_k, all_v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, chunk=chunk)
    every = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, targets=sel.mask.clone(), chunk=chunk)
    assert torch.equal(every[0], all_k) and torch.equal(every[1], all_v)


@pytest.mark.parametrize("mode", ["average", "weighted"])
@pytest.mark.parametrize("merge_keys", [True, False])
@pytest.mark.parametrize("threshold", [None, 0.0, 0.4, 1.0])
def test_values_only_and_threshold_match_loop_reference(mode, merge_keys, threshold):
    keys, values, valid, scores, sel = make_case(seed=6)
    k, v, merged = merge_evicted(
        keys, values, sel, valid, mode=mode, scores=scores, merge_keys=merge_keys, threshold=threshold,
        chunk=4, with_counts=True,
    )  # fmt: skip
    ref_k, ref_v = reference_merge(keys, values, sel, valid, mode, scores, merge_keys=merge_keys, threshold=threshold)
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), ref_k * mask, rtol=1e-5, atol=1e-6)  # float32 output
    torch.testing.assert_close((v * mask).double(), ref_v * mask, rtol=1e-5, atol=1e-6)
    gk, gv = gather_kv(keys, values, sel)
    if not merge_keys:
        assert torch.equal(k, gk)
    evicted = (valid[:, None] & ~sel.token_mask(valid.shape[1])).sum(-1)
    if threshold is None:  # every evicted pair is merged somewhere
        assert torch.equal(merged.long(), evicted)
    elif threshold == 1.0:  # no random pair is that similar: nothing merged, nothing moved
        assert not merged.any() and torch.equal(v, gv)
    else:
        assert (merged <= evicted).all()


def test_scored_targets_exclude_sinks_and_recent_window():
    _, _, valid, scores, _ = make_case()
    sel = select_indices(scores, torch.tensor([[8, 10], [6, 9], [3, 2]]), valid, sink_tokens=2, recent_window=3)
    targets = scored_targets(sel, valid, sink_tokens=2, recent_window=3)
    batch, heads, width = sel.indices.shape
    for b in range(batch):
        positions = [j for j in range(valid.shape[1]) if valid[b, j]]
        protected = set(positions[:2]) | set(positions[-3:])
        for h in range(heads):
            for s in range(width):
                expected = bool(sel.mask[b, h, s]) and int(sel.indices[b, h, s]) not in protected
                assert bool(targets[b, h, s]) == expected, (b, h, s)
    assert not targets[2].any()  # row 2 has 3 valid tokens, all protected
    assert torch.equal(scored_targets(sel, valid), sel.mask)


def test_bad_targets_are_refused():
    keys, values, valid, _, sel = make_case()
    with pytest.raises(ValueError, match="targets must be"):
        merge_evicted(keys, values, sel, valid, targets=sel.mask.float())
    with pytest.raises(ValueError, match="targets must be"):
        merge_evicted(keys, values, sel, valid, targets=sel.mask[..., :1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
def test_cuda_matches_cpu(mode):
    keys, values, valid, scores, sel = make_case(seed=4)
    k, v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, chunk=3)
    on_gpu = Selection(sel.indices.cuda(), sel.mask.cuda())
    gk, gv = merge_evicted(keys.cuda(), values.cuda(), on_gpu, valid.cuda(), mode=mode, scores=scores.cuda(), chunk=3)
    torch.testing.assert_close(gk.cpu(), k)
    torch.testing.assert_close(gv.cpu(), v)


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
@pytest.mark.parametrize("cap", [0.0, 0.2, 0.6, 1.0])
def test_cap_bounds_the_absorbed_share_like_the_loop_reference(mode, cap):
    keys, values, valid, scores, sel = make_case(seed=7)
    k, v = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, cap=cap, chunk=5)
    ref_k, ref_v = reference_merge(keys, values, sel, valid, mode, scores, cap=cap)
    mask = sel.mask[..., None]
    torch.testing.assert_close((k * mask).double(), ref_k * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((v * mask).double(), ref_v * mask, rtol=1e-5, atol=1e-6)
    if cap == 0.0:  # nothing may move
        gk, gv = gather_kv(keys, values, sel)
        assert torch.equal(k * mask, gk * mask) and torch.equal(v * mask, gv * mask)
    if cap == 1.0:  # no share exceeds 1: the same as no cap
        uncapped = merge_evicted(keys, values, sel, valid, mode=mode, scores=scores, chunk=5)
        torch.testing.assert_close(k, uncapped[0])
        torch.testing.assert_close(v, uncapped[1])


def test_cap_outside_zero_one_is_refused():
    keys, values, valid, _scores, sel = make_case()
    with pytest.raises(ValueError, match=r"cap must be None or a share in \[0, 1\]"):
        merge_evicted(keys, values, sel, valid, cap=1.5)
