"""Fidelity of compressed caches to the full cache on the built-in SmolLM2-135M (CPU is fine).

For a few long-context retrieval prompts (one key fact hidden at a varying depth), every
configuration generates greedily; we report how often the answer still names the fact and how many
leading tokens agree with the full-cache answer. Writes JSON and prints a table.

    python benchmarks/kv_fidelity.py --budget 0.2 --out docs/results/kv_fidelity_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from meda.kv.compress import compress
from meda.kv.demo import filler_context
from meda.kv.models import load_model
from meda.kv.prompting import build_inputs
from meda.report import print_table

NAMES = ["Marta", "Jonas", "Ilse", "Pavel", "Sofia", "Tomas"]
DEFAULT_CONFIGS = [
    "snapkv",
    "streamingllm",
    "h2o",
    "meda-paper",
    "meda-paper:merge=none",
    "meda",
    "h2o:merge=average",
]


def parse_config(text: str) -> tuple[str, dict[str, object]]:
    """``"meda:tau=2,merge=none"`` -> ``("meda", {"tau": 2.0, "merge": "none"})``."""
    method, _, opts = text.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if "." in value or key in {"tau", "alpha_min"} else int(value)
        except ValueError:
            options[key] = value
    return method, options


def prompts(n: int, paragraphs: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        fact = f"The keeper of the lighthouse in Vell is a person named {name}."
        depth = (i + 1) / (n + 1)
        context = filler_context(paragraphs, fact, depth)
        question = "Who is the keeper of the lighthouse in Vell?"
        out.append((f"Read the text and answer the question.\n\n{context}\n\nQuestion: {question}", name))
    return out


def agree(a: torch.Tensor, b: torch.Tensor) -> int:
    same = (a == b).long()
    return int(same.cumprod(0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--paragraphs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--configs", default=";".join(DEFAULT_CONFIGS), help="';'-separated method[:option=value,...]")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu")
    cases = prompts(args.prompts, args.paragraphs)
    configs = {label: parse_config(label) for label in args.configs.split(";")}
    results: dict[str, dict] = {name: {"hits": 0, "agree": 0} for name in ["full", *configs]}
    t0 = time.time()
    with torch.inference_mode():
        for prompt, name in cases:
            inputs = build_inputs(tok, prompt)
            n = inputs["input_ids"].shape[1]
            ref = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)[0, n:]
            results["full"]["hits"] += name in tok.decode(ref)
            results["full"]["agree"] += len(ref)
            for label, (method, opts) in tqdm(configs.items(), desc=name, leave=False):
                with compress(model, method=method, budget=args.budget, **opts):
                    out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)[0, n:]
                results[label]["hits"] += name in tok.decode(out)
                results[label]["agree"] += agree(out, ref)
    total = len(cases)
    rows = [
        [label, f"{r['hits']}/{total}", r["agree"] / (total * args.new_tokens)] for label, r in results.items()
    ]
    print_table(
        f"SmolLM2-135M, budget {args.budget}, {total} prompts of ~{n} tokens ({time.time() - t0:.0f} s)",
        ["config", "answer names the fact", "leading tokens equal to full"],
        rows,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"budget": args.budget, "prompts": total, "prompt_tokens": n, "results": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
