"""The `make demo` prompt (SmolLM2-135M, 856 tokens, the answer is Marta) under several recipes.

    python benchmarks/kv_eval_demo_configs.py --budget 0.2 \
        --configs "meda;meda:merge=average,merge_keys=false,merge_targets=scored;meda:scorer=window"

Prints each configuration's greedy answer and its time (CPU is fine).
"""

from __future__ import annotations

import argparse
import time

from meda.kv.demo import demo_prompt
from meda.kv.eval.harness import parse_method, split_methods
from meda.kv.models import load_model
from meda.kv.prompting import build_inputs
from meda.kv.run import generate_with


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--configs", default="snapkv;meda-paper;meda", help="method specs as in meda kv eval --methods")
    ap.add_argument("--new-tokens", type=int, default=14)
    args = ap.parse_args()
    specs = split_methods(args.configs)
    parsed = [parse_method(spec) for spec in specs]
    model, tok = load_model("smollm2-135m", device="cpu")
    inputs = build_inputs(tok, demo_prompt(8))
    for spec, (method, options) in zip(specs, parsed, strict=True):
        t0 = time.perf_counter()
        res = generate_with(model, tok, inputs, method, args.budget, max_new_tokens=args.new_tokens, options=options)
        print(f"{spec} ({time.perf_counter() - t0:.0f} s): {res['answer']!r}", flush=True)


if __name__ == "__main__":
    main()
