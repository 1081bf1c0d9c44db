"""Terminal and file reporting shared by both engines: tables, bar charts, JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table; floats are shown with 4 significant decimals."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], width: int = 40) -> None:
    """Print a horizontal bar chart (one bar per label) scaled to the largest value."""
    top = max((v for v in values if math.isfinite(v)), default=0.0) or 1.0
    console.print(f"[bold]{title}[/bold]")
    pad = max((len(lbl) for lbl in labels), default=0)
    for lbl, v in zip(labels, values, strict=True):
        n = round(width * v / top) if math.isfinite(v) else 0
        shown = int(v) if math.isfinite(v) and float(v).is_integer() else v
        console.print(f"  {lbl:>{pad}} {'█' * n}{' ' * (width - n)} {_fmt(shown)}")


def human_bytes(n: float) -> str:
    """Format a byte count as B/KiB/MiB/GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def print_json(payload: Mapping[str, Any]) -> None:
    """Print ``payload`` as JSON on stdout (plain, for machines)."""
    print(json.dumps(payload, indent=2, default=_json_default))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
