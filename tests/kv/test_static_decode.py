"""decode="static" (static buffers written in place, the step a CUDA graph on GPU) against decode="dynamic".

On the CPU the static path runs the same step eagerly, so every test here checks the code a graph
captures: the same greedy (and seeded sampled) tokens as the dynamic path for every family and method,
batch 1 and left-padded batches, room that runs out and grows, and a model left exactly as it was after
any failure inside ``compress``.
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import weakref

import pytest
import torch
from transformers import DynamicCache

from meda.kv import METHODS, compress
from meda.kv.attention import SESSION_ATTR, static_decode_attention
from meda.kv.cache import CompressedLayer
from meda.kv.session import CompressionSession
from meda.kv.static_cache import SLOT_ALIGN, StaticLayer
from meda.kv.tiny import FAMILIES, build_tiny

NEW = 6
DECODES = ("dynamic", "static")


@functools.cache
def tiny(family: str):
    return build_tiny(family)


def session_of(model) -> CompressionSession:
    return getattr(next(m for m in model.modules() if hasattr(m, SESSION_ATTR)), SESSION_ATTR)


def generate(t, inputs, method: str, budget, decode: str, new: int = NEW, room: int = 128, **kw):
    """Tokens, the decoder's step counts (static) and the report of one generate inside compress."""
    kw.setdefault("do_sample", False)
    with torch.inference_mode(), compress(t.model, method, budget, decode=decode, decode_room=room) as report:
        session = session_of(t.model)
        out = t.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **kw)
    counts = dict(session.decoder.counts) if session.decoder is not None else None
    return out, counts, report


def cache_kwarg(model) -> str:
    """The name generate takes a cache under (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def assert_static_matches(t, inputs, method: str, budget, **kw) -> None:
    ref, _, _ = generate(t, inputs, method, budget, "dynamic", **kw)
    out, counts, report = generate(t, inputs, method, budget, "static", **kw)
    assert torch.equal(out, ref), f"{t.family}/{method}/{budget}: static tokens differ from dynamic"
    if "sliding_attention" in (getattr(t.model.config.get_text_config(), "layer_types", None) or []):
        assert any("sliding-window" in n for n in report.notes), report.notes  # those layers stay dynamic
    else:
        assert counts["eager"] == NEW - 1, counts  # every decode step went through the static step


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_static_matches_dynamic_every_family(family: str) -> None:
    t = tiny(family)
    assert_static_matches(t, t.inputs(1), "meda", 0.3)
    assert_static_matches(t, t.inputs(3), "adakv", 0.3)  # left-padded rows, uneven heads


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_static_matches_dynamic_every_method_padded_batch(family: str, method: str) -> None:
    t = tiny(family)
    assert_static_matches(t, t.inputs(3), method, 1.0 if method == "full" else 0.25)


def test_static_sampling_with_a_seed_matches_dynamic() -> None:
    t = tiny("llama")
    inputs = t.inputs(2)
    outs = []
    for decode in ("dynamic", "static"):
        torch.manual_seed(1)
        outs.append(generate(t, inputs, "snapkv", 0.3, decode, do_sample=True, top_k=50)[0])
    assert torch.equal(*outs)


def test_static_full_budget_reproduces_the_uncompressed_model() -> None:
    t = tiny("qwen3")
    inputs = t.inputs(3)
    with torch.inference_mode():
        ref = t.model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    for method in ("full", "meda"):
        out, _, _ = generate(t, inputs, method, 1.0, "static")
        assert torch.equal(out, ref), method


def test_room_that_runs_out_grows_and_keeps_tokens() -> None:
    t = tiny("mistral")
    inputs = t.inputs(2)
    budget = SLOT_ALIGN - 6  # kept tokens per layer: stored + room rounds up to one SLOT_ALIGN, about 6 free slots
    ref, _, _ = generate(t, inputs, "snapkv", budget, "dynamic", new=12)
    cache = DynamicCache(config=t.model.config)
    out, _, _ = generate(t, inputs, "snapkv", budget, "static", new=12, room=1, **{cache_kwarg(t.model): cache})
    assert torch.equal(out, ref)
    assert all(layer.keys.shape[-2] == 2 * SLOT_ALIGN for layer in cache.layers), "the buffers did not grow"


def test_beam_search_reorders_static_buffers_in_place() -> None:
    t = tiny("llama")
    inputs = t.inputs(2)
    ref, _, _ = generate(t, inputs, "snapkv", 0.3, "dynamic", num_beams=3)
    out, _, _ = generate(t, inputs, "snapkv", 0.3, "static", num_beams=3)
    assert torch.equal(out, ref)


def test_static_layers_replace_the_cache_at_the_first_decoded_token_and_hold_real_bytes() -> None:
    t = tiny("qwen2")
    inputs = t.inputs(2)
    prefilled, cache = DynamicCache(config=t.model.config), DynamicCache(config=t.model.config)
    with torch.inference_mode(), compress(t.model, "snapkv", 0.25, decode="static", decode_room=5) as report:
        t.model(**inputs, use_cache=True, **{cache_kwarg(t.model): prefilled})
        assert all(type(layer) is CompressedLayer for layer in prefilled.layers)  # prompt chunks may still follow
        t.model.generate(**inputs, max_new_tokens=3, do_sample=False, **{cache_kwarg(t.model): cache})
    assert all(isinstance(layer, StaticLayer) for layer in cache.layers)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] % SLOT_ALIGN == 0 and layer.room >= 5
    assert layer.keys.shape[-2] == layer.stored + layer.room
    assert report.kv_bytes_after == sum(x.stored_bytes() for x in cache.layers)
    kept = layer.key_mask[..., : layer.stored].sum(-1).float().mean()
    assert round(float(kept)) == report.layer_tokens[0]


def test_chunked_prefill_then_static_decode_matches_dynamic() -> None:
    t = tiny("llama")
    inputs = t.inputs(2)
    ref, _, _ = generate(t, inputs, "h2o", 0.3, "dynamic", prefill_chunk_size=32)
    out, counts, _ = generate(t, inputs, "h2o", 0.3, "static", prefill_chunk_size=32)
    assert torch.equal(out, ref) and counts["eager"] == NEW - 1


# ---- decode="compiled": the layers' norms and MLPs compiled by torch.compile inside the step -------------
def generate_compiled(t, inputs, method: str, budget, backend: str, new: int = NEW, **kw):
    """Like :func:`generate` with decode="compiled", compiled with ``backend`` ("eager": dynamo's trace only)."""
    kw.setdefault("do_sample", False)
    with torch.inference_mode(), compress(t.model, method, budget, decode="compiled", decode_room=8) as report:
        decoder = session_of(t.model).decoder
        decoder.compile_backend = backend
        out = t.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **kw)
    return out, dict(decoder.counts, classes=decoder.sub_blocks.compiled_classes), report


