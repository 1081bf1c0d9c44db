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
import os
import re
import sys
from pathlib import Path

# Large prefills at batch 8 leave the caching allocator fragmented: without expandable segments the 128k x 8
# chunked cases ran out of memory with 27 GB reserved but free (run 6). Set before torch is imported.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from meda.kv.bench import SpeedCase, prefill_over_full, speed_cases

# MEDA's statistics over all 32k-128k prompt queries are O(N^2) in PyTorch; the benchmark samples
# 2,048 queries (documented in docs/kv.md), the setting of the issue's measurements.
OPTIONS = {"score_queries": 2048, "entropy_queries": 2048}
EXTRA_KINDS = ("device", "attention", "profile")  # rows that are not a measured case
FAST = ("static", "compiled")  # the fast decode paths


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


def decode_plan() -> list[SpeedCase]:
    """The decode-overhead run: stock and uncompiled static beside the compiled step for every method at
    5% and 20% (32k, batch 1), then the compiled step at 128k and at batch 8."""
    q, k32, k128 = "qwen2-7b", 32768, 131072
    plan = [_c(q, k32, 1, "full", 1.0, "stock"), _c(q, k32, 1, "full", 1.0, "static")]
    plan += [_c(q, k32, 1, "snapkv", 0.05, "static"), _c(q, k32, 1, "full", 1.0, "compiled")]
    plan += [_c(q, k32, 1, m, b, "compiled") for m in ("snapkv", "pyramidkv", "adakv", "meda") for b in (0.05, 0.2)]
    plan += [_c(q, k32, 8, "full", 1.0, "compiled"), _c(q, k32, 8, "snapkv", 0.05, "compiled")]
    plan += [_c(q, k128, 1, "full", 1.0, "compiled"), _c(q, k128, 1, "snapkv", 0.05, "compiled")]
    plan += [_c(q, k32, 8, "full", 1.0, "stock"), _c(q, k128, 1, "full", 1.0, "stock")]
    return plan


def issue_plan() -> list[SpeedCase]:
    """The issue's matrix in the order the GPU calls run it (``--resume`` continues where a call stopped).

    Both shapes at 32k x 1, 32k x 8 and 128k x 1: stock, full on the fast path, snapkv/pyramidkv/meda at
    5/10/20% on the fast path, and (Qwen2-7B, Qwen2-VL 32k x 1) on transformers' own loop (``dynamic``) at 5%;
    AdaKV at 32k x 1; the long prompts compressed chunk by chunk at 10% (256k and 1M tokens); 128k x 8
    compressed chunk by chunk (a one-shot prefill of 8 x 128k would not fit its activations); and last the
    compiled step. Not in it: 512k, and the long prompts at 5% / 20%.
    """
    methods, budgets = ("snapkv", "pyramidkv", "meda"), (0.05, 0.1, 0.2)

    def shape(preset: str, n: int, b: int, *, dynamic: tuple[float, ...] = (), chunk: int = 0) -> list[SpeedCase]:
        full = [SpeedCase(preset, n, b, "full", 1.0, "static", chunk=chunk)]
        cases = [SpeedCase(preset, n, b, m, x, "static", chunk=chunk) for m in methods for x in budgets]
        cases += [_c(preset, n, b, m, x, "dynamic") for m in methods for x in dynamic]
        if chunk:  # the full cache may not fit: measured after the compressed cases, and also in chunks of
            # 8k, since at 128k x 8 the full cache (60 GB) beside a 32k chunk's activations ran out of memory
            return cases + full + [SpeedCase(preset, n, b, "full", 1.0, "static", chunk=8192)] * (b > 1)
        return [_c(preset, n, b, "full", 1.0, "stock"), *full, *cases]

    q, vl, k32, k128 = "qwen2-7b", "qwen2-vl-7b", 32768, 131072
    plan = shape(q, k32, 1, dynamic=(0.05, 0.2)) + [_c(q, k32, 1, "adakv", x, "static") for x in budgets]
    plan += shape(q, k32, 8, dynamic=(0.05,)) + shape(q, k128, 1, dynamic=(0.05,))
    plan += shape(vl, k32, 1, dynamic=(0.05,))
    plan += [SpeedCase(q, n, 1, m, 0.1, "static", chunk=k32) for n, m in [(262144, "snapkv"), (1048576, "snapkv")]]
    plan += shape(vl, k128, 1) + shape(vl, k32, 8)
    plan += shape(q, k128, 8, chunk=k32)
    plan += [SpeedCase(q, 1048576, 1, "meda", 0.1, "static", chunk=k32)]
    plan += shape(vl, k128, 8, chunk=k32)
    plan += [_c(q, k32, 1, "full", 1.0, "compiled"), _c(q, k32, 1, "snapkv", 0.05, "compiled")]
    return plan


