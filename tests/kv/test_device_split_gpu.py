"""A model split across devices (accelerate's ``dispatch_model``: decoder layers on ``cuda:0`` and on the CPU).

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


def _split(family: str):
    """A tiny model with its first half of decoder layers on cuda:0 and the rest (and the head) on the CPU."""
    from accelerate import dispatch_model

    t = build_tiny(family, dtype=torch.float32)
    names = [n for n, m in t.model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    layers = names[0]
    count = len(t.model.get_submodule(layers))
    device_map = {"": "cpu"} | {f"{layers}.{i}": 0 for i in range(count // 2)}
    # main_device="cpu": the CPU modules run on the CPU (accelerate's default main device would be cuda:0, with the
    # CPU modules offloaded: their weights on the meta device, streamed to cuda:0 at every forward)
    return t, dispatch_model(t.model, device_map=device_map, main_device="cpu")


def _greedy(model, inputs, method: str | None = None, budget: float = 1.0, decode: str = "dynamic"):
    """Greedy tokens ``[B, prompt + NEW]`` and the report (None without ``method``: the model as it is)."""
    session = compress(model, method, budget, decode=decode) if method else contextlib.nullcontext()
    with torch.inference_mode(), session as report:
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out, report


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_split_model_budget_one_equals_uncompressed_and_methods_run(family: str) -> None:
    t, model = _split(family)
    assert {"cpu", "cuda:0"} <= {str(p.device) for p in model.parameters()}
    inputs = t.inputs(2)  # left-padded batch, on the CPU (accelerate's hooks move them)
    ref, _ = _greedy(model, inputs)
    for decode in ("dynamic", "static"):
        out, _ = _greedy(model, inputs, "full", 1.0, decode)
        assert torch.equal(out, ref), f"{family}/{decode}: budget 1.0 on a split model changed the tokens"
    for method in ("snapkv", "adakv", "meda"):
        dyn, _ = _greedy(model, inputs, method, 0.4, "dynamic")
        sta, report = _greedy(model, inputs, method, 0.4, "static")
        assert torch.equal(sta, dyn), f"{family}/{method}: static differs from dynamic on a split model"
        assert report.kept_fraction < 0.9, report