def dynamo_counters():
    import torch._dynamo.utils

    return torch._dynamo.utils.counters


def assert_compiled_matches(t, inputs, method: str, budget, backend: str = "eager") -> None:
    dynamo_counters().clear()
    ref, _, _ = generate(t, inputs, method, budget, "dynamic")
    rotary_before = rotary_functions_of(t.model)
    out, counts, report = generate_compiled(t, inputs, method, budget, backend)
    assert torch.equal(out, ref), f"{t.family}/{method}: compiled static tokens differ from dynamic"
    assert counts["compiled"] == NEW - 1 and not report.notes, (counts, report.notes)
    breaks = dict(dynamo_counters()["graph_break"])
    assert not breaks, f"{t.family}: a compiled sub-block has graph breaks: {list(breaks)[:2]}"
    assert any("MLP" in c for c in counts["classes"]), f"{t.family}: no MLP was compiled: {counts['classes']}"
    assert any("rotary" in c for c in counts["classes"]), f"{t.family}: no rotary compiled: {counts['classes']}"
    assert all("forward" not in vars(m) for m in t.model.modules()), "a compiled forward outlived the session"
    assert rotary_functions_of(t.model) == rotary_before, "a compiled rotary function outlived the session"


def rotary_functions_of(model) -> dict[tuple[str, str], object]:
    """``{(modeling module, name): the function that name is bound to now}`` for the model's rotary functions."""
    from meda.kv.support import attention_modules, rotary_functions

    return {(ns.__name__, name): getattr(ns, name) for ns, name in rotary_functions(attention_modules(model))}


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gemma2", "gemma3_text", "gemma3", "cohere2")])
def test_compiled_sub_blocks_trace_whole_and_match_dynamic_every_family(family: str) -> None:
    """Dynamo traces every family's norms and MLPs without a graph break (sliding-window families keep
    dynamic layers and run uncompiled) and the step gives the dynamic tokens on a left-padded batch."""
    t = tiny(family)
    assert_compiled_matches(t, t.inputs(3), "adakv", 0.3)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_compiled_step_matches_dynamic(family: str) -> None:
    t = tiny(family)
    assert_compiled_matches(t, t.inputs(3), "pyramidkv", 0.3)


