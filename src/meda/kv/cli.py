"""``meda kv ...``: compress the KV cache of a transformers model and measure it."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Run a transformers LLM or VLM with a compressed KV cache (MEDA, StreamingLLM, H2O, SnapKV, "
        "PyramidKV, LOOK-M, AdaKV) and report kept tokens per layer and real cache bytes."
    ),
)
