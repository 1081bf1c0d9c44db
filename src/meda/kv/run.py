"""One compressed generation, end to end: load, prompt, compress, generate, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from meda.kv.compress import compress
from meda.kv.prompting import build_inputs
from meda.report import bar_chart, console, human_bytes, print_table


def pick_device(device: str) -> str:
    """``auto`` -> the loader's default device; a named CUDA device must exist."""
    if device == "auto":
        from meda.kv.models import default_device

        return default_device().type
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but no CUDA device is visible; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def generate_with(
    model, processor, inputs, method: str, budget, max_new_tokens: int, options=None, decode: str = "dynamic"
) -> dict:
    """Greedy generation under ``compress``; returns the answer, timing and the report dict."""
    t0 = time.perf_counter()
    session = compress(model, method=method, budget=budget, decode=decode, **(options or {}))
    with torch.inference_mode(), session as report:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - t0
    tokenizer = getattr(processor, "tokenizer", processor)
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
        "seconds": seconds,
        "report": report.to_dict(),
    }


def run_once(
    model_name: str,
    prompt: str,
    *,
    method: str,
    budget,
    images: list[Path],
    max_new_tokens: int,
    options: dict[str, Any],
    attn_implementation: str = "sdpa",
    device: str = "auto",
    decode: str = "dynamic",
) -> dict[str, Any]:
    from meda.kv.models import load_model

    dev = pick_device(device)
    model, processor = load_model(model_name, device=dev, attn_implementation=attn_implementation)
    inputs = build_inputs(processor, prompt, images, device=dev)
    result = generate_with(model, processor, inputs, method, budget, max_new_tokens, options, decode=decode)
    return {"model": model_name, "method": method, "budget": budget, "device": dev, "decode": decode, **result}


def print_result(result: dict[str, Any]) -> None:
    rep = result["report"]
    console.print(f"[bold]{result['method']}[/bold] @ budget {result['budget']}: {result['answer']!r}")
    layers = [f"L{i}" for i in range(len(rep["layer_tokens"]))]
    title = f"kept tokens per layer (prefill {rep['prefill_tokens']} tokens)"
    bar_chart(title, layers, [float(t) for t in rep["layer_tokens"]])
    print_table(
        "KV cache",
        ["", "value"],
        [
            ["bytes before", human_bytes(rep["kv_bytes_before"])],
            ["bytes after", human_bytes(rep["kv_bytes_after"])],
            ["ratio", rep["bytes_ratio"]],
            ["mean kept fraction", rep["kept_fraction"]],
            ["evicted tokens", rep["evicted_tokens"]],
            ["merged tokens", rep["merged_tokens"]],
            ["seconds", result["seconds"]],
        ],
    )
    for note in rep["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    for name, count in rep["clipped"].items():
        console.print(f"[yellow]clipped:[/yellow] {name} in {count} layer(s)")
