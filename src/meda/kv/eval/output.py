"""What ``meda kv eval`` writes besides ``results.json``: a markdown table and accuracy-vs-budget plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from meda.kv.eval.intervals import wilson_interval


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fewer(run: dict[str, Any], samples: int) -> str:
    """`` n=k`` after a cell that holds fewer samples than the task's most (merged shards that did not all run it)."""
    return f" n={run['samples']}" if run["samples"] < samples else ""


def _interval(run: dict[str, Any]) -> str:
    """`` [low, high]``: the cell's 95% accuracy interval, where it has one (exact-match scores)."""
    interval = run.get("accuracy_interval")
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def _resolution(samples: int) -> str:
    """What ``samples`` per cell can tell apart: one answer's weight and the 95% intervals at the top."""
    all_right, one_wrong = wilson_interval(samples, samples), wilson_interval(samples - 1, samples)
    plural = "s" if samples > 1 else ""
    return (
        f"With {samples} sample{plural} one answer is {1 / samples:.3f} of a cell; 95% intervals (Wilson): all right "
        f"[{all_right[0]:.2f}, 1.00], one wrong [{one_wrong[0]:.2f}, {one_wrong[1]:.2f}]."
    )


def markdown_table(payload: dict[str, Any]) -> str:
    """One markdown table per task: a row per method, a column per budget, each cell
    ``accuracy (token agreement / KL)``; the full cache is the reference row, with its accuracy's 95%
    interval where the scores are exact matches, and a line under each table says how far one sample moves
    a cell."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in payload["runs"]:
        by_task[run["task"]].append(run)
    lines = [f"# {payload['model']}", ""]
    if payload.get("config", {}).get("question_after_compression"):
        lines += ["Question after compression: each prompt up to its last image was compressed first.", ""]
    for task, runs in by_task.items():
        budgets = sorted({r["budget"] for r in runs if r["method"] != "full"})
        samples = max(r["samples"] for r in runs)
        count = f"{samples} samples per cell" + (
            "; cells marked n=k hold only k (merged shards that did not all run them)"
            if any(r["samples"] < samples for r in runs)
            else ""
        )
        lines += [
            f"## {task} ({count}; accuracy, then token agreement / mean KL to the full cache)",
            "",
            "| method | " + (" | ".join(str(b) for b in budgets) or "1.0") + " |",
            "|---|" + "---|" * max(1, len(budgets)),
        ]
        full = [r for r in runs if r["method"] == "full"]
        if full:
            cell = f"{_fmt(full[0]['accuracy'])}{_interval(full[0])}{_fewer(full[0], samples)}"
            lines.append(f"| full (budget 1.0) | {cell} |" + " |" * (len(budgets) - 1))
        methods = list(dict.fromkeys(r["method"] for r in runs if r["method"] != "full"))
        for method in methods:
            cells = {r["budget"]: r for r in runs if r["method"] == method}
            shown = []
            for b in budgets:
                r = cells.get(b)
                fid = r["fidelity"] if r else {}
                shown.append(
                    "-"
                    if r is None
                    else f"{_fmt(r['accuracy'])} ({_fmt(fid.get('token_agreement'), 2)} / "
                    f"{_fmt(fid.get('kl'), 2)}){_fewer(r, samples)}"
                )
            lines.append(f"| {method} | " + " | ".join(shown) + " |")
        exact = all(r.get("accuracy_interval") for r in runs)
        lines += ["", *([_resolution(samples), ""] if exact else []), *_by_size(runs)]
    return "\n".join(lines)


def _by_size(runs: list[dict[str, Any]]) -> list[str]:
    """Where a task ran at several sizes: a second table, accuracy per size for each method and budget (the
    main table's cells average over the sizes, which hides a model that fails only on the longest prompts)."""
    sizes = sorted({size for r in runs for size in r.get("accuracy_by_size") or {}}, key=int)
    if len(sizes) < 2:
        return []
    lines = [
        "By size (accuracy at each number of images or tokens the task was made at):",
        "",
        "| method | budget | " + " | ".join(sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for r in sorted(runs, key=lambda r: (r["method"] != "full", r["method"], r["budget"])):
        acc = r.get("accuracy_by_size") or {}
        lines.append(f"| {r['method']} | {r['budget']} | " + " | ".join(_fmt(acc.get(s)) for s in sizes) + " |")
    return [*lines, ""]


def plot_accuracy(payload: dict[str, Any], out: Path) -> list[Path]:
    """``out/accuracy_{task}.png``: accuracy vs budget, a line per method, the full cache dashed (its 95%
    interval shaded where it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in payload["runs"]:
        by_task[run["task"]].append(run)
    written = []
    for task, runs in by_task.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            if run["method"] == "full":
                ax.axhline(run["accuracy"], color="black", linestyle="--", label="full cache")
                if interval := run.get("accuracy_interval"):
                    ax.axhspan(*interval, color="black", alpha=0.08, label="full cache, 95% interval")
        for method in dict.fromkeys(r["method"] for r in runs if r["method"] != "full"):
            points = sorted((r["budget"], r["accuracy"]) for r in runs if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("budget (kept fraction of the prompt's KV cache)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{payload['model']}: {task}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out) / f"accuracy_{task.replace(':', '_').replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
