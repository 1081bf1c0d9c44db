"""``meda ctr ...``: generate synthetic CTR data and train CTR models."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Train click-through-rate models for several epochs with MEDA (embedding "
        "re-initialisation every epoch) and compare with one-epoch and plain multi-epoch training.\n\n"
        "Typical flow: `meda ctr generate --preset zipf --rows 200000 --out data.parquet`, then "
        "`meda ctr train --data data.parquet --format parquet --model dnn --mode meda --epochs 4 --out runs/x`."
    ),
)
