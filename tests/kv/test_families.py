"""Support by capability: every tiny family, sliding-window layers, soft-capping, processor layouts, clear errors.

Budget 1.0 (batch 1 and a left-padded batch of 3) and padded rows == single prompts at budget 0.3 run over
every family of ``tiny.FAMILIES`` in tests/kv/test_compress.py; this file adds what is family-specific.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from meda.kv import compress, entropy, scoring
from meda.kv.cache import CompressedLayer
from meda.kv.support import attention_softcap, check_supported, decoder_layers
from meda.kv.tiny import (
    FAMILIES,
    IMAGE_BREAK_ID,
    INTERNVL_PATCHES,
    MEDIA_CLOSE_ID,
    MEDIA_OPEN_ID,
    ONEVISION_IMAGE_SIZE,
    PIXTRAL_IMAGE_SIZE,
    SLIDING_WINDOW,
    TILE_IDS,
    TIMESTAMP_TOKENS,
    VLM_FAMILIES,
    anyres_image_tokens,
    build_tiny,
)

SLIDING_FAMILIES = ("gemma2", "gemma3_text", "cohere2", "gemma3")


@functools.cache
def tiny(family: str):
    return build_tiny(family)


def greedy(model, inputs, n: int = 4) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


# ---------------------------------------------------------------- capability, not names


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_layers_follow_the_allocation_and_the_model_is_restored(family: str) -> None:
    """Budget 0.3: every full-attention layer keeps its allocated tokens, sliding layers keep their window,
    bytes are the real ones, and after the block the model generates exactly what it did before."""
    t = tiny(family)
    inputs = t.inputs(1, lengths=[112])
    before = greedy(t.model, inputs)
    cache = DynamicCache(config=t.model.config)
    with torch.inference_mode(), compress(t.model, method="snapkv", budget=0.3) as report:
        t.model(**inputs, past_key_values=cache, use_cache=True)
    layers = decoder_layers(t.model)
    assert report.compressed_layers == list(layers.full) and report.sliding_layers == list(layers.sliding)
    n = report.prefill_tokens
    assert n == 112
    for idx in layers.full:
        assert isinstance(cache.layers[idx], CompressedLayer)
        assert abs(report.layer_tokens[idx] - report.layer_fractions[idx] * n) <= 1.0
    kept = [report.layer_tokens[i] for i in layers.full]
    assert abs(sum(kept) / len(kept) - 0.3 * n) <= 1.0
    assert report.kept_fraction == pytest.approx(0.3, abs=1.0 / n)
    for idx in layers.sliding:
        assert type(cache.layers[idx]) is DynamicSlidingWindowLayer  # left as it was
        assert report.layer_tokens[idx] == SLIDING_WINDOW - 1
    real = sum(
        sum(
            x.numel() * x.element_size()
            for x in (layer.keys, layer.values, getattr(layer, "key_mask", None))
            if x is not None
        )
        for layer in cache.layers
    )
    assert report.kv_bytes_after == real < report.kv_bytes_before
    assert torch.equal(greedy(t.model, inputs), before)


def test_sliding_report_says_what_the_budget_means() -> None:
    t = tiny("gemma2")
    # the entropy allocator on this text prompt (meda's default there is uniform, with no entropy measured)
    with compress(t.model, method="meda", budget=0.3, text_only_allocator=None) as report:
        greedy(t.model, t.inputs(1))
    assert report.sliding_window == SLIDING_WINDOW
    assert report.compressed_layers == [1, 3] and report.sliding_layers == [0, 2]
    assert any("2 of 4 layers use sliding-window attention" in note for note in report.notes)
    assert len(report.layer_entropy) == 2  # measured on the compressed layers only


def test_qwen2_sliding_window_upper_layers_are_hybrid() -> None:
    """Qwen2 with ``use_sliding_window``: layers from ``max_window_layers`` on slide, the lower ones are compressed."""
    t = build_tiny("qwen2", use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2)
    inputs = t.inputs(3)
    ref = greedy(t.model, inputs)
    with compress(t.model, method="meda", budget=1.0):
        assert torch.equal(greedy(t.model, inputs), ref)
    with compress(t.model, method="meda", budget=0.3) as report:
        greedy(t.model, inputs)
    assert report.compressed_layers == [0, 1] and report.sliding_layers == [2, 3]


def test_projection_layout_does_not_matter() -> None:
    """Phi-3's fused qkv_proj and GPT-2's c_attn (a family never listed anywhere) are found by their interface."""
    from transformers import GPT2Config, GPT2LMHeadModel

    phi3 = tiny("phi3")
    assert all(hasattr(m, "qkv_proj") and not hasattr(m, "q_proj") for m in decoder_layers(phi3.model).modules.values())
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128)).eval()
    gpt2.generation_config.pad_token_id = 0
    assert check_supported(gpt2) == "gpt2"
    inputs = {"input_ids": torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))}
    ref = greedy(gpt2, inputs)
    with compress(gpt2, method="meda", budget=1.0):
        assert torch.equal(greedy(gpt2, inputs), ref)
    with compress(gpt2, method="h2o", budget=0.5) as report:
        greedy(gpt2, inputs)
    assert report.compressed_layers == [0, 1] and report.kept_fraction == pytest.approx(0.5, abs=1 / 40)


# ---------------------------------------------------------------- models that cannot be compressed


def test_no_attention_layers_is_a_clear_error() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64))
    with pytest.raises(NotImplementedError, match=r"MambaForCausalLM \(mamba\).*no causal self-attention layer"):
        compress(mamba, method="meda", budget=0.2).__enter__()


def test_hybrid_recurrent_layers_are_named() -> None:
    """LFM2 mixes short-convolution layers (a fixed-size state, no per-token keys) with attention layers."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Lfm2Config"):
        pytest.skip("this transformers has no LFM2")
    config = transformers.Lfm2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
    )
    model = transformers.Lfm2ForCausalLM(config)
    with pytest.raises(NotImplementedError, match=r"Lfm2ForCausalLM \(lfm2\): decoder layers 0, 2 of 4"):
        check_supported(model)