def matrix_plan() -> list[SpeedCase]:
    methods = ["stock", "full", "snapkv", "pyramidkv", "meda"]
    decodes = ["stock", "dynamic", "static", "compiled"]
    text = speed_cases(["qwen2-7b"], [32768, 131072], [1, 8], methods, [0.05, 0.1, 0.2], decodes)
    vl = speed_cases(["qwen2-vl-7b"], [32768, 131072], [1], methods, [0.05, 0.1, 0.2], decodes)
    return text + vl


PLANS = {"core": core_plan, "decode": decode_plan, "issue": issue_plan, "matrix": matrix_plan}
# (method, budget, decode, captured) of the steps --profile looks at (Qwen2-7B shape, batch 1, --profile-tokens)
PROFILES = [
    ("full", 1.0, "static", True),
    ("full", 1.0, "compiled", True),
    ("snapkv", 0.05, "static", False),
    ("snapkv", 0.05, "static", True),
    ("snapkv", 0.05, "compiled", True),
]


def measure(args: argparse.Namespace) -> None:
    from meda.kv.bench import print_rows, run_speed

    cases = PLANS[args.plan]()
    if args.only:
        parts = [p for p in args.only.split(",") if p]
        cases = [c for c in cases if any(p in c.key for p in parts)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out.exists():
        done = {r["key"] for r in _read([out]) if _measured(r, retry_oom=args.retry_oom)}
        skipped = [c.key for c in cases if c.key in done]
        cases = [c for c in cases if c.key not in done]
        print(f"resume: {len(skipped)} case(s) already in {out}, {len(cases)} to run", flush=True)
    rows, models = [], {}
    with out.open("a") as f:
        for row in _extras(args):
            _write(f, row)
        if args.profile:  # uncompiled steps before the cases, on the model they reuse
            from meda.kv.tiny import build_shaped

            models["qwen2-7b"] = build_shaped("qwen2-7b", device="cuda").model
            for row in _profiles(args, models["qwen2-7b"], compiled=False):
                _write(f, row)
        speed = run_speed(
            cases, decode_tokens=args.decode_tokens, image_side=args.image_side, options=OPTIONS, models=models
        )
        for row in speed:
            rows += _write(f, row)
        if args.profile:  # compiled steps last: a 7B compile took longer than run 3 had left
            for row in _profiles(args, models["qwen2-7b"], compiled=True):
                _write(f, row)
    print_rows(rows)


def _measured(row: dict, *, retry_oom: bool = False) -> bool:
    """A case that need not run again: it has its figures, or it ran out of GPU memory (a result: it does not
    fit; ``retry_oom`` runs it again, after a change to the code's memory); any other error runs again."""
    if row.get("kind") in EXTRA_KINDS:
        return False
    return "error" not in row or (not retry_oom and str(row["error"]).startswith("OutOfMemoryError"))


def _write(f, row: dict) -> list[dict]:
    f.write(json.dumps(row) + "\n")
    f.flush()
    print(json.dumps(_brief(row)), flush=True)
    return [row]


def _extras(args: argparse.Namespace) -> list[dict]:
    """Rows measured before the cases: the static attention's split-K microbenchmark (``--attention``)."""
    from meda.kv.bench import attention_micro

    if not args.attention:
        return []
    try:
        return attention_micro([2048, 32768, 131072], batch=1) + attention_micro([32768], batch=8)
    except Exception as err:  # a microbenchmark must not cost the run its cases
        return [{"kind": "attention", "error": f"{type(err).__name__}: {err}"}]


def _profiles(args: argparse.Namespace, model, *, compiled: bool):
    """One profiled decode step per entry of PROFILES (those with decode "compiled", or the others)."""
    from meda.kv.bench import profile_step, prompt_for

    inputs = prompt_for(model, args.profile_tokens, 1, args.image_side)
    for method, budget, decode, graph in PROFILES:
        if (decode == "compiled") != compiled:
            continue
        try:
            yield profile_step(model, inputs, method, budget, decode, use_graph=graph, options=OPTIONS)
        except Exception as err:
            yield {"kind": "profile", "method": method, "decode": decode, "error": f"{type(err).__name__}: {err}"}


def _brief(row: dict) -> dict:
    keys = ("key", "prefill_s", "decode_ms_per_token", "replay_ms", "floor_ms", "ratio_to_floor", "error")
    if row.get("kind") == "profile":
        return {**{k: v for k, v in row.items() if k != "by_name"}, "top": row.get("by_name", [])[:12]}
    if row.get("kind") in ("device", "attention"):
        return row
    return {k: (round(row[k], 3) if isinstance(row.get(k), float) else row.get(k)) for k in keys if k in row}


def _read(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [{**json.loads(line), "run": path.stem} for line in path.read_text().splitlines() if line.strip()]
    return rows


def short_error(error: str, sentences: int = 3) -> str:
    """An error's first ``sentences`` sentences: what failed and, for CUDA out of memory, how much it asked
    for and how much was free (the allocator's advice after that is the same on every row)."""
    parts = str(error).split(". ")
    return ". ".join(parts[:sentences]) + ("." if len(parts) > sentences else "")


def report(paths: list[Path], md: Path, png: Path | None, *, one_series: bool = False) -> None:
    """Markdown table (one row per case, latest measurement wins) and, optionally, the PNG: one line per method
    and run, or with ``one_series`` one line per method over all the files (runs that fill in each other's
    cells, not runs of different code)."""
    rows = _read(paths)  # each row remembers its file: runs before and after a code change stay apart
    devices = [r for r in rows if r.get("kind") == "device"]
    runs = {r["key"]: r for r in rows if r.get("kind") not in EXTRA_KINDS and "error" not in r}
    errors = {r["key"]: r["error"] for r in rows if "error" in r and "key" in r and r["key"] not in runs}
    stock = {(r["preset"], r["tokens"], r["batch"]): r for r in runs.values() if _is_stock(r)}
    full_fast = {  # the fast path's own full cache, per decode path (static, compiled)
        (r["preset"], r["tokens"], r["batch"], r["decode"]): r
        for r in runs.values()
        if r["decode"] in FAST and r["method"] == "full"
    }
    by_run: dict[str, list[dict]] = {}
    for r in runs.values():
        by_run.setdefault(r["run"], []).append(r)
    lines = []
    for d in {(d["preset"], d["device"]): d for d in devices}.values():
        lines.append(
            f"- {d['preset']} on {d['device']} (torch {d['torch']}, transformers {d['transformers']}): copy bandwidth "
            f"{d['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, decoder weights read per step "
            f"{d['decode_weight_bytes'] / 1e9:.2f} GB, {d['decode_tokens']} tokens decoded per case"
        )
    lines += [
        "",
        "| case | run | prefill s | prefill over own full (same run) | decode ms/token | GPU ms/step (graph) | "
        "floor ms | x floor | vs stock full | vs own full (same decode path) | KV held | peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        group = (r["preset"], r["tokens"], r["batch"])
        vs_stock = stock[group]["decode_ms_per_token"] / r["decode_ms_per_token"] if group in stock else None
        fast = full_fast.get((*group, r["decode"]))
        vs_full = fast["decode_ms_per_token"] / r["decode_ms_per_token"] if fast is not None else None
        extra = prefill_over_full(r, by_run[r["run"]])
        over = f"{extra:+.1%}" if extra is not None else "-"
        lines.append(
            f"| {key} | {r['run']} | {r['prefill_s']:.2f} | {over} | {r['decode_ms_per_token']:.2f} | "
            f"{_num(r.get('replay_ms'))} | {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} | "
            f"{_num(vs_stock, 'x')} | {_num(vs_full, 'x')} | {r['kv_bytes_after'] / 1e9:.3f} GB | "
            f"{r['peak_bytes'] / 1e9:.1f} GB |"
        )
    if errors:
        lines += ["", "Cases that failed (no measurement of theirs above):", "", "| case | error |", "|---|---|"]
        lines += [f"| {key} | {short_error(err)} |" for key, err in errors.items()]
    lines += _profile_lines([r for r in rows if r.get("kind") == "profile" and "error" not in r])
    lines += _attention_lines([r for r in rows if r.get("kind") == "attention" and "error" not in r])
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())
    if png is not None:
        _plot([{**r, "run": "all runs"} if one_series else r for r in runs.values()], png)


# kernel classes of a profiled step, by kernel name (first match wins)
KERNEL_CLASSES = (
    ("matrix products (cuBLAS: weights, scores, values)", re.compile(r"nvjet|gemm|gemv|cutlass|splitKreduce", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("everything else (elementwise, casts, copies, norms' reductions, cache writes)", re.compile(r".")),
)


def _profile_lines(profiles: list[dict]) -> list[str]:
    """Per profiled step: kernels, busy and span, time by kernel class, and the longest kernels by name."""
    lines = []
    for p in profiles:
        step = f"{p['method']} {p['budget']:g}, decode={p['decode']}, {'graph replay' if p['graph'] else 'uncaptured'}"
        lines += [
            "",
            f"### Profiled step: {step} ({p['run']})",
            "",
            f"{p['kernels']} kernels ({p['kernels_per_layer']:.1f} per layer of {p['layers']}), GPU busy "
            f"{p['busy_us'] / 1000:.2f} ms, first to last kernel {p['span_us'] / 1000:.2f} ms (the window also holds "
            "generate's own token selection between two steps)",
            "",
            "| kernel class | kernels | GPU ms | share of busy |",
            "|---|---|---|---|",
        ]
        totals: dict[str, list[float]] = {name: [0, 0.0] for name, _ in KERNEL_CLASSES}
        for k in p["by_name"]:
            name = next(n for n, pattern in KERNEL_CLASSES if pattern.search(k["name"]))
            totals[name][0] += k["count"]
            totals[name][1] += k["total_us"]
        for name, (count, us) in totals.items():
            lines.append(f"| {name} | {count} | {us / 1000:.2f} | {us / p['busy_us']:.0%} |")
        lines += ["", "| kernel (longest 15 by total time) | count | total us | us each |", "|---|---|---|---|"]
        for k in p["by_name"][:15]:
            each = k["total_us"] / k["count"]
            lines.append(f"| `{k['name'][:90]}` | {k['count']} | {k['total_us']:.0f} | {each:.1f} |")
    return lines


def _attention_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "### Static decode attention, one layer (run 3: eager calls in a loop, so below ~200 us the host's "
             "dispatch is what is timed; later runs replay a CUDA graph)", "",
             "| slots | batch | split | us per call | max abs diff to split=None |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['slots']} | {r['batch']} | {r['split']} | {r['us']:.0f} | {r['max_abs_diff']:.1e} |")
    return lines


def _is_stock(row: dict) -> bool:
    """The stock baseline: transformers alone with the full cache (kvpress rows also decode on the stock loop)."""
    return row["decode"] == "stock" and row["method"] == "full"


def _num(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{suffix}"


def _plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["preset"], r["tokens"], r["batch"]) for r in runs})
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in runs}))}
    styles = {run: ("-", ":", "-.")[i % 3] for i, run in enumerate(sorted({r["run"] for r in runs}, reverse=True))}
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 1.2), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, group in zip(axes, groups, strict=False):
        rs = [r for r in runs if (r["preset"], r["tokens"], r["batch"]) == group]
        for method, run, decode in sorted({(r["method"], r["run"], r["decode"]) for r in rs if r["decode"] in FAST}):
            mine = [r for r in rs if (r["method"], r["run"], r["decode"]) == (method, run, decode)]
            pts = sorted((r["budget"], r["decode_ms_per_token"]) for r in mine)
            style = dict(marker="o" if decode == "static" else "s", color=colors[method], ls=styles[run])
            ax.plot(*zip(*pts, strict=True), **style, label=f"{method} ({decode}, {run})")
        floor = sorted({(r["budget"], r["floor_ms"]) for r in rs if r["decode"] in FAST})
        if floor:
            # a tick marker: a case at one budget (the long prompts) still shows its floor
            ax.plot(*zip(*floor, strict=True), "k--", lw=1, marker="_", ms=14, label="bandwidth floor")
        for r in rs:
            if _is_stock(r):
                ax.axhline(r["decode_ms_per_token"], color="r", ls=":", label="stock loop, full cache")
            elif r["decode"] == "dynamic":
                label = f"{r['method']} (dynamic)"
                ax.scatter([r["budget"]], [r["decode_ms_per_token"]], marker="x", color="gray", label=label)
            elif r["decode"] == "stock":  # another library's press on transformers' own loop (kvpress)
                ax.scatter([r["budget"]], [r["decode_ms_per_token"]], marker="^", color=colors[r["method"]],
                           label=r["method"])
        ax.set_yscale("log")
        ax.set_xlabel("budget (kept fraction)")
        ax.set_title(f"{group[0]}, {group[1] // 1024}k tokens, batch {group[2]}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("decode ms/token (log)")
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique |= dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 * (1 + len(unique) // 4) / rows, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="core", help="which cases (default: core)")
    p.add_argument("--only", default="", help="comma list of substrings of case keys to run")
    p.add_argument("--out", default="runs/kv_speed.jsonl", help="JSON-lines file the rows are appended to")
    p.add_argument("--resume", action="store_true", help="skip cases already measured in --out")
    p.add_argument(
        "--retry-oom", action="store_true", help="with --resume: run again the cases that ran out of GPU memory"
    )
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per case")
    p.add_argument("--image-side", type=int, default=128, help="image grid side (patches) of the VL prompt")
    p.add_argument("--profile", action="store_true", help="after the cases, profile the decode steps of PROFILES")
    p.add_argument("--profile-tokens", type=int, default=32768, help="prompt tokens of the profiled steps")
    p.add_argument("--attention", action="store_true", help="first, time the static attention with/without split-K")
    p.add_argument("--list", action="store_true", help="print the plan's case keys and exit")
    p.add_argument("--report", nargs="+", type=Path, help="JSON-lines files to tabulate (no GPU needed)")
    p.add_argument("--md", type=Path, default=Path("docs/results/kv_speed_h200.md"), help="markdown table out")
    p.add_argument("--png", type=Path, default=None, help="PNG of decode ms/token vs budget (with --report)")
    p.add_argument(
        "--one-series", action="store_true", help="with --png: one line per method over all --report files"
    )
    args = p.parse_args(argv)
    if args.report:
        report(args.report, args.md, args.png, one_series=args.one_series)
    elif args.list:
        for case in PLANS[args.plan]():
            print(case.key)
    else:
        measure(args)


if __name__ == "__main__":
    sys.exit(main())
