"""How long ``torch.compile`` takes for ``decode="compiled"``, and whether its tokens equal ``decode="static"``'s.

``decode="compiled"`` compiles the decoder layers' pure sub-blocks (norms and MLP) one module at a time and the
rotary embedding function once, and modules of one class share one compiled graph (dynamo takes the module as an
input and guards on its parameters' shapes, not on its identity), so the compile should cost about one layer's
whatever the depth.
(It used to compile the whole step, whose compile time grew with the depth: 28.6 s at 4 layers and 80.7 s
at 28 on the CPU, and the 7B shape did not finish in 540 s on the H200 host, docs/kv-speed.md.) This script
measures the compile time on a tiny random Qwen2 of ``--layers`` layers on the CPU, each depth in its own
process with a fresh inductor cache:

    python benchmarks/kv_compile_time.py --layers 4,28

``--cpu-decode`` times decoding on the CPU instead: SmolLM2-135M (the built-in model), an 856-token prompt,
``meda`` at 0.2, ``decode="static"`` against ``decode="compiled"`` (each a second time, after its compile):

    python benchmarks/kv_compile_time.py --cpu-decode

What the compiled sub-blocks buy in GPU decode speed needs a GPU (``benchmarks/kv_speed.py`` cases with
decode ``compiled``).
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


def cpu_decode(new_tokens: int) -> dict:
    """ms/token of ``decode="static"`` and ``"compiled"`` on SmolLM2-135M on the CPU: each the difference of a
    ``new_tokens + 1``-token and a 1-token generation over ``new_tokens``, measured twice (the first holds
    the compile); the tokens of both paths compared."""
    from kv_fidelity import prompts
    from meda.kv import compress
    from meda.kv.models import load_model
    from meda.kv.prompting import build_inputs

    model, tok = load_model("smollm2-135m", device="cpu")
    inputs = build_inputs(tok, prompts(1, 8)[0][0])
    result: dict = {"prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": new_tokens}
    tokens = {}
    with torch.inference_mode():
        for rep in ("first", "second"):
            for decode in ("static", "compiled"):
                with compress(model, "meda", 0.2, decode=decode, decode_room=new_tokens + 8):
                    start = time.perf_counter()
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    one = time.perf_counter() - start
                    start = time.perf_counter()
                    out = model.generate(
                        **inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False
                    )
                    many = time.perf_counter() - start
                result[f"{decode}_ms_per_token_{rep}"] = round((many - one) / new_tokens * 1000, 1)
                tokens[decode] = out
    result["same_tokens"] = bool(torch.equal(tokens["static"], tokens["compiled"]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,28", help="comma list of decoder depths")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded (default 6; 64 with --cpu-decode)")
    p.add_argument("--cpu-decode", action="store_true", help="time decoding on SmolLM2-135M instead (CPU)")
    p.add_argument("--child", type=int, metavar="LAYERS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cpu_decode:
        print(json.dumps(cpu_decode(args.new_tokens or 64)))
        return
    if args.child:
        print(json.dumps(one_run(args.child, args.prompt_tokens, args.new_tokens)))
        return
    for layers in args.layers.split(","):
        # each depth in its own process with an empty inductor cache: no compile is reused across depths
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--child", layers, "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens or 6)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"layers": layers, "error": done.stderr[-500:]}))


if __name__ == "__main__":
    main()
