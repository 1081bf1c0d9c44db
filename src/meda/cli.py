"""The ``meda`` command: ``meda kv ...``, ``meda ctr ...`` and ``meda demo``.

Each engine defines its own sub-command group in ``meda/<engine>/cli.py``; those
modules import only typer at import time so that ``--help`` stays instant.
"""

from __future__ import annotations

import typer

from meda import __version__
from meda.ctr.cli import app as ctr_app
from meda.kv.cli import app as kv_app

app = typer.Typer(
    name="meda",
    no_args_is_help=True,
    add_completion=False,
    help=(
        "MEDA in two engines.\n\n"
        "  meda kv   compress the KV cache of a transformers LLM/VLM at inference time "
        "(MEDA and the usual baselines) and measure what it saves.\n\n"
        "  meda ctr  train CTR models for several epochs without one-epoch overfitting "
        "(embedding re-initialisation, MEDA).\n\n"
        "  meda demo run both on built-in defaults (no downloads)."
    ),
)
app.add_typer(kv_app, name="kv")
app.add_typer(ctr_app, name="ctr")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"meda {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """MEDA for long-context inference and CTR training."""


@app.command()
def demo(
    engine: str = typer.Option("all", help="Which demo to run: all, kv or ctr."),
) -> None:
    """Run the built-in demos on this machine's CPU (or GPU if present); no downloads.

    kv: SmolLM2-135M-Instruct answers a question over an 856-token context with the full
    cache, SnapKV, the paper's MEDA (meda-paper) and the recommended MEDA (meda) at 20% of the
    cache; prints answers, per-layer budgets and KV bytes; then the same on the reference VLM
    meda-vlm-mini if it loads (both together about 35 s on 2 free CPU cores, plus about a minute once
    to assemble meda-vlm-mini). ctr: 400k synthetic impressions trained one-epoch vs multi-epoch vs
    MEDA for 4 epochs; prints test AUC per epoch (about 15 s).
    """
    if engine not in {"all", "kv", "ctr"}:
        raise typer.BadParameter(f"unknown engine {engine!r}; use all, kv or ctr")
    if engine in {"all", "kv"}:
        from meda.kv.demo import run_demo as kv_demo

        kv_demo()
    if engine in {"all", "ctr"}:
        from meda.ctr.demo import run_demo as ctr_demo

        ctr_demo()


def main() -> None:
    app()
