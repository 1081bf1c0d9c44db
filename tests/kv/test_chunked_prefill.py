"""Prompts that arrive in chunks (``generate(prefill_chunk_size=...)``) or continue a compressed cache.

Budget 1.0 must stay exact chunk by chunk; below 1.0 every layer ends at its budget for the whole
prompt, the report counts the whole prompt and every trim, StreamingLLM keeps exactly the sinks and
the latest tokens, and a prompt continued on a cache the session did not build is reported, not
silently left alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

from meda.kv import compress
from meda.kv.compress import CompressionSession
from meda.kv.recipes import resolve_recipe
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
    if method != "meda":  # uniform layers: the same per-layer counts as one shot
        assert chunked.layer_tokens == one_shot.layer_tokens
    assert chunked.kv_bytes_after < chunked.kv_bytes_before
    assert any("chunk by chunk (3 chunks)" in n for n in chunked.notes)
    assert len(chunked.layer_entropy) == (3 if method == "meda" else 0)


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
