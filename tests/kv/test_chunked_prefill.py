"""Prompts that arrive in chunks (``generate(prefill_chunk_size=...)``) or continue a compressed cache.

Budget 1.0 must stay exact chunk by chunk; below 1.0 every layer ends at its budget for the whole
prompt, the report counts the whole prompt and every trim, StreamingLLM keeps exactly the sinks and
the latest tokens, and a prompt continued on a cache the session did not build is reported, not
silently left alone.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import DynamicCache

from meda.kv import compress
from meda.kv.recipes import resolve_recipe
from meda.kv.session import CompressionSession
from meda.kv.tiny import build_tiny

NEW = 5


@functools.cache
def tiny(family: str = "llama"):
    return build_tiny(family, num_hidden_layers=3)


def greedy(model, inputs, **kw):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw)


@pytest.mark.parametrize(
    ("method", "batch"),
    [("meda", 1), ("meda", 2), ("h2o", 2), ("snapkv", 2), ("adakv", 2), ("pyramidkv", 2), ("streamingllm", 2)],
)
def test_chunked_prefill_exact_at_full_budget(method: str, batch: int) -> None:
    t = tiny()
    inputs = t.inputs(batch, lengths=[96, 84][:batch])
    ref = greedy(t.model, inputs)
    opts = {"window": 8} if method in ("snapkv", "adakv", "pyramidkv", "meda") else {}
    with compress(t.model, method, 1.0, **opts) as report:
        out = greedy(t.model, inputs, prefill_chunk_size=40)
    assert torch.equal(out, ref)
    assert report.compressions == 3  # 96 columns in chunks of 40: one compression and two trims
    assert report.prefill_tokens == round(float(inputs["attention_mask"].sum(-1).float().mean()))


def test_chunked_prefill_exact_at_full_budget_with_eager_attention() -> None:
    t = build_tiny("llama", num_hidden_layers=2, attn_implementation="eager")
    inputs = t.inputs(2, lengths=[90, 70])
    ref = greedy(t.model, inputs)
    for method in ("h2o", "adakv"):  # one mask broadcast over heads; per-head masks (uneven heads)
        with compress(t.model, method, 1.0, window=8):
            assert torch.equal(greedy(t.model, inputs, prefill_chunk_size=32), ref)


@pytest.mark.parametrize("method", ["meda", "h2o", "snapkv", "adakv"])
def test_chunked_prefill_ends_at_the_whole_prompt_budget(method: str) -> None:
    t = tiny()
    inputs = t.inputs(1, lengths=[96])
    with compress(t.model, method, 0.25) as one_shot:
        greedy(t.model, inputs)
    with compress(t.model, method, 0.25) as chunked:
        greedy(t.model, inputs, prefill_chunk_size=32)
    assert chunked.prefill_tokens == one_shot.prefill_tokens == 96
    assert chunked.compressions == 3
    assert sum(chunked.layer_tokens) == pytest.approx(0.25 * 96 * 3, abs=3)
    # uniform layers (meda too, on this text prompt): the same per-layer counts as one shot
    assert chunked.layer_tokens == one_shot.layer_tokens
    assert chunked.kv_bytes_after < chunked.kv_bytes_before
    assert any("chunk by chunk (3 chunks)" in n for n in chunked.notes)
    assert chunked.layer_entropy == one_shot.layer_entropy == []  # text only: no entropy measured


def _session(model, method: str, budget):
    from meda.kv import attention

    attention.register()
    return CompressionSession(model, method, resolve_recipe(method), budget)


def test_streamingllm_chunked_keeps_sinks_and_latest_tokens() -> None:
    t = tiny()
    inputs = t.inputs(1, lengths=[100])
    session = _session(t.model, "streamingllm", 20)
    session.attach()
    try:
        greedy(t.model, inputs, prefill_chunk_size=30)
    finally:
        session.detach()
    for state in session._chunks.layers.values():
        kept = sorted(state.position[0, 0].tolist())
        assert kept == [0, 1, 2, 3, *range(84, 100)]


def test_prompt_continued_on_the_compressed_cache_is_compressed() -> None:
    t = tiny()
    first = t.inputs(1, lengths=[80])
    with compress(t.model, "h2o", 0.25) as report, torch.inference_mode():
        out = t.model.generate(**first, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        more = torch.randint(5, 100, (1, 40), generator=torch.Generator().manual_seed(3))
        ids = torch.cat([out.sequences, more], dim=1)
        t.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=out.past_key_values,
            max_new_tokens=NEW,
            do_sample=False,
        )
    assert report.compressions == 2
    # 80 prompt tokens, 4 decoded tokens already in the cache, then the 5th decoded token and 40 new ones
    assert report.prefill_tokens == 80 + NEW + 40
    assert sum(report.layer_tokens) == round(0.25 * report.prefill_tokens * 3)  # uniform layers, largest remainder
    assert max(report.layer_tokens) - min(report.layer_tokens) <= 1


def test_prompt_continued_on_a_foreign_cache_is_reported() -> None:
    t = tiny()
    first = t.inputs(1, lengths=[60])
    cache = DynamicCache(config=t.model.config)
    with torch.inference_mode():
        t.model(**first, past_key_values=cache, use_cache=True)
    more = torch.randint(5, 100, (1, 20), generator=torch.Generator().manual_seed(4))
    with compress(t.model, "h2o", 0.25) as report, torch.inference_mode():
        t.model(input_ids=more, past_key_values=cache, use_cache=True)
    assert report.compressions == 0
    assert any("did not compress: left uncompressed" in n for n in report.notes)
    assert cache.get_seq_length() == 80


def test_continued_prompt_on_a_vlm_cache_is_compressed() -> None:
    t = build_tiny("qwen2_vl", num_hidden_layers=2)
    first = t.inputs(1)
    with compress(t.model, "meda", 0.5) as report, torch.inference_mode():
        out = t.model.generate(**first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        more = torch.randint(5, 100, (1, 24), generator=torch.Generator().manual_seed(5))
        ids = torch.cat([out.sequences, more], dim=1)
        mm = torch.cat([first["mm_token_type_ids"], torch.zeros_like(ids[:, first["input_ids"].shape[1] :])], dim=1)
        t.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=mm,
            past_key_values=out.past_key_values,
            max_new_tokens=2,
            do_sample=False,
        )
    assert report.compressions == 2
    assert report.groups == "vision"
    assert report.prefill_tokens == first["input_ids"].shape[1] + 2 + 24  # prompt, 2 decoded, 24 new


def test_static_decode_after_a_chunked_prompt_matches_dynamic() -> None:
    t = tiny()
    inputs = t.inputs(2, lengths=[80, 70])
    with compress(t.model, "h2o", 0.5) as dynamic:
        ref = greedy(t.model, inputs, prefill_chunk_size=32)
    with compress(t.model, "h2o", 0.5, decode="static") as static:
        out = greedy(t.model, inputs, prefill_chunk_size=32)
    assert torch.equal(out, ref)
    assert static.layer_tokens == dynamic.layer_tokens
    assert static.compressions == dynamic.compressions == 3


def test_allocator_without_running_statistics_refuses_chunks() -> None:
    t = tiny()
    inputs = t.inputs(1, lengths=[96])
    with compress(t.model, "vlcache", 0.5, window=8), pytest.raises(NotImplementedError, match="chunk by chunk"):
        greedy(t.model, inputs, prefill_chunk_size=40)


# ---- prompt chunks without a materialised mask -------------------------------------------------------


def test_lower_right_attention_matches_sdpa_with_the_explicit_mask() -> None:
    from torch.nn.attention.bias import causal_lower_right

    from meda.kv.attention import lower_right_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in [(6, 5), (2, 13), (2, 13)])
    module = torch.nn.Module().eval()
    out, _ = lower_right_attention(module, q, k, v, causal_lower_right(5, 13), scaling=0.3)
    # plain reference: query i (of 5) sees keys 0 .. 8 + i (of 13), each query head its KV head h // 3
    mask = torch.arange(13)[None, :] <= torch.arange(5)[:, None] + 8
    scores = q @ k.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.3
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.repeat_interleave(3, dim=1)
    assert out.shape == (2, 5, 6, 16)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_attention_mask_for_a_chunk_is_lower_right_only_where_every_slot_is_valid() -> None:
    from torch.nn.attention.bias import CausalBias

    from meda.kv.cache import CompressedLayer, attention_mask_for

    keys = torch.zeros(1, 2, 10, 4)
    full = CompressedLayer(keys, keys, torch.ones(1, 2, 10, dtype=torch.bool), 30)
    holes = CompressedLayer(keys, keys, torch.ones(1, 2, 10, dtype=torch.bool).index_fill(2, torch.tensor([1]), 0), 30)
    assert isinstance(attention_mask_for(full, 4, 3, torch.float32, additive=False), CausalBias)
    assert attention_mask_for(full, 4, 3, torch.float32, additive=True).shape == (1, 6, 4, 10)  # eager: a tensor
    assert attention_mask_for(holes, 4, 3, torch.float32, additive=False).shape == (1, 6, 4, 10)
    assert attention_mask_for(full, 1, 3, torch.float32, additive=False) is None


def test_chunks_over_the_compressed_cache_skip_transformers_causal_mask(monkeypatch) -> None:
    """transformers' full causal mask is built for the first chunk (empty cache) only; the later chunks attend
    through the lower-right bias, and their logits equal those of the explicit-mask path."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from meda.kv import cache

    t = tiny()
    inputs = t.inputs(1, lengths=[96])
    built = []
    stock = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args, **kwargs):  # the stock function, which meda's mask function wraps at every compress(...)
        built.append(kwargs["q_length"])
        return stock(*args, **kwargs)

    def scores():
        with compress(t.model, "snapkv", 0.5, window=8), torch.inference_mode():
            out = t.model.generate(
                **inputs, max_new_tokens=NEW, do_sample=False, prefill_chunk_size=32,
                output_scores=True, return_dict_in_generate=True,
            )
        return torch.stack(out.scores)

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa", spy)
    fast = scores()
    assert [q for q in built if q > 1] == [32]  # the first of three chunks; decode steps still get theirs
    # the explicit-mask path: the same lower-right pattern as a bool tensor
    monkeypatch.setattr(cache, "causal_lower_right", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q))
    torch.testing.assert_close(scores(), fast)


