"""The compression engine end to end on tiny random models of every supported family.

Budget 1.0 must reproduce the uncompressed greedy output token for token; below 1.0 a
left-padded batch must give each row what that prompt gives alone (per-layer key masks
are right), kept tokens must follow the allocation, and reported bytes must be real.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

from meda.kv import METHODS, compress
from meda.kv.cache import CompressedLayer
from meda.kv.recipes import resolve_recipe
from meda.kv.tiny import FAMILIES, VLM_FAMILIES, build_tiny

NEW_TOKENS = 6


@functools.cache
def tiny(family: str, attn: str = "sdpa"):
    return build_tiny(family, attn_implementation=attn)


def greedy(model, inputs, n: int = NEW_TOKENS):
    with torch.inference_mode():
        return model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_reproduces_uncompressed_output(family: str, attn: str, batch: int) -> None:
    t = tiny(family, attn)
    inputs = t.inputs(batch)
    ref = greedy(t.model, inputs).sequences
    for method in ("full", "meda", "adakv"):
        with compress(t.model, method=method, budget=1.0) as report:
            out = greedy(t.model, inputs).sequences
        assert torch.equal(out, ref), f"{method} at budget 1.0 changed the output of {family}/{attn}/batch {batch}"
        assert report.compressions == 1
    assert report.kv_bytes_before > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_inputs_keep_mrope_positions(family: str) -> None:
    t = tiny(family)
    inputs = t.inputs(1, video=True)
    ref = greedy(t.model, inputs).sequences
    with compress(t.model, method="meda", budget=1.0) as report:
        out = greedy(t.model, inputs).sequences
    assert torch.equal(out, ref)
    assert report.groups == "vision"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_every_method_exact_at_full_budget_on_padded_batch(method: str) -> None:
    t = tiny("llama")
    inputs = t.inputs(3)
    ref = greedy(t.model, inputs).sequences
    with compress(t.model, method=method, budget=1.0):
        out = greedy(t.model, inputs).sequences
    assert torch.equal(out, ref)


def _rows_match_single_prompts(t, method: str, budget: float, video: bool = False) -> None:
    lengths = [96, 112, 80]
    batch_inputs = t.inputs(3, lengths=lengths, video=video, seed=5)
    with compress(t.model, method=method, budget=budget) as report:
        batched = greedy(t.model, batch_inputs)
    assert report.prefill_tokens == round(sum(lengths) / 3)
    width = batch_inputs["input_ids"].shape[1]
    for i, length in enumerate(lengths):
        single_inputs = t.inputs(1, lengths=[length], video=video, seed=5 + i)
        with compress(t.model, method=method, budget=budget):
            single = greedy(t.model, single_inputs)
        assert torch.equal(batched.sequences[i, width:], single.sequences[0, length:]), f"row {i} differs"
        for step_b, step_s in zip(batched.scores, single.scores, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_rows_match_single_prompts_when_compressed(family: str, attn: str) -> None:
    """Per-layer caches of different lengths, padded rows and per-row budgets, under both attentions."""
    _rows_match_single_prompts(tiny(family, attn), "meda", 0.3)


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "adakv"])
def test_padded_batch_rows_match_single_prompts_for_baselines(method: str) -> None:
    _rows_match_single_prompts(tiny("qwen2"), method, 0.3)


def test_padded_video_batch_rows_match_single_prompts() -> None:
    _rows_match_single_prompts(tiny("qwen2_vl"), "meda", 0.3, video=True)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv", "meda", "streamingllm"])
@pytest.mark.parametrize("budget", [0.1, 0.35, 40])
def test_kept_tokens_follow_allocation_and_bytes_are_real(method: str, budget: float | int) -> None:
    t = tiny("qwen2_vl")
    inputs = t.inputs(1, lengths=[112])
    n = 112
    cache = DynamicCache(config=t.model.config)
    with torch.inference_mode(), compress(t.model, method=method, budget=budget) as report:
        t.model(**inputs, past_key_values=cache, use_cache=True)
    rho = budget if isinstance(budget, float) else budget / n
    layers = [layer for layer in cache.layers]
    assert all(isinstance(layer, CompressedLayer) for layer in layers)
    assert report.prefill_tokens == n
    mean_kept = sum(report.layer_tokens) / len(report.layer_tokens)
    assert abs(mean_kept - rho * n) <= 1.0
    for kept, frac in zip(report.layer_tokens, report.layer_fractions, strict=True):
        assert abs(kept - frac * n) <= 1.0
    real = sum(x.numel() * x.element_size() for layer in layers for x in (layer.keys, layer.values, layer.key_mask))
    assert report.kv_bytes_after == real
    cfg = t.model.config.get_text_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * n * head_dim * 4
    assert report.kv_bytes_before == full
    assert report.kv_bytes_after < full * (rho + 0.1)
    assert report.evicted_tokens == pytest.approx(sum(n - k for k in report.layer_tokens), abs=len(layers))


def test_padding_never_kept_in_place_of_real_tokens() -> None:
    t = tiny("llama")
    inputs = t.inputs(3, lengths=[96, 112, 80])
    cache = DynamicCache(config=t.model.config)
    with torch.inference_mode(), compress(t.model, method="snapkv", budget=1.0):
        t.model(**inputs, past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 112
        assert layer.key_mask.sum(-1).tolist() == [[96] * 2, [112] * 2, [80] * 2]


def test_meda_budgets_follow_entropy() -> None:
    t = tiny("llava")
    with torch.inference_mode(), compress(t.model, method="meda", budget=0.3) as report:
        t.model.generate(**t.inputs(1), max_new_tokens=2, do_sample=False)
    assert report.groups == "vision"
    assert len(report.layer_entropy) == len(report.layer_tokens)
    order_e = sorted(range(len(report.layer_entropy)), key=report.layer_entropy.__getitem__)
    order_f = sorted(range(len(report.layer_fractions)), key=report.layer_fractions.__getitem__)
    assert order_e == order_f  # softmax is monotone: more entropy, more budget
    assert sum(report.layer_fractions) / len(report.layer_fractions) == pytest.approx(0.3, abs=1e-6)


def test_meda_uses_uniform_budgets_on_text_only_prompts() -> None:
    """Without vision tokens ``meda`` allocates as SnapKV does (the same kept tokens, so the same answer);
    ``text_only_allocator=None`` keeps the entropy allocator there, with uneven budgets."""
    t, inputs = tiny("llama"), tiny("llama").inputs(2)
    runs = {}
    for name, method, options in [
        ("snapkv", "snapkv", {}), ("meda", "meda", {}), ("entropy", "meda", {"text_only_allocator": None})
    ]:  # fmt: skip
        with compress(t.model, method=method, budget=0.3, **options) as report:
            runs[name] = (greedy(t.model, inputs), report)
    (snap_out, snap), (meda_out, meda), (_, entropy) = runs["snapkv"], runs["meda"], runs["entropy"]
    assert meda.groups == "text" and meda.layer_fractions == snap.layer_fractions
    assert meda.layer_tokens == snap.layer_tokens and torch.equal(meda_out.sequences, snap_out.sequences)
    assert torch.equal(torch.stack(meda_out.scores), torch.stack(snap_out.scores))
    assert any("layer budgets from the 'uniform' allocator, not 'entropy'" in n for n in meda.notes)
    assert meda.layer_entropy == [] and len(entropy.layer_entropy) == len(entropy.layer_tokens)  # not measured
    assert len(set(entropy.layer_fractions)) > 1  # the entropy allocator on the same prompt: uneven budgets
    assert not any("'uniform' allocator" in n for n in entropy.notes)


def test_meda_keeps_entropy_budgets_when_the_prompt_has_images() -> None:
    t = tiny("llava")
    with torch.inference_mode(), compress(t.model, method="meda", budget=0.3) as report:
        t.model.generate(**t.inputs(1), max_new_tokens=2, do_sample=False)
    assert report.groups == "vision" and len(set(report.layer_fractions)) > 1
    assert not any("allocator" in n for n in report.notes)
    with pytest.raises(ValueError, match="text_only_allocator='flat'"):
        resolve_recipe("meda", text_only_allocator="flat")


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, -0.2, 1.5, float("nan"), 0, True, "0.2"])
def test_bad_budget_is_a_clear_error(budget) -> None:
    t = tiny("llama")
    with pytest.raises((ValueError, TypeError), match="budget"), compress(t.model, method="meda", budget=budget):
        pass


def test_unknown_method_and_option() -> None:
    t = tiny("llama")
    with pytest.raises(ValueError, match="unknown method"), compress(t.model, method="kvzip", budget=0.2):
        pass
    with pytest.raises(ValueError, match="unknown option"), compress(t.model, method="meda", budget=0.2, temp=2):
        pass


def test_prompt_shorter_than_window_is_a_clear_error() -> None:
    t = tiny("llama")
    inputs = t.inputs(1, lengths=[24])
    with pytest.raises(ValueError, match="observation window"), compress(t.model, method="snapkv", budget=0.5):
        greedy(t.model, inputs)


def test_window_clipped_to_budget_is_reported() -> None:
    t = tiny("llama")
    with compress(t.model, method="h2o", budget=0.1) as report:
        greedy(t.model, t.inputs(1))
    assert report.clipped.get("recent_window") == len(report.layer_tokens)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_prompt_without_images_falls_back_to_text_groups(family: str) -> None:
    t = tiny(family)
    text_only = tiny("llama").inputs(1)  # ids below every vision placeholder id
    with compress(t.model, method="meda", budget=0.3) as report:
        greedy(t.model, {k: text_only[k] for k in ("input_ids", "attention_mask")})
    assert report.groups == "text"
    assert any("no vision tokens" in note for note in report.notes)


def test_unsupported_family_is_named() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(num_hidden_layers=1, hidden_size=32, vocab_size=64))
    with pytest.raises(NotImplementedError, match="MambaForCausalLM"), compress(model, method="meda", budget=0.2):
        pass


def test_flash_attention_is_refused_with_the_fix() -> None:
    t = build_tiny("llama")
    t.model.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="sdpa"), compress(t.model, method="meda", budget=0.2):
        pass


def test_context_manager_restores_the_model() -> None:
    t = tiny("llama")
    before = t.model.config._attn_implementation
    with compress(t.model, method="meda", budget=0.3):
        assert t.model.config._attn_implementation.startswith("meda_")
    assert t.model.config._attn_implementation == before
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks


def test_beam_search_and_sampling_through_a_compressed_cache() -> None:
    """Beam search reorders cache rows (and their key masks); sampling takes the same path as greedy."""
    t = tiny("qwen2")
    inputs = t.inputs(2)
    with torch.inference_mode():
        ref = t.model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False)
        with compress(t.model, "meda", 1.0):
            out = t.model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False)
        assert torch.equal(out, ref)
        with compress(t.model, "meda", 0.3) as report:
            out = t.model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False)
        assert out.shape == ref.shape and report.kept_fraction == pytest.approx(0.3, abs=0.02)
        torch.manual_seed(0)
        ref = t.model.generate(**inputs, max_new_tokens=5, do_sample=True)
        with compress(t.model, "snapkv", 1.0):
            torch.manual_seed(0)
            out = t.model.generate(**inputs, max_new_tokens=5, do_sample=True)
        assert torch.equal(out, ref)


def test_merge_targets_scored_leaves_recent_window_unmerged_on_llama() -> None:
    """merge_targets="scored": recent-window pairs stay exactly the prefill's; "all" (the default) merges into them."""
    from meda.kv.recipes import resolve_recipe

    assert all(r is None or r.merge_targets == "all" for r in METHODS.values())
    with pytest.raises(ValueError, match="merge_targets"):
        resolve_recipe("meda", merge_targets="window")
    t = tiny("llama")
    inputs = t.inputs(1, lengths=[96])
    full = DynamicCache(config=t.model.config)
    with torch.inference_mode():
        t.model(**inputs, past_key_values=full, use_cache=True)
    window = 8
    tails = {}
    for targets in ("scored", "all"):
        cache = DynamicCache(config=t.model.config)
        with (
            torch.inference_mode(),
            compress(t.model, method="h2o", budget=0.3, merge="average", recent_window=window, merge_targets=targets),
        ):
            t.model(**inputs, past_key_values=cache, use_cache=True)
        tails[targets] = []
        for layer, ref in zip(cache.layers, full.layers, strict=True):
            count = int(layer.key_mask[0, 0].sum())
            assert bool(layer.key_mask[0].all())  # uniform budget: every head keeps `count`
            same = torch.equal(layer.keys[..., count - window : count, :], ref.keys[..., -window:, :]) and torch.equal(
                layer.values[..., count - window : count, :], ref.values[..., -window:, :]
            )
            tails[targets].append(same)
    assert all(tails["scored"])
    assert not all(tails["all"])


