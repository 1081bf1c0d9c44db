"""NVIDIA kvpress's SnapKV and PyramidKV presses, measured the way benchmarks/kv_speed.py measures meda.

kvpress 0.5.x needs transformers < 5.3, so this runs in its own process with kvpress and that transformers
first on the path (its wheels carried to the GPU machine; docs/kv-speed.md gives the commands). It builds the
same random-weight preset shape as ``meda kv bench``, the same prompts, and writes rows with the same fields
(keys like ``qwen2-7b/32768/b1/kvpress-snapkv/0.05/stock``: kvpress compresses the prefill and decodes with
transformers' own loop), so ``benchmarks/kv_speed.py --report`` tabulates both side by side.

    PYTHONPATH=/tmp/site:src python3 benchmarks/kv_kvpress.py --tokens 32768 --budgets 0.05,0.2 \\
        --out runs/kv_speed.jsonl

kvpress's package ``__init__`` imports every press, and two of them import ``datasets`` and ``fire`` at
import time; this runner loads only the two presses' modules (:func:`presses`), so neither is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessorList

from meda.kv.bench import SpeedCase, _StepClock, copy_bandwidth, decode_weight_bytes, prompt_for


def presses() -> dict[str, type]:
    """``{"snapkv": SnapKVPress, "pyramidkv": PyramidKVPress}`` without running kvpress's package ``__init__``."""
    if "kvpress" not in sys.modules:
        spec = importlib.util.find_spec("kvpress")
        if spec is None:
            raise SystemExit("kvpress is not importable: put its wheel (and transformers < 5.3) first on PYTHONPATH")
        package = types.ModuleType("kvpress")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kvpress"] = package
    from kvpress.presses.pyramidkv_press import PyramidKVPress
    from kvpress.presses.snapkv_press import SnapKVPress

    return {"snapkv": SnapKVPress, "pyramidkv": PyramidKVPress}


def prompt(model, tokens: int, batch: int, image_side: int, device: str) -> dict[str, torch.Tensor]:
    """``kv_speed.py``'s prompt for this shape (:func:`meda.kv.bench.prompt_for`), less the inputs this
    transformers' ``forward`` does not take (5.2's Qwen2-VL has no ``mm_token_type_ids``)."""
    inputs = prompt_for(model, tokens, batch, image_side, device)
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in inputs.items() if k in accepted}


def press_key(preset: str, tokens: int, batch: int, name: str, budget: float) -> str:
    """The row's key: meda.kv.bench.SpeedCase's, for method ``kvpress-<name>`` on the stock loop."""
    return SpeedCase(preset, tokens, batch, f"kvpress-{name}", budget, "stock").key


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_press(model, inputs, name: str, budget: float, *, decode_tokens: int, bandwidth: float, weights: int,
              preset: str) -> dict:
    """One generate under ``kvpress``'s press at ``budget`` (kept fraction = 1 - compression_ratio)."""
    import transformers

    cuda = torch.cuda.is_available()
    batch = inputs["input_ids"].shape[0]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    press = presses()[name](compression_ratio=1.0 - budget)
    clock = _StepClock() if cuda else None
    cache = DynamicCache()
    n = inputs["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode(), press(model):
        model.generate(
            **inputs, past_key_values=cache, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([clock] if clock else []),
        )
    wall = time.perf_counter() - t0
    kept = [layer.keys.shape[-2] - (decode_tokens - 1) for layer in cache.layers]  # prefill pairs kept per layer
    kv_after = cache_bytes(cache)
    per_token = kv_after / max(sum(layer.keys.shape[-2] for layer in cache.layers), 1)
    kv_read = int(sum(kept) * per_token)
    floor_ms = 1000 * (weights + kv_read) / bandwidth if bandwidth else float("nan")
    steps = [1000 * (b - a) for a, b in zip(clock.times, clock.times[1:], strict=False)] if clock else []
    decode_ms = statistics.median(steps) if steps else float("nan")
    return {
        "preset": preset, "tokens": n, "batch": batch, "method": f"kvpress-{name}",
        "budget": budget, "decode": "stock", "key": press_key(preset, n, batch, name, budget),
        "prefill_tokens": n, "prefill_s": (clock.times[0] - t0) if clock else wall,
        "decode_ms_per_token": decode_ms, "replay_ms": None, "floor_ms": floor_ms,
        "ratio_to_floor": decode_ms / floor_ms, "kv_bytes_after": kv_after, "kv_read_bytes": kv_read,
        "kept_fraction": sum(kept) / (n * len(kept)), "layer_tokens": kept,
        "peak_bytes": (torch.cuda.max_memory_allocated() - base_mem) if cuda else 0,
        "notes": [f"kvpress {_version('kvpress')} on transformers {transformers.__version__}",
                  "prefill compressed by kvpress's forward hooks, decoded by transformers' own loop"],
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2-7b", help="meda.kv.tiny preset shape (qwen2-7b, qwen2-vl-7b, ...)")
    p.add_argument("--tiny", default=None, metavar="FAMILY",
                   help="a tiny random model of this family on the CPU (qwen2, qwen2_vl: checks the runner only)")
    p.add_argument("--image-side", type=int, default=128, help="image grid side (patches) of the VL prompt")
    p.add_argument("--tokens", default="32768", help="comma list of prompt lengths")
    p.add_argument("--batches", default="1", help="comma list of batch sizes")
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="comma list of kept fractions")
    p.add_argument("--presses", default="snapkv,pyramidkv", help="comma list: snapkv, pyramidkv")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/kv_speed.jsonl"), help="JSON-lines file rows go to")
    args = p.parse_args(argv)
    from meda.kv.tiny import build_shaped, build_tiny

    if args.tiny:
        model, preset, bandwidth = build_tiny(args.tiny).model, f"tiny-{args.tiny}", 0.0
    else:
        model, preset, bandwidth = build_shaped(args.preset, device="cuda").model, args.preset, copy_bandwidth()
    weights = decode_weight_bytes(model)
    device = "cpu" if args.tiny else "cuda"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        shapes = [(int(n), int(b)) for n in args.tokens.split(",") for b in args.batches.split(",")]
        for n, batch in shapes:
            inputs = prompt(model, n, batch, args.image_side, device)
            for name in args.presses.split(","):
                for budget in [float(x) for x in args.budgets.split(",")]:
                    try:
                        row = run_press(model, inputs, name, budget, decode_tokens=args.decode_tokens,
                                        bandwidth=bandwidth, weights=weights, preset=preset)
                    except Exception as err:  # one failed case (out of memory, say) must not end the run
                        row = {"key": press_key(preset, n, batch, name, budget),
                               "error": f"{type(err).__name__}: {str(err)[:300]}"}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(json.dumps({k: row.get(k) for k in ("key", "prefill_s", "decode_ms_per_token",
                                                               "ratio_to_floor", "kept_fraction", "error")}))


if __name__ == "__main__":
    sys.exit(main())