@pytest.mark.parametrize("method", ["full", "meda"])
def test_vlm_prompt_with_images_in_chunks_is_exact_at_full_budget(method: str) -> None:
    """Qwen2-VL with pixel_values, prefilled in chunks (image tokens split across chunks), budget 1.0."""
    t = build_tiny("qwen2_vl", num_hidden_layers=2)
    inputs = t.inputs(2, lengths=[96, 96])
    ref = greedy(t.model, inputs)
    try:
        stock = greedy(t.model, inputs, prefill_chunk_size=32)
    except RuntimeError as err:  # transformers 5.17 fails here by itself, without meda
        pytest.skip(f"this transformers cannot prefill Qwen2-VL in chunks: {err}")
    assert torch.equal(stock, ref)
    with compress(t.model, method, 1.0) as report:
        out = greedy(t.model, inputs, prefill_chunk_size=32)
    assert torch.equal(out, ref)
    assert report.prefill_tokens == 96
    if method == "meda":  # the first chunk is text only (images at 39-86): entropy measured from the images on
        assert report.groups == "vision"
        assert len(report.layer_entropy) == 2 and all(math.isfinite(e) and e > 0 for e in report.layer_entropy)


def test_vlm_chunks_after_a_text_only_first_chunk_allocate_by_entropy() -> None:
    """MEDA skips the entropy on a text-only first chunk; the image chunks after it give entropy budgets."""
    t = build_tiny("qwen2_vl", num_hidden_layers=2)
    inputs = t.inputs(2, lengths=[96, 96])
    try:
        greedy(t.model, inputs, prefill_chunk_size=32)
    except RuntimeError as err:  # transformers 5.17 fails here by itself, without meda
        pytest.skip(f"this transformers cannot prefill Qwen2-VL in chunks: {err}")
    with compress(t.model, "meda", 0.4) as report:
        greedy(t.model, inputs, prefill_chunk_size=32)
    assert report.groups == "vision" and report.compressions == 3
    assert not any("no vision tokens" in n for n in report.notes)
    assert len(report.layer_entropy) == 2 and all(math.isfinite(e) and e > 0 for e in report.layer_entropy)
    assert len(set(report.layer_fractions)) > 1  # the entropy allocator, not uniform budgets


