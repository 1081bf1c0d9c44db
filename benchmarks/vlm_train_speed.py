"""Training-step speed of meda-vlm-mini, eager against ``--compile`` (compiled decoder layers), side by side.

Builds the model exactly as ``python -m meda.kv.vlm.train`` does (:func:`meda.kv.vlm.train.trainable_model`) once
per variant, then times full training steps (forward, backward, AdamW) on the same fixed batches: mm-count
batches of ``--tokens`` tokens at each of ``--sizes`` images, the follow-up turns of the shipped weights' runs.
It prints milliseconds per step and tokens per second for each variant and size, the one-off compile time, and
the largest relative difference of the first step's losses between the variants (a check that the compiled
layers compute the same thing).

    python benchmarks/vlm_train_speed.py --base DIR --random-lm --device cuda --json OUT.json   # SmolLM2's shape
    python benchmarks/vlm_train_speed.py --base DIR --random-lm --tiny-lm --device cpu --tokens 1500 --sizes 8 --steps 2

``--base DIR`` is a folder with SmolLM2's ``config.json`` and tokenizer files (``--random-lm``: random weights of
that shape; speed does not depend on the weights) or a ``.gguf`` file without ``--random-lm``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from meda.kv.vlm.data import BatchOptions, draw_spec, make_batch
from meda.kv.vlm.train import batch_losses, item_targets, parse_args, trainable_model

OPTIONS = BatchOptions(mix={"mm-count": 1.0}, questions=8)


def batch_index(seed: int, size: int, max_images: int) -> int:
    """The first batch index of the mm-count-only stream whose samples hold ``size`` images."""
    for index in range(100_000):
        if draw_spec(seed, index, max_images, OPTIONS)[1] == size:
            return index
    raise SystemExit(f"no batch of {size} images in the first 100,000 batches; choose another --sizes")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args: argparse.Namespace, compiled: bool, batches: dict[int, Any]) -> dict[str, Any]:
    """Time ``--steps`` training steps per size (after ``--warmup`` untimed ones) for one variant."""
    train_args = parse_args(
        ["--out", "unused", "--base", args.base, "--device", args.device]
        + ["--random-lm"] * args.random_lm
        + ["--tiny-lm"] * args.tiny_lm
        + ["--compile"] * compiled
    )
    device = torch.device(args.device)
    model, tokenizer, _, vision, lora = trainable_model(train_args, device)
    optimizer = torch.optim.AdamW([*vision, *lora], lr=1e-5, fused=device.type == "cuda")
    targets = item_targets(model, tokenizer).to(device)
    text_norm = float(model.model.language_model.embed_tokens.weight.float().norm(dim=-1).mean())
    model.train()

    def step(batch: Any) -> torch.Tensor:
        items = batch.items.to(device)
        total, *_ = batch_losses(model, batch, items, targets, text_norm, train_args, vision_only=False)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total.detach()

    result: dict[str, Any] = {"variant": "compile" if compiled else "eager", "sizes": {}}
    # the first step's loss before any update, for the comparison of variants
    first = next(iter(batches.values()))
    items = first.items.to(device)
    result["first_losses"] = [
        float(x.detach()) for x in batch_losses(model, first, items, targets, text_norm, train_args, False)[:3]
    ]
    for size, batch in batches.items():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(batch)
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(batch)
        sync(device)
        per_step = (time.perf_counter() - t0) / args.steps
        result["sizes"][size] = {
            "warmup_s": round(warm, 2),
            "ms_per_step": round(per_step * 1000, 1),
            "tokens_per_s": round(batch.input_ids.numel() / per_step),
            "tokens": batch.input_ids.numel(),
            "samples": batch.input_ids.shape[0],
        }
        print(json.dumps({"variant": result["variant"], "images": size, **result["sizes"][size]}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="SmolLM2 config+tokenizer folder (with --random-lm) or .gguf")
    p.add_argument("--random-lm", action="store_true", help="random weights of --base's shape")
    p.add_argument("--tiny-lm", action="store_true", help="with --random-lm: 2 layers, hidden 64 (CPU checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="16,64", help="images per sample, comma-separated")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch (the training default)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per size first (compiles there)")
    p.add_argument("--variants", default="eager,compile", help="eager, compile or both")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= {"eager", "compile"}:
        raise SystemExit(f"--variants: choose from eager, compile; got {args.variants!r}")

    probe = parse_args(["--out", "unused", "--base", args.base] + ["--random-lm"] * args.random_lm)
    from meda.kv.vlm.architecture import build_processor
    from meda.kv.vlm.train import base_model

    processor = build_processor(base_model(probe)[1])
    batches = {}
    for size in (int(s) for s in args.sizes.split(",")):
        batches[size] = make_batch(processor, 0, batch_index(0, size, 64), 64, args.tokens, OPTIONS)
    results = [run_variant(args, name == "compile", batches) for name in variants]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    report["runs"] = results
    if len(results) == 2:
        a, b = (r["first_losses"] for r in results)
        report["first_loss_max_rel_diff"] = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))
        report["speedup"] = {
            size: round(results[0]["sizes"][size]["ms_per_step"] / results[1]["sizes"][size]["ms_per_step"], 3)
            for size in batches
        }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
