"""How long ``torch.compile`` takes for ``decode="compiled"``, and whether its tokens equal ``decode="static"``'s.

``decode="compiled"`` compiles the decoder layers' pure sub-blocks (norms and MLP) one module at a time, and
modules of one class share one compiled graph (dynamo takes the module as an input and guards on its
parameters' shapes, not on its identity), so the compile should cost about one layer's whatever the depth.
(It used to compile the whole step, whose compile time grew with the depth: 28.6 s at 4 layers and 80.7 s
at 28 on the CPU, and the 7B shape did not finish in 540 s on the H200 host, docs/kv-speed.md.) This script
measures the compile time on a tiny random Qwen2 of ``--layers`` layers on the CPU, each depth in its own
process with a fresh inductor cache:

    python benchmarks/kv_compile_time.py --layers 4,28

It measures compile time only; what the compiled sub-blocks buy in decode speed needs a GPU
(``benchmarks/kv_speed.py`` cases with decode ``compiled``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def one_run(layers: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Generate greedily with decode="static", then with decode="compiled" (its wall time holds the compile)."""
    from torch._dynamo.utils import counters

    from meda.kv import compress
    from meda.kv.tiny import build_tiny

    model = build_tiny("qwen2", num_hidden_layers=layers).model
    ids = torch.randint(10, 200, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def generate(decode: str) -> torch.Tensor:
        with torch.inference_mode(), compress(model, "snapkv", 0.5, decode=decode):
            return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)

    reference = generate("static")
    start = time.perf_counter()
    tokens = generate("compiled")
    return {
        "layers": layers,
        "seconds": round(time.perf_counter() - start, 1),
        "same_tokens": bool(torch.equal(tokens, reference)),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,28", help="comma list of decoder depths")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--child", type=int, metavar="LAYERS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.prompt_tokens, args.new_tokens)))
        return
    for layers in args.layers.split(","):
        # each depth in its own process with an empty inductor cache: no compile is reused across depths
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--child", layers, "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"layers": layers, "error": done.stderr[-500:]}))


if __name__ == "__main__":
    main()