def test_valid_slot_attention_matches_sdpa_with_the_explicit_mask() -> None:
    """Rows with holes among the kept slots, one row whose KV heads differ: the gathered attention equals the mask."""
    from types import SimpleNamespace

    from meda.kv.attention import valid_slot_attention
    from meda.kv.cache import ValidSlots, attention_mask_for

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in [(6, 5), (2, 14), (2, 14)])
    key_mask = torch.ones(2, 2, 14, dtype=torch.bool)
    key_mask[0, :, 6:9] = False  # row 0: both heads kept 6 of 9 slots
    key_mask[1, 0, [2, 8]] = False  # row 1: the heads kept different slots
    key_mask[1, 1, 0] = False
    out, _ = valid_slot_attention(torch.nn.Module().eval(), q, k, v, ValidSlots(key_mask), scaling=0.3)
    mask = attention_mask_for(SimpleNamespace(key_mask=key_mask, all_valid=False), 5, 3, q.dtype, additive=False)
    scores = q @ k.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.3
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.repeat_interleave(3, dim=1)
    assert out.shape == (2, 5, 6, 16)
    torch.testing.assert_close(out, ref.transpose(1, 2))


@pytest.mark.parametrize("method", ["meda", "adakv"])
def test_chunks_over_kept_slots_with_holes_skip_the_explicit_mask(method: str, monkeypatch) -> None:
    """A padded batch below budget 1.0 keeps a different number of tokens per row (MEDA: per-row entropy budgets;
    AdaKV: per-head budgets), so later chunks see empty slots: they attend over the gathered valid slots, with the
    logits of the explicit-mask path."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from meda.kv import attention
    from meda.kv.cache import attention_mask_for

    t = tiny()
    inputs = t.inputs(2, lengths=[96, 84])
    calls = []
    gathered = attention.valid_slot_attention

    def spy(module, query, key, value, slots, **kwargs):
        calls.append(module.layer_idx)
        return gathered(module, query, key, value, slots, **kwargs)

    def explicit(module, query, key, value, slots, **kwargs):  # the reference: SDPA with the full bool mask
        layer = SimpleNamespace(key_mask=slots.key_mask, all_valid=False)
        mask = attention_mask_for(layer, query.shape[-2], query.shape[1] // key.shape[1], query.dtype, False)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    def scores():
        with compress(t.model, method, 0.5, window=8), torch.inference_mode():
            out = t.model.generate(
                **inputs, max_new_tokens=NEW, do_sample=False, prefill_chunk_size=32,
                output_scores=True, return_dict_in_generate=True,
            )
        return out.sequences, torch.stack(out.scores)

    monkeypatch.setattr(attention, "valid_slot_attention", spy)
    fast_tokens, fast = scores()
    assert calls, "no chunk attended over slots with holes: the test does not exercise the gathered path"
    monkeypatch.setattr(attention, "valid_slot_attention", explicit)
    ref_tokens, ref = scores()
    torch.testing.assert_close(fast, ref)
    assert torch.equal(fast_tokens, ref_tokens)
