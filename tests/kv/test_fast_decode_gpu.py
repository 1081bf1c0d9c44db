"""The captured-graph decode path on CUDA: same tokens as the dynamic path, and the graph really replays."""

from __future__ import annotations

import pytest
import torch

from meda.kv import compress
from meda.kv.attention import SESSION_ATTR
from meda.kv.tiny import build_tiny

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

NEW = 12


def _on_cuda(family: str, dtype: torch.dtype):
    t = build_tiny(family, dtype=dtype)
    t.model.to("cuda")
    return t


def _generate(t, inputs, method: str, budget: float, decode: str, use_graph: bool = True, **kw):
    with torch.inference_mode(), compress(t.model, method, budget, decode=decode, decode_room=8) as report:
        session = getattr(next(m for m in t.model.modules() if hasattr(m, SESSION_ATTR)), SESSION_ATTR)
        if session.decoder is not None:
            session.decoder.use_graph = use_graph
        out = t.model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
    counts = dict(session.decoder.counts) if session.decoder is not None else {}
    return out, counts, report


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
@pytest.mark.parametrize("method", ["full", "snapkv", "adakv", "meda"])
def test_graph_decode_matches_dynamic_float32(family: str, method: str) -> None:
    t = _on_cuda(family, torch.float32)
    inputs = {k: v.to("cuda") for k, v in t.inputs(3).items()}  # left-padded batch
    budget = 1.0 if method == "full" else 0.3
    ref, _, _ = _generate(t, inputs, method, budget, "dynamic", do_sample=False)
    out, counts, report = _generate(t, inputs, method, budget, "static", do_sample=False)
    assert torch.equal(out, ref), f"{family}/{method}: captured-graph tokens differ from the dynamic path"
    assert counts["captures"] >= 1 and counts["graph"] >= NEW - 3, (counts, report.notes)


def test_graph_decode_equals_uncaptured_static_bf16_and_sampling() -> None:
    t = _on_cuda("qwen2", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in t.inputs(2).items()}
    for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 20}):
        torch.manual_seed(0)
        eager, counts_eager, _ = _generate(t, inputs, "meda", 0.3, "static", use_graph=False, **kw)
        torch.manual_seed(0)
        graph, counts_graph, _ = _generate(t, inputs, "meda", 0.3, "static", **kw)
        assert counts_eager["graph"] == 0 and counts_graph["graph"] > 0
        assert torch.equal(eager, graph), kw


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_compiled_graph_decode_matches_dynamic_float32(family: str) -> None:
    """decode="compiled": the step with inductor-compiled norms and MLPs, captured as a CUDA graph, gives the
    dynamic path's tokens."""
    t = _on_cuda(family, torch.float32)
    inputs = {k: v.to("cuda") for k, v in t.inputs(3).items()}  # left-padded batch
    ref, _, _ = _generate(t, inputs, "pyramidkv", 0.3, "dynamic", do_sample=False)
    out, counts, report = _generate(t, inputs, "pyramidkv", 0.3, "compiled", do_sample=False)
    assert not report.notes, report.notes  # no compile or capture fallback
    assert torch.equal(out, ref), f"{family}: compiled-graph tokens differ from the dynamic path"
    assert counts["compiled"] == 2 and counts["captures"] == 1 and counts["graph"] == NEW - 3, counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lower_right_chunk_attention_matches_the_explicit_mask_on_cuda(dtype: torch.dtype) -> None:
    """The prompt-chunk attention without a mask (flash / memory-efficient kernels) equals SDPA with the bool mask."""
    from torch.nn.attention.bias import causal_lower_right

    from meda.kv.attention import lower_right_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 28, 96, 128, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 4, 700, 128, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    out, _ = lower_right_attention(torch.nn.Module().eval(), q, k, v, causal_lower_right(96, 700), scaling=128**-0.5)
    mask = torch.arange(700, device="cuda")[None, :] <= torch.arange(96, device="cuda")[:, None] + 604
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(7, dim=1), v.repeat_interleave(7, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_valid_slot_chunk_attention_matches_the_explicit_mask_on_cuda(dtype: torch.dtype) -> None:
    """Kept slots with holes (rows of different budgets, one row with uneven heads): the gathered attention equals
    SDPA with the bool mask."""
    from types import SimpleNamespace

    from meda.kv.attention import valid_slot_attention
    from meda.kv.cache import ValidSlots, attention_mask_for

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 28, 96, 128, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 4, 700, 128, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    key_mask = torch.ones(2, 4, 700, dtype=torch.bool, device="cuda")
    key_mask[0, :, 500:604] = False
    key_mask[1, 2, 10:40] = False
    out, _ = valid_slot_attention(torch.nn.Module().eval(), q, k, v, ValidSlots(key_mask), scaling=128**-0.5)
    mask = attention_mask_for(SimpleNamespace(key_mask=key_mask, all_valid=False), 96, 7, dtype, additive=False)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(7, dim=1), v.repeat_interleave(7, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=2e-3, rtol=2e-2)