@pytest.mark.slow
def test_compiled_step_with_inductor_matches_dynamic() -> None:
    t = tiny("llama")
    assert_compiled_matches(t, t.inputs(3), "snapkv", 0.3, backend="inductor")


def test_one_graph_per_sub_block_class_serves_every_layer_and_method() -> None:
    """The sub-blocks of all layers share one compiled graph per class (RMSNorm, MLP) and one for the rotary
    embedding, whatever the method: the compile does not grow with the depth."""
    torch._dynamo.reset()
    dynamo_counters().clear()
    t = tiny("mistral")
    assert t.model.config.num_hidden_layers >= 2
    for method in ("snapkv", "pyramidkv", "full"):
        generate_compiled(t, t.inputs(2), method, 1.0 if method == "full" else 0.3, "eager")
    assert dynamo_counters()["stats"]["unique_graphs"] == 3


def test_every_family_rotates_through_one_module_level_function_that_compiled_decode_swaps() -> None:
    """decode="compiled" finds the rotary embedding by the global name the attention's forward calls; this fails
    loudly when transformers renames or inlines it (the step would then run it eagerly, ~10 kernels a layer)."""
    from meda.kv.support import ROTARY_FUNCTION_NAMES, attention_modules, rotary_functions

    for family in FAMILIES:
        model = build_tiny(family).model
        found = rotary_functions(attention_modules(model))
        assert len(found) == 1 and found[0][1] in ROTARY_FUNCTION_NAMES, (family, found)
        namespace = found[0][0]
        assert namespace.__name__ == type(attention_modules(model)[0]).__module__, (family, namespace.__name__)


def test_an_attention_that_calls_no_rotary_function_has_none() -> None:
    from meda.kv.support import rotary_functions

    class NoRope(torch.nn.Module):
        def forward(self, x):
            return x

    assert rotary_functions({0: NoRope()}) == []


def test_sub_blocks_are_the_layers_children_besides_attention() -> None:
    from meda.kv.support import attention_modules, decoder_sub_blocks

    model = tiny("gemma3_text").model
    blocks = decoder_sub_blocks(model, attention_modules(model))
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is b for b in blocks)}
    assert names == {"mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"}
    assert len(blocks) == 5 * model.config.num_hidden_layers


def test_a_sub_block_with_its_own_forward_wrapper_stays_uncompiled_and_says_so() -> None:
    """accelerate's device hooks set an instance ``forward``: compiling over it would skip the hook."""
    t = tiny("llama")
    mlp = t.model.model.layers[0].mlp
    mlp.forward = functools.partial(type(mlp).forward, mlp)  # stands in for a hook's wrapper
    try:
        inputs = t.inputs(2)
        ref, _, _ = generate(t, inputs, "snapkv", 0.3, "dynamic")
        out, _, report = generate_compiled(t, inputs, "snapkv", 0.3, "eager")
        assert torch.equal(out, ref)
        assert "forward" in vars(mlp) and any("1 decoder sub-blocks" in n for n in report.notes), report.notes
    finally:
        del mlp.forward


def test_a_failing_compile_falls_back_to_the_uncompiled_step_and_says_so() -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    t = tiny("llama")
    inputs = t.inputs(2)
    ref, _, _ = generate(t, inputs, "snapkv", 0.3, "dynamic")
    with pytest.warns(RuntimeWarning, match="torch.compile of the decode step failed"):
        out, counts, report = generate_compiled(t, inputs, "snapkv", 0.3, broken_backend)
    assert torch.equal(out, ref) and counts["compiled"] == 0 and counts["eager"] == NEW - 1
    assert any("uncompiled step" in n for n in report.notes), report.notes