def test_report_counts_clipped_layer_budgets_and_true_merges() -> None:
    t = tiny("llama", "sdpa")
    # the paper's recipe merges every evicted pair (the default "meda" drops them: docs/results.md)
    with compress(t.model, method="meda-paper", budget=0.3, alpha_min=0.3) as report:
        greedy(t.model, t.inputs(1))
    assert report.clipped.get("layer_budget", 0) >= 1  # alpha_min = budget: low-entropy layers are lifted
    assert sum(report.layer_fractions) / len(report.layer_fractions) == pytest.approx(0.3, abs=1e-6)
    assert report.merged_tokens == report.evicted_tokens > 0
    with compress(t.model, method="meda-paper", budget=0.3, merge_targets="scored") as report:
        greedy(t.model, t.inputs(1))
    # every kept slot of the 96-token prompt at 30% is a recent-window slot: nothing may absorb
    assert report.merged_tokens == 0 < report.evicted_tokens


def test_query_subsets_bound_the_statistics_and_stay_exact_at_full_budget() -> None:
    t = tiny("llava")
    inputs = t.inputs(1)
    ref = greedy(t.model, inputs).sequences
    with compress(t.model, "meda", 1.0, score_queries=16, entropy_queries=16):
        assert torch.equal(greedy(t.model, inputs).sequences, ref)
    with compress(t.model, "meda", 0.3) as full_stats, torch.inference_mode():
        t.model.generate(**inputs, max_new_tokens=1)
    with compress(t.model, "meda", 0.3, score_queries=24, entropy_queries=24) as sampled, torch.inference_mode():
        t.model.generate(**inputs, max_new_tokens=1)
    assert sampled.layer_entropy != full_stats.layer_entropy  # fewer queries, other estimates
    assert sum(sampled.layer_tokens) == pytest.approx(sum(full_stats.layer_tokens), abs=len(sampled.layer_tokens))
    with pytest.raises(ValueError, match="score_queries"), compress(t.model, "meda", 0.3, score_queries=0):
        pass


def test_merge_cap_zero_generates_like_dropping_and_still_counts_merges() -> None:
    """merge_cap=0: every merged pair keeps all of itself, so the logits equal merge="none"'s while the report
    still counts the pairs assigned to a slot; the uncapped paper recipe and a cap between move them."""
    t = tiny("llama", "sdpa")
    inputs = t.inputs(1)
    logits, merged = {}, {}
    for name, options in (("none", {"merge": "none"}), ("cap0", {"merge_cap": 0.0}), ("cap", {"merge_cap": 0.3}),
                          ("paper", {})):  # fmt: skip
        with compress(t.model, method="meda-paper", budget=0.3, **options) as report:
            logits[name] = torch.stack(greedy(t.model, inputs).scores)  # [steps, 1, vocab]; step 0 is the prefill's
        merged[name] = report.merged_tokens
    torch.testing.assert_close(logits["cap0"], logits["none"])
    assert merged["cap0"] == merged["paper"] > 0 and merged["none"] == 0
    for name in ("cap", "paper"):
        assert (logits[name] - logits["none"]).abs().max() > 1e-3
    assert (logits["cap"] - logits["paper"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="merge_cap"), compress(t.model, method="meda-paper", merge_cap=2.0):
        pass
