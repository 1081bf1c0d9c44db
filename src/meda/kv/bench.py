"""GPU speed and memory of compressed caches on a real-shaped model with random weights.

One prompt of ``tokens`` tokens (text around one image, the image token count from the
model's own patch/merge sizes) is generated from once per (method, budget). For each run:
prefill seconds (forward + scoring + compression), decode milliseconds per token of the
stock ``generate`` loop, KV bytes before/after (the report's real tensor bytes), and the
device's allocated bytes with the compressed cache held.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from meda.kv.cache import cache_bytes
from meda.kv.compress import compress
from meda.kv.report import CompressionReport
from meda.kv.tiny import build_shaped
from meda.report import human_bytes, print_table


class _StepClock(LogitsProcessor):
    """Records a synchronised timestamp each time generate asks for the next token's logits."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def long_vlm_prompt(config, tokens: int, image_side: int, device: str) -> dict[str, torch.Tensor]:
    """``[text, vision_start, image tokens, vision_end, text]`` of ``tokens`` tokens (Qwen-VL layout)."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (1, image_side, image_side)
    n_image = math.prod(grid) // merge**2
    if n_image + 16 > tokens:
        raise ValueError(f"{tokens} tokens cannot hold an image of {n_image} tokens; lower --image-side")
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 150000, (tokens - n_image - 2,), generator=g)
    before = text[: len(text) // 2]
    after = text[len(text) // 2 :]
    ids = torch.cat(
        [
            before,
            torch.tensor([config.vision_start_token_id]),
            torch.full((n_image,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
            after,
        ]
    )[None]
    types = (ids == config.image_token_id).to(torch.int32)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": types.to(device),
        "pixel_values": torch.randn(math.prod(grid), width, generator=g).to(device, torch.bfloat16),
        "image_grid_thw": torch.tensor([grid]).to(device),
    }


def run_bench(
    preset: str,
    tokens: int,
    methods: list[str],
    budgets: list[float],
    decode_tokens: int = 16,
    image_side: int = 64,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("meda kv bench measures GPU speed and memory; no CUDA device is visible")
    tiny = build_shaped(preset, device="cuda")
    model = tiny.model
    weights = torch.cuda.memory_allocated()
    inputs = long_vlm_prompt(model.config, tokens, image_side, "cuda")
    rows = []
    for method in methods:
        for budget in [1.0] if method in ("full", "stock") else budgets:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            clock = _StepClock()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            # "stock": transformers alone, no session (the baseline every method is compared with)
            opts = {} if method == "full" else options or {}
            session = nullcontext(None) if method == "stock" else compress(model, method, budget, **opts)
            with torch.inference_mode(), session as report:
                out = model.generate(
                    **inputs,
                    max_new_tokens=decode_tokens,
                    min_new_tokens=decode_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([clock]),
                    return_dict_in_generate=True,
                )
                held = torch.cuda.memory_allocated() - weights  # cache (and outputs) still referenced
            steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
            if report is None:
                report = CompressionReport(method="stock", budget=1.0, prefill_tokens=tokens)
                report.kv_bytes_before = report.kv_bytes_after = cache_bytes(out.past_key_values)
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "prefill_tokens": report.prefill_tokens,
                    "prefill_s": clock.times[0] - t0,
                    "decode_ms_per_token": 1000 * sum(steps) / max(len(steps), 1),
                    "kv_bytes_before": report.kv_bytes_before,
                    "kv_bytes_after": report.kv_bytes_after,
                    "bytes_ratio": report.bytes_ratio,
                    "kept_fraction": report.kept_fraction,
                    "allocated_after_bytes": held,
                    "peak_bytes": torch.cuda.max_memory_allocated() - weights,
                    "groups": report.groups,
                }
            )
            del out
    return {
        "preset": preset,
        "tokens": tokens,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights_bytes": weights,
        "options": options or {},
        "runs": rows,
    }


def print_bench(result: dict[str, Any]) -> None:
    print_table(
        f"{result['preset']} at {result['tokens']} tokens on {result['device']}",
        ["method", "budget", "prefill s", "decode ms/tok", "KV before", "KV after", "ratio", "held after"],
        [
            [
                r["method"],
                r["budget"],
                r["prefill_s"],
                r["decode_ms_per_token"],
                human_bytes(r["kv_bytes_before"]),
                human_bytes(r["kv_bytes_after"]),
                r["bytes_ratio"],
                human_bytes(r["allocated_after_bytes"]),
            ]
            for r in result["runs"]
        ],
    )
