"""A model split across devices (decoder layers on ``cuda:0`` and on the CPU).

Issue 12's one-GPU check of what a two-GPU ``device_map`` needs: the session's statistics, allocation, the
compressed cache and the static decode path, with each layer's tensors on that layer's device.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from meda.kv import compress
from meda.kv.tiny import build_tiny

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

NEW = 10


def _to(obj, device):
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split(family: str):
    """A tiny model with its first half of decoder layers on cuda:0 and the rest (and everything else) on the CPU.

    Each decoder layer moves its inputs to its own device and hands its output back on the CPU, what accelerate's
    hooks do for a ``device_map`` (done by hand: accelerate's ``dispatch_model`` offloads CPU modules to the meta
    device and streams them to cuda:0 instead of running them on the CPU).
    """
    t = build_tiny(family, dtype=torch.float32)
    lists = [m for n, m in t.model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    layers = lists[0]
    for i, layer in enumerate(layers):
        device = torch.device("cuda:0" if i < len(layers) // 2 else "cpu")
        layer.to(device)
        move_in = lambda m, args, kwargs, d=device: (_to(args, d), _to(kwargs, d))  # noqa: E731
        layer.register_forward_pre_hook(move_in, with_kwargs=True)
        layer.register_forward_hook(lambda m, args, out: _to(out, "cpu"))
    return t, t.model


def _greedy(model, inputs, method: str | None = None, budget: float = 1.0, decode: str = "dynamic", **kw):
    """Greedy tokens ``[B, prompt + NEW]`` and the report (None without ``method``: the model as it is)."""
    session = compress(model, method, budget, decode=decode) if method else contextlib.nullcontext()
    with torch.inference_mode(), session as report:
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw)
    return out, report


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_split_model_budget_one_equals_uncompressed_and_methods_run(family: str) -> None:
    t, model = _split(family)
    assert {"cpu", "cuda:0"} <= {str(p.device) for p in model.parameters()}
    inputs = t.inputs(2)  # left-padded batch, on the CPU (the layers' hooks move them)
    ref, _ = _greedy(model, inputs)
    for decode in ("dynamic", "static"):
        out, _ = _greedy(model, inputs, "full", 1.0, decode)
        assert torch.equal(out, ref), f"{family}/{decode}: budget 1.0 on a split model changed the tokens"
    for method in ("snapkv", "adakv", "meda"):
        dyn, _ = _greedy(model, inputs, method, 0.4, "dynamic")
        sta, report = _greedy(model, inputs, method, 0.4, "static")
        assert torch.equal(sta, dyn), f"{family}/{method}: static differs from dynamic on a split model"
        assert report.kept_fraction < 0.9, report
    if family != "llama":  # transformers 5.17 (the GPU machine's) cannot prefill Qwen2-VL in chunks by itself
        return
    # a prompt in chunks: the chunk's groups and the running statistics follow each layer to its device
    dyn, _ = _greedy(model, inputs, "meda", 0.4, "dynamic", prefill_chunk_size=48)
    sta, report = _greedy(model, inputs, "meda", 0.4, "static", prefill_chunk_size=48)
    assert torch.equal(sta, dyn), f"{family}: chunked meda, static differs from dynamic on a split model"
    assert report.compressions > 1, report
