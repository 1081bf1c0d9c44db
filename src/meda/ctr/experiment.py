"""Several training modes on one dataset: per-mode runs, a summary table and a test-AUC plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from meda.ctr import distributed
from meda.ctr.checkpoint import CHECKPOINT_NAME
from meda.ctr.modes import Mode
from meda.ctr.train import DatasetLike, TrainConfig, train
from meda.report import write_json


def parse_modes(text: str) -> list[str]:
    """``"one-epoch,multi-epoch,meda"`` -> the list of modes, validated."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise ValueError("no mode given; use e.g. --mode meda or --mode one-epoch,multi-epoch,meda")
    for m in modes:
        Mode(m)
    if len(set(modes)) != len(modes):
        raise ValueError(f"mode listed twice in {text!r}")
    return modes


def run_modes(
    dataset: DatasetLike,
    modes: Sequence[str],
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    plot: bool = False,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train ``config`` once per mode; returns ``{mode: metrics payload}``.

    One mode writes ``out_dir/metrics.json``; several write ``out_dir/<mode>/metrics.json``
    plus ``out_dir/summary.json``. ``plot`` writes ``out_dir/test_auc.png``. With ``resume``
    every mode continues from its checkpoint (modes not reached yet start from scratch).
    """
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        run_dir = out if out is None or len(modes) == 1 else out / mode
        # resuming several modes: those that never started (no checkpoint yet) start afresh
        started = run_dir is not None and (len(modes) == 1 or (run_dir / CHECKPOINT_NAME).exists())
        results[mode] = train(dataset, replace(config, mode=mode), run_dir, resume=resume and started, log=log)
    if out is not None and not distributed.is_main():  # under torchrun rank 0 writes the files
        return results
    if out is not None and len(modes) > 1:
        columns, rows = summary_table(results)
        write_json(out / "summary.json", {"columns": columns, "rows": rows, "data": dataset.report})
    if out is not None and plot:
        plot_test_auc(results, out / "test_auc.png")
    return results


def summary_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: per mode the best-validation epoch (``best ep``), its test AUC
    (``AUC@best``) and the test AUC of every epoch (``-`` past a mode's last epoch)."""
    n = max(len(r["epochs"]) for r in results.values())
    columns = ["mode", "best ep", "AUC@best", *(f"ep {e}" for e in range(1, n + 1))]
    rows = []
    for mode, r in results.items():
        aucs = [e["test_auc"] for e in r["epochs"]]
        best = r["best"]
        padded = aucs + ["-"] * (n - len(aucs))
        rows.append([mode, best["epoch"], best["test_auc"], *padded])
    return columns, rows


def epoch_table(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of one run: validation and test AUC/logloss per epoch (and the
    progressive AUC of meda-continual chunks)."""
    keys = ["valid_auc", "valid_logloss", "test_auc", "test_logloss"]
    if any("progressive_auc" in e for e in payload["epochs"]):
        keys.append("progressive_auc")
    rows = [[e["epoch"], *(e.get(k, "-") for k in keys)] for e in payload["epochs"]]
    return ["epoch", *keys], rows


def plot_test_auc(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG of test AUC per epoch, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, r in results.items():
        epochs = [e["epoch"] for e in r["epochs"]]
        aucs = [e["test_auc"] for e in r["epochs"]]
        if len(aucs) == 1:  # a single epoch (one-epoch): a level line to compare against
            ax.axhline(aucs[0], linestyle="--", color="grey", label=f"{mode} ({aucs[0]:.4f})")
        else:
            ax.plot(epochs, aucs, marker="o", label=mode)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (chunk for meda-continual)")
    ax.set_ylabel("test AUC")
    model = next(iter(results.values()))["config"]["model"]
    ax.set_title(f"test AUC per epoch ({model})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
