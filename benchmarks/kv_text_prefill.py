"""What a compressed prefill costs on a text-only prompt, per method (SmolLM2-135M by default, CPU or GPU).

On prompts without vision tokens the recommended ``meda`` allocates uniform layer budgets, so it skips
the cross-modal entropy that only the entropy allocator reads; ``meda:text_only_allocator=none`` still
measures it (the behaviour before). This prints the best-of-``--repeats`` prefill seconds inside
``compress(model, method, budget)`` for the full cache, SnapKV and both MEDA variants, side by side in
one process on the same random prompt, and how many layers' entropy each report holds.

    python benchmarks/kv_text_prefill.py --tokens 2048 --json docs/results/kv_text_prefill_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meda.kv import compress
from meda.kv.models import load_model

CASES = {  # label -> (method, options)
    "full": ("full", {}),
    "snapkv": ("snapkv", {}),
    "meda": ("meda", {}),
    "meda:text_only_allocator=none": ("meda", {"text_only_allocator": None}),
}


def prefill_seconds(model, ids: torch.Tensor, method: str, budget: float, repeats: int, **options) -> dict:
    """Best-of-``repeats`` seconds of one prefill forward of ``ids [1, N]`` inside a compression session."""
    best = float("inf")
    for _ in range(repeats):
        with torch.inference_mode(), compress(model, method, budget, **options) as report:
            if ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            if ids.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return {"prefill_s": round(best, 3), "entropy_layers": len(report.layer_entropy), "notes": report.notes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, checkpoint folder or .gguf file")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (random token ids)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    model, _ = load_model(args.model, device=args.device)
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = {}
    for label, (method, options) in CASES.items():
        rows[label] = prefill_seconds(model, ids, method, args.budget, args.repeats, **options)
        row = rows[label]
        print(f"{label:32s} {row['prefill_s']:8.3f} s   entropy layers {row['entropy_layers']}", flush=True)
    result = {"model": args.model, "tokens": args.tokens, "budget": args.budget, "device": args.device, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