# ---- the pieces ----------------------------------------------------------------------------------------
def _reference_attention(query, keys, values, key_mask, scaling, softcap=None):
    """Plain attention: keys repeated per query head, masked softmax in float64."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(rep, dim=1).double()
    v = values.repeat_interleave(rep, dim=1).double()
    s = query.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~key_mask.repeat_interleave(rep, dim=1)[:, :, None, :], -math.inf)
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("split", [None, 8])
def test_static_decode_attention_matches_plain_attention(softcap, split) -> None:
    g = torch.Generator().manual_seed(0)
    b, hkv, rep, slots, d = 2, 3, 4, 16 if split else 17, 8
    query = torch.randn(b, hkv * rep, 1, d, generator=g)
    keys, values = torch.randn(b, hkv, slots, d, generator=g), torch.randn(b, hkv, slots, d, generator=g)
    key_mask = torch.rand(b, hkv, slots, generator=g) > 0.4
    key_mask[..., 0] = True
    bias = torch.zeros(b, hkv, 1, slots).masked_fill(~key_mask[:, :, None, :], -math.inf)
    out = static_decode_attention(query, keys, values, bias, scaling=0.3, softcap=softcap, split=split)
    ref = _reference_attention(query, keys, values, key_mask, 0.3, softcap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_split_k_decode_attention_gives_the_dynamic_tokens(monkeypatch) -> None:
    """With the split-K threshold lowered to the tiny models' buffers, static decoding still matches dynamic."""
    import meda.kv.attention as attention

    assert attention.split_for(4, attention.SPLIT_FROM_SLOTS) == 1024 and attention.split_for(4, 2048) is None
    assert attention.split_for(attention.SPLIT_UP_TO_HEADS + 1, 2 * attention.SPLIT_FROM_SLOTS) is None
    monkeypatch.setattr(attention, "SPLIT_FROM_SLOTS", 64)
    assert attention.split_for(2, 192) == 64
    t = tiny("qwen2")
    assert_static_matches(t, t.inputs(3), "adakv", 0.4)


def test_output_template_keeps_no_cache_alive_and_copies_logits() -> None:
    from meda.kv.fast_decode import OutputTemplate

    t = tiny("qwen2")
    cache = DynamicCache(config=t.model.config)
    with torch.inference_mode():
        out = t.model(**t.inputs(1), use_cache=True, **{cache_kwarg(t.model): cache})
    template = OutputTemplate.of(out, cache)
    other = DynamicCache(config=t.model.config)
    step = template.fill(other)
    assert type(step) is type(out) and torch.equal(step.logits, out.logits) and step.logits is not out.logits
    assert any(v is other for v in step.values())
    ref = weakref.ref(cache)
    del out, cache, step
    gc.collect()
    assert ref() is None, "the template still holds the finished generation's cache"


def test_static_layer_writes_in_place_and_resets() -> None:
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[[True, False, True], [True, True, True]]])
    layer = StaticLayer(keys, values, mask, logical_length=10, room=2)
    assert layer.keys.shape[-2] == SLOT_ALIGN and layer.room == SLOT_ALIGN - 3  # slots rounded up
    buffer = layer.keys
    new_k, new_v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    k, v = layer.update(new_k, new_v)
    assert k is buffer and torch.equal(k[:, :, 3], new_k[:, :, 0]) and torch.equal(v[:, :, 3], new_v[:, :, 0])
    free = [False] * (SLOT_ALIGN - 4)
    assert layer.key_mask.tolist() == [[[True, False, True, True, *free], [True, True, True, True, *free]]]
    assert layer.get_seq_length() == 11 and int(layer.slot) == 4
    for _ in range(layer.room):  # one past the room: the buffers grow
        layer.update(new_k, new_v)
    assert layer.keys.shape[-2] == 2 * SLOT_ALIGN and layer.get_seq_length() == 11 + layer.decoded - 1
    assert layer.decoded == SLOT_ALIGN - 2
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.key_mask.any()
    layer.update(new_k, new_v)
    assert layer.key_mask[..., 0].all() and int(layer.key_mask.sum()) == 2
    with pytest.raises(NotImplementedError, match="one new token"):
        layer.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


def test_compressed_layer_reset_then_update_starts_over() -> None:
    layer = CompressedLayer(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.ones(1, 2, 3, dtype=torch.bool), 9)
    layer.reset()
    assert layer.get_seq_length() == 0
    k, _ = layer.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert k.shape[-2] == 5 and layer.get_seq_length() == 5 and layer.key_mask.shape == (1, 2, 5)
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert layer.get_seq_length() == 6 and layer.keys.shape[-2] == 6


def test_bad_decode_arguments_are_one_clear_error() -> None:
    t = tiny("llama")
    with pytest.raises(ValueError, match="decode='fast'"), compress(t.model, "snapkv", 0.2, decode="fast"):
        pass
    with pytest.raises(ValueError, match="decode_room"), compress(t.model, "snapkv", 0.2, decode_room=0):
        pass


