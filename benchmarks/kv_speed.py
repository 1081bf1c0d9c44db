"""Decode speed of compressed caches against the memory-bandwidth floor, in one GPU run.

Runs a plan of :class:`meda.kv.bench.SpeedCase` (preset shape with random bf16 weights, prompt length,
batch, method, budget, decode path) one after the other and appends each result to a JSON-lines file as
soon as it is measured, so a run cut short keeps its numbers and ``--resume`` continues it. ``--report``
turns JSON-lines files into a markdown table and a PNG of decode ms/token against budget with the floor.

    # GPU: the default plan ("core", ordered by what it tells), resumable
    PYTHONPATH=src python3 benchmarks/kv_speed.py --out runs/kv_speed.jsonl --resume
    # a subset: every case whose key contains one of the strings
    PYTHONPATH=src python3 benchmarks/kv_speed.py --only qwen2-7b/131072/b1 --out runs/kv_speed.jsonl
    # CPU: the table and the plot from measured rows
    python benchmarks/kv_speed.py --report docs/results/kv_speed_h200.jsonl --md docs/results/kv_speed_h200.md \\
        --png docs/results/kv_speed_h200.png

Plans: ``core`` (the subset the docs report), ``matrix`` (the issue's whole matrix: Qwen2-7B and
Qwen2-VL-7B, 32k and 128k, batch 1 and 8, full/snapkv/pyramidkv/meda at 5/10/20%, stock, dynamic and
static; hours of GPU time: run it in pieces with ``--only``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meda.kv.bench import SpeedCase, speed_cases

# MEDA's statistics over all 32k-128k prompt queries are O(N^2) in PyTorch; the benchmark samples
# 2,048 queries (documented in docs/kv.md), the setting of the measurements.
OPTIONS = {"score_queries": 2048, "entropy_queries": 2048}


def _c(preset: str, tokens: int, batch: int, method: str, budget: float, decode: str) -> SpeedCase:
    return SpeedCase(preset, tokens, batch, method, budget, decode)


def core_plan() -> list[SpeedCase]:
    """The most telling subset first: 32k batch 1, then 128k, then batch 8, then the VL shape."""
    q, vl = "qwen2-7b", "qwen2-vl-7b"
    k32, k128 = 32768, 131072
    plan = [
        _c(q, k32, 1, "full", 1.0, "stock"),
        _c(q, k32, 1, "full", 1.0, "static"),
        _c(q, k32, 1, "snapkv", 0.05, "static"),
        _c(q, k32, 1, "meda", 0.05, "static"),
        _c(q, k32, 1, "snapkv", 0.2, "static"),
        _c(q, k32, 1, "meda", 0.2, "static"),
        _c(q, k32, 8, "full", 1.0, "stock"),
        _c(q, k32, 8, "full", 1.0, "static"),
        _c(q, k32, 8, "snapkv", 0.05, "static"),
        _c(q, k32, 8, "snapkv", 0.2, "static"),
        _c(q, k128, 1, "full", 1.0, "stock"),
        _c(q, k128, 1, "full", 1.0, "static"),
        _c(q, k128, 1, "snapkv", 0.05, "static"),
        _c(q, k128, 1, "snapkv", 0.2, "static"),
        _c(q, k32, 1, "snapkv", 0.05, "dynamic"),
        _c(q, k32, 8, "meda", 0.05, "static"),
        _c(q, k32, 1, "pyramidkv", 0.05, "static"),
        _c(q, k32, 1, "snapkv", 0.1, "static"),
        _c(q, k128, 1, "meda", 0.05, "static"),
        _c(vl, k32, 1, "full", 1.0, "stock"),
        _c(vl, k32, 1, "full", 1.0, "static"),
        _c(vl, k32, 1, "snapkv", 0.05, "static"),
        _c(vl, k32, 1, "meda", 0.05, "static"),
    ]
    return plan


def matrix_plan() -> list[SpeedCase]:
    methods = ["stock", "full", "snapkv", "pyramidkv", "meda"]
    text = speed_cases(["qwen2-7b"], [32768, 131072], [1, 8], methods, [0.05, 0.1, 0.2], ["stock", "dynamic", "static"])
    vl = speed_cases(["qwen2-vl-7b"], [32768, 131072], [1], methods, [0.05, 0.1, 0.2], ["stock", "dynamic", "static"])
    return text + vl


PLANS = {"core": core_plan, "matrix": matrix_plan}


def measure(args: argparse.Namespace) -> None:
    from meda.kv.bench import print_rows, run_speed

    cases = PLANS[args.plan]()
    if args.only:
        parts = [p for p in args.only.split(",") if p]
        cases = [c for c in cases if any(p in c.key for p in parts)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out.exists():
        done = {r["key"] for r in _read([out]) if "error" not in r and r.get("kind") != "device"}
        skipped = [c.key for c in cases if c.key in done]
        cases = [c for c in cases if c.key not in done]
        print(f"resume: {len(skipped)} case(s) already in {out}, {len(cases)} to run", flush=True)
    rows = []
    with out.open("a") as f:
        for row in run_speed(cases, decode_tokens=args.decode_tokens, image_side=args.image_side, options=OPTIONS):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(_brief(row)), flush=True)
    print_rows(rows)


def _brief(row: dict) -> dict:
    keys = ("key", "prefill_s", "decode_ms_per_token", "replay_ms", "floor_ms", "ratio_to_floor", "error")
    if row.get("kind") == "device":
        return row
    return {k: (round(row[k], 3) if isinstance(row.get(k), float) else row.get(k)) for k in keys if k in row}


def _read(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [{**json.loads(line), "run": path.stem} for line in path.read_text().splitlines() if line.strip()]
    return rows


def report(paths: list[Path], md: Path, png: Path | None) -> None:
    """Markdown table (one row per case, latest measurement wins) and, optionally, the PNG."""
    rows = _read(paths)  # each row remembers its file: runs before and after a code change stay apart
    devices = [r for r in rows if r.get("kind") == "device"]
    runs = {r["key"]: r for r in rows if r.get("kind") != "device" and "error" not in r}
    errors = {r["key"]: r["error"] for r in rows if "error" in r and r["key"] not in runs}
    stock = {(r["preset"], r["tokens"], r["batch"]): r for r in runs.values() if r["decode"] == "stock"}
    full_static = {
        (r["preset"], r["tokens"], r["batch"]): r
        for r in runs.values()
        if r["decode"] == "static" and r["method"] == "full"
    }
    lines = []
    for d in {(d["preset"], d["device"]): d for d in devices}.values():
        lines.append(
            f"- {d['preset']} on {d['device']} (torch {d['torch']}, transformers {d['transformers']}): copy bandwidth "
            f"{d['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, decoder weights read per step "
            f"{d['decode_weight_bytes'] / 1e9:.2f} GB, {d['decode_tokens']} tokens decoded per case"
        )
    lines += [
        "",
        "| case | run | prefill s | decode ms/token | GPU ms/step (graph) | floor ms | x floor | vs stock full | "
        "vs static full | KV held | peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        group = (r["preset"], r["tokens"], r["batch"])
        vs_stock = stock[group]["decode_ms_per_token"] / r["decode_ms_per_token"] if group in stock else None
        vs_full = full_static[group]["decode_ms_per_token"] / r["decode_ms_per_token"] if group in full_static else None
        lines.append(
            f"| {key} | {r['run']} | {r['prefill_s']:.2f} | {r['decode_ms_per_token']:.2f} | "
            f"{_num(r.get('replay_ms'))} | {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} | "
            f"{_num(vs_stock, 'x')} | {_num(vs_full, 'x')} | {r['kv_bytes_after'] / 1e9:.3f} GB | "
            f"{r['peak_bytes'] / 1e9:.1f} GB |"
        )
    for key, err in errors.items():
        lines.append(f"| {key} | {err} |  |  |  |  |  |  |  |  |  |")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())
    if png is not None:
        _plot(list(runs.values()), png)


def _num(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{suffix}"


def _plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["preset"], r["tokens"], r["batch"]) for r in runs})
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in runs}))}
    styles = {run: ("-", ":", "-.")[i % 3] for i, run in enumerate(sorted({r["run"] for r in runs}, reverse=True))}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        rs = [r for r in runs if (r["preset"], r["tokens"], r["batch"]) == group]
        for method, run in sorted({(r["method"], r["run"]) for r in rs if r["decode"] == "static"}):
            mine = [r for r in rs if r["method"] == method and r["run"] == run and r["decode"] == "static"]
            pts = sorted((r["budget"], r["decode_ms_per_token"]) for r in mine)
            style = dict(marker="o", color=colors[method], ls=styles[run])
            ax.plot(*zip(*pts, strict=True), **style, label=f"{method} (static, {run})")
        floor = sorted({(r["budget"], r["floor_ms"]) for r in rs if r["decode"] == "static"})
        if floor:
            ax.plot(*zip(*floor, strict=True), "k--", lw=1, label="bandwidth floor")
        for r in rs:
            if r["decode"] == "stock":
                ax.axhline(r["decode_ms_per_token"], color="r", ls=":", label="stock loop, full cache")
            elif r["decode"] == "dynamic":
                label = f"{r['method']} (dynamic)"
                ax.scatter([r["budget"]], [r["decode_ms_per_token"]], marker="x", color="gray", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("budget (kept fraction)")
        ax.set_title(f"{group[0]}, {group[1] // 1024}k tokens, batch {group[2]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode ms/token (log)")
    unique = {}
    for ax in axes[0]:
        handles, labels = ax.get_legend_handles_labels()
        unique |= dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 * (1 + len(unique) // 4), 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="core", help="which cases (default: core)")
    p.add_argument("--only", default="", help="comma list of substrings of case keys to run")
    p.add_argument("--out", default="runs/kv_speed.jsonl", help="JSON-lines file the rows are appended to")
    p.add_argument("--resume", action="store_true", help="skip cases already measured in --out")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per case")
    p.add_argument("--image-side", type=int, default=128, help="image grid side (patches) of the VL prompt")
    p.add_argument("--list", action="store_true", help="print the plan's case keys and exit")
    p.add_argument("--report", nargs="+", type=Path, help="JSON-lines files to tabulate (no GPU needed)")
    p.add_argument("--md", type=Path, default=Path("docs/results/kv_speed_h200.md"), help="markdown table out")
    p.add_argument("--png", type=Path, default=None, help="PNG of decode ms/token vs budget (with --report)")
    args = p.parse_args(argv)
    if args.report:
        report(args.report, args.md, args.png)
    elif args.list:
        for case in PLANS[args.plan]():
            print(case.key)
    else:
        measure(args)


if __name__ == "__main__":
    sys.exit(main())