def test_all_sliding_layers_leave_nothing_to_compress() -> None:
    """Mistral-7B-v0.1 style: every layer has a 4096-token window, so its cache is bounded already."""
    t = build_tiny("mistral", sliding_window=48)
    with pytest.raises(NotImplementedError, match=r"nothing to compress.*all 4 decoder layers.*window 48"):
        compress(t.model, method="meda", budget=0.2).__enter__()


def test_flex_attention_is_refused_with_the_fix() -> None:
    """A model really loaded with flex attention is refused; the named fix makes it work."""
    t = build_tiny("llama", attn_implementation="flex_attention")
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
        compress(t.model, method="meda", budget=0.2).__enter__()
    t.model.set_attn_implementation("sdpa")
    with compress(t.model, method="meda", budget=0.5) as report:
        greedy(t.model, t.inputs(1))
    assert report.compressions == 1


def test_load_model_refuses_unwatchable_attention_and_missing_folders(tmp_path) -> None:
    from meda.kv.models import load_model

    with pytest.raises(ValueError, match="load with attn_implementation='sdpa'"):
        load_model("smollm2-135m", attn_implementation="flash_attention_2", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"^no such model folder: /no/such/path"):
        load_model("/no/such/path", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(str(tmp_path / "a" / "b"), device="cpu")


def test_cli_run_names_the_missing_folder() -> None:
    from typer.testing import CliRunner

    from meda.cli import app

    result = CliRunner().invoke(app, ["kv", "run", "--model", "/no/such/path", "-p", "hi"])
    assert result.exit_code == 2
    assert "no such model folder" in " ".join(result.output.split())
    assert "repo id" not in result.output.lower()


# ---------------------------------------------------------------- soft-capping and query scaling


def _dense_attention(query, key, valid, scaling, softcap):
    """Plain reference: full causal softmax per query head ``[B, Hq, N, N]``."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    n = key.shape[2]
    visible = torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, None, :] & valid[:, None, :, None]
    probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
    return probs.nan_to_num(0.0), group


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_softcap_scores_match_a_dense_reference(softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 12, 8, generator=g) * 3, torch.randn(2, 2, 12, 8, generator=g) * 3
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    probs, group = _dense_attention(query, key, valid, 0.5, softcap)
    expected = probs.sum(dim=2).unflatten(1, (2, group)).sum(dim=2).masked_fill(~valid[:, None], -math.inf)
    got = scoring.cumulative_attention_scores(query, key, valid, scaling=0.5, softcap=softcap, query_chunk=5)
    torch.testing.assert_close(got, expected)
    window = scoring.window_attention_scores(query, key, valid, scaling=0.5, softcap=softcap, window=4, pool_kernel=1)
    expected_window = probs[:, :, -4:].sum(dim=2).unflatten(1, (2, group)).sum(dim=2)
    torch.testing.assert_close(window, expected_window.masked_fill(~valid[:, None], -math.inf))
    if softcap is not None:  # the cap changes the scores of these large logits
        uncapped = scoring.cumulative_attention_scores(query, key, valid, scaling=0.5)
        assert not torch.allclose(got, uncapped)


def test_softcap_entropy_matches_a_dense_reference() -> None:
    g = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 2, 10, 8, generator=g) * 3, torch.randn(1, 1, 10, 8, generator=g) * 3
    valid = torch.ones(1, 10, dtype=torch.bool)
    vision = torch.zeros(1, 10, dtype=torch.bool)
    vision[0, 2:6] = True
    logits = (query @ key.transpose(-1, -2)) * 0.5
    logits = 2.0 * torch.tanh(logits / 2.0)
    total = 0.0
    for is_vision, other in ((False, vision[0]), (True, ~vision[0])):
        rows = [i for i in range(10) if bool(vision[0, i]) == is_vision and bool(other[: i + 1].any())]
        per_head = []
        for h in range(2):
            ent = []
            for i in range(10):
                if i not in rows:
                    continue
                cols = [j for j in range(i + 1) if bool(other[j])]
                p = torch.softmax(logits[0, h, i, cols], dim=-1)
                ent.append(float(-(p * p.log()).sum()))
            per_head.append(sum(ent) / len(ent))
        total += sum(per_head) / 2
    got = entropy.cross_modal_entropy(query, key, vision, valid, scaling=0.5, softcap=2.0)
    assert float(got[0]) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(("family", "scaling", "softcap"), [("gemma2", 32**-0.5, 50.0), ("granite", 1 / 16, None)])
def test_session_uses_the_modules_scaling_and_softcap(family, scaling, softcap, monkeypatch) -> None:
    """Gemma 2 scales by query_pre_attn_scalar^-0.5 and caps logits at 50; Granite scales by its multiplier."""
    seen = []
    real = entropy.cross_modal_entropy

    def spy(*args, **kwargs):
        seen.append((kwargs["scaling"], kwargs["softcap"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(entropy, "cross_modal_entropy", spy)
    t = tiny(family)
    assert attention_softcap(next(iter(decoder_layers(t.model).modules.values()))) == softcap
    with compress(t.model, method="meda", budget=0.5, text_only_allocator=None):  # entropy on this text prompt
        greedy(t.model, t.inputs(1), n=1)
    assert seen and all(s == pytest.approx(scaling) and c == softcap for s, c in seen)
    assert len(seen) == len(decoder_layers(t.model).full)


# ---------------------------------------------------------------- prompts as each processor writes them


def _runs(ids: torch.Tensor, token: int) -> list[int]:
    """Lengths of the runs of ``token`` in the 1-D ``ids``."""
    runs, current = [], 0
    for value in [*ids.tolist(), None]:
        if value == token:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_token_count_matches_model_features(family: str) -> None:
    t = tiny(family)
    inputs = t.inputs(1)
    with torch.no_grad():
        features = t.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    count = anyres_image_tokens(t.model.config, *ONEVISION_IMAGE_SIZE)
    assert features.pooler_output[0].shape[0] == count == int((inputs["input_ids"] == t.image_token_id).sum())
    assert _runs(inputs["input_ids"][0], t.image_token_id) == [count]


def test_qwen3_vl_video_has_one_timestamped_run_per_frame() -> None:
    t = tiny("qwen3_vl")
    inputs = t.inputs(1, video=True)
    ids, grid = inputs["input_ids"][0], inputs["video_grid_thw"][0]
    merge = t.model.config.vision_config.spatial_merge_size
    per_frame = int(grid[1] * grid[2]) // merge**2
    assert _runs(ids, t.video_token_id) == [per_frame] * int(grid[0])
    starts = (ids == t.model.config.vision_start_token_id).nonzero().flatten()
    assert len(starts) == int(grid[0])
    assert int(starts[1] - starts[0]) == per_frame + 2 + TIMESTAMP_TOKENS  # start, pads, end, then "<t seconds>"
    assert torch.equal(inputs["mm_token_type_ids"][0] == 2, ids == t.video_token_id)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_tiles_then_global_image(family: str) -> None:
    t = tiny(family)
    ids = t.inputs(1)["input_ids"][0]
    vision = t.model.config.vision_config
    seq = (vision.image_size // vision.patch_size) ** 2 // t.model.config.scale_factor**2
    assert _runs(ids, t.image_token_id) == [seq] * (len(TILE_IDS) + 1)
    for tile in TILE_IDS:  # each tile run follows <fake_token_around_image><row_1_col_j>
        at = int((ids == tile).nonzero())
        assert int(ids[at - 1]) == MEDIA_OPEN_ID and int(ids[at + 1]) == t.image_token_id


def test_pixtral_rows_end_with_breaks_and_the_image_with_an_end() -> None:
    t = tiny("mistral3")
    ids = t.inputs(1)["input_ids"][0]
    step = t.model.config.vision_config.patch_size * t.model.config.spatial_merge_size
    rows, cols = PIXTRAL_IMAGE_SIZE[0] // step, PIXTRAL_IMAGE_SIZE[1] // step
    assert _runs(ids, t.image_token_id) == [cols] * rows
    assert int((ids == IMAGE_BREAK_ID).sum()) == rows - 1 and int((ids == MEDIA_CLOSE_ID).sum()) == 1
    last = int((ids == t.image_token_id).nonzero().max())
    assert int(ids[last + 1]) == MEDIA_CLOSE_ID


def test_internvl_context_tokens_cover_every_patch() -> None:
    t = tiny("internvl")
    inputs = t.inputs(1)
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape[0] == INTERNVL_PATCHES
    (run,) = _runs(ids, t.image_token_id)
    assert run == 4 * INTERNVL_PATCHES  # (32 / 8)^2 * 0.5^2 per patch
    first = int((ids == t.image_token_id).nonzero().min())
    assert int(ids[first - 1]) == MEDIA_OPEN_ID and int(ids[first + run]) == MEDIA_CLOSE_ID


def test_gemma3_soft_tokens_and_token_types() -> None:
    t = tiny("gemma3")
    inputs = t.inputs(3)
    config = t.model.config
    for row in inputs["input_ids"]:
        assert _runs(row, t.image_token_id) == [config.mm_tokens_per_image]
    assert torch.equal(inputs["token_type_ids"] == 1, inputs["input_ids"] == t.image_token_id)
    assert decoder_layers(t.model).sliding == (0, 2)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_groups_come_from_the_models_own_ids(family: str) -> None:
    t = tiny(family)
    with compress(t.model, method="meda", budget=0.5) as report:
        greedy(t.model, t.inputs(1), n=1)
    assert report.groups == "vision"


def test_every_family_is_a_plain_kv_decoder() -> None:
    for family in FAMILIES:
        layers = DynamicCache(config=tiny(family).model.config).layers
        assert all(isinstance(layer, DynamicLayer) for layer in layers), family
        assert check_supported(tiny(family).model) == family
    assert set(SLIDING_FAMILIES) <= set(FAMILIES)