# ---- exception safety -----------------------------------------------------------------------------------
def _model_state(model) -> dict:
    decoder = model.get_decoder()
    return {
        "impl": [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")],
        "session": [hasattr(m, SESSION_ATTR) for m in model.modules()],
        "hooks": (dict(model._forward_pre_hooks), dict(model._forward_hooks)),
        "forward": "forward" in model.__dict__,
        "decoder_impl": decoder.config._attn_implementation,
    }


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_a_failure_during_compression_leaves_model_and_cache_as_before(decode: str, monkeypatch) -> None:
    t = build_tiny("qwen2")
    before = _model_state(t.model)
    calls = []

    def failing(self, idx, *args, **kwargs):
        calls.append(idx)
        if len(calls) == 2:
            raise RuntimeError("injected failure in layer compression")
        return original(self, idx, *args, **kwargs)

    original = CompressionSession._compress_layer
    monkeypatch.setattr(CompressionSession, "_compress_layer", failing)
    cache = DynamicCache(config=t.model.config)
    inputs = t.inputs(1)
    failing_block = compress(t.model, "meda", 0.3, decode=decode)
    with pytest.raises(RuntimeError, match="injected"), torch.inference_mode(), failing_block:
        t.model(**inputs, cache=cache, use_cache=True)
    assert _model_state(t.model) == before
    assert all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
    assert all(layer.keys.shape[-2] == inputs["input_ids"].shape[1] for layer in cache.layers)


@pytest.mark.parametrize("stage", ["set_attn_implementation", "register_forward_hook"])
def test_a_failure_during_attach_leaves_the_model_as_before(stage: str, monkeypatch) -> None:
    t = build_tiny("llama")
    before = _model_state(t.model)
    target = t.model.get_decoder() if stage == "set_attn_implementation" else t.model
    original = getattr(target, stage)
    state = {"n": 0}

    def failing(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 1 and stage == "set_attn_implementation":
            original(*args, **kwargs)  # the change happens, then the failure: attach must undo it
        raise RuntimeError(f"injected failure in {stage}")

    monkeypatch.setattr(target, stage, failing)
    with pytest.raises(RuntimeError, match="injected"), compress(t.model, "snapkv", 0.2, decode="static"):
        pass
    monkeypatch.undo()
    assert _model_state(t.model) == before


def test_nested_compress_refuses_and_keeps_the_outer_session() -> None:
    t = build_tiny("llama")
    inputs = t.inputs(1)
    with compress(t.model, "snapkv", 0.3, decode="static") as report:
        inside = _model_state(t.model)
        with pytest.raises(RuntimeError, match="already inside"), compress(t.model, "meda", 0.2):
            pass
        assert _model_state(t.model) == inside
        with torch.inference_mode():
            t.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert report.compressions == 1


def test_attention_implementation_goes_through_the_public_setter(monkeypatch) -> None:
    t = build_tiny("qwen2_vl")
    decoder = t.model.get_decoder()
    seen = []
    original = decoder.set_attn_implementation
    monkeypatch.setattr(decoder, "set_attn_implementation", lambda name: (seen.append(name), original(name)))
    with compress(t.model, "snapkv", 0.2):
        assert decoder.config._attn_implementation == "meda_sdpa"
        assert t.model.model.visual.config._attn_implementation == "sdpa"  # vision tower untouched
    assert seen == ["meda_sdpa", "sdpa"]
    assert decoder.config._attn_implementation == "sdpa"


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_takes_the_decode_path() -> None:
    from typer.testing import CliRunner

    from meda.kv.cli import app

    runner = CliRunner()
    for command in ("run", "bench"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--decode" in result.output
    bad = runner.invoke(app, ["run", "--prompt", "hi", "--decode", "fast"])
    assert bad.exit_code == 2 and "--decode 'fast'" in bad.output
    nothing = runner.invoke(app, ["bench", "--only", "no-such-case"])
    assert nothing.exit_code == 2 and "matches none" in nothing.output


def test_generate_with_passes_the_decode_path() -> None:
    from meda.kv.run import generate_with

    class Tokens:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    t = tiny("qwen2")
    inputs = t.inputs(1)
    answers = [generate_with(t.model, Tokens(), inputs, "snapkv", 0.3, 5, decode=d)["answer"] for d in DECODES]
    assert answers[0] == answers[1]
