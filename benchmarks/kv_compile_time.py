"""How long ``torch.compile`` takes for the decode step: the whole step (``decode="compiled"``) against the
decoder layers' pure sub-blocks (norms and MLP) compiled one module at a time.

``decode="compiled"`` compiles the whole decode step, so inductor traces and lowers every layer: the time
grows with the depth (the 7B shape did not finish compiling in 540 s on the H200 host, docs/kv-speed.md).
Modules of one class share one compiled graph (dynamo inlines ``nn.Module`` s and guards on their
parameters' shapes, not on their identity), so compiling each layer's norms and MLP separately costs about
one layer's compile however deep the model is. Compiling a whole decoder layer does not share: its
attention reads its ``layer_idx``, an ``int`` attribute that dynamo specializes on, so every layer
recompiles until the recompile limit. This script measures both on a tiny random Qwen2 of ``--layers``
layers on the CPU, each with a fresh inductor cache, and checks that the tokens equal the uncompiled
static path's:

    python benchmarks/kv_compile_time.py --layers 4,28

It measures compile time only; what the sub-block compile would buy in decode speed needs a GPU.
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

MODES = ("step", "sub-blocks")


def one_run(layers: int, mode: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Generate greedily once uncompiled and once compiled (``mode``); the compiled run's wall time holds
    the compile."""
    from torch._dynamo.utils import counters

    from meda.kv import compress
    from meda.kv.tiny import build_tiny

    model = build_tiny("qwen2", num_hidden_layers=layers).model
    ids = torch.randint(10, 200, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def generate(decode: str) -> torch.Tensor:
        with torch.inference_mode(), compress(model, "snapkv", 0.5, decode=decode):
            return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)

    reference = generate("static")
    if mode == "sub-blocks":
        for layer in model.model.layers:
            for name, child in layer.named_children():
                if name != "self_attn":
                    child.compile(dynamic=True)
    start = time.perf_counter()
    tokens = generate("compiled" if mode == "step" else "static")
    seconds = time.perf_counter() - start
    return {
        "layers": layers,
        "mode": mode,
        "seconds": round(seconds, 1),
        "same_tokens": bool(torch.equal(tokens, reference)),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,28", help="comma list of decoder depths")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--child", nargs=2, metavar=("LAYERS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(int(args.child[0]), args.child[1], args.prompt_tokens, args.new_tokens)))
        return
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for layers in args.layers.split(","):
        for mode in args.modes.split(","):
            # each case in its own process with an empty inductor cache: no compile is reused across cases
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                cmd = [sys.executable, __file__, "--child", layers, mode, "--prompt-tokens", str(args.prompt_tokens),
                       "--new-tokens", str(args.new_tokens)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else json.dumps({"layers": layers, "mode": mode, "error": done.stderr[-500:]}))


if __name__ == "__main__":
    main()
