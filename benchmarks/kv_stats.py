"""What MEDA's prefill statistics cost: the fused Triton kernel vs the chunked PyTorch path vs the prefill.

GPU part (CUDA): for a Qwen2-7B-shaped layer (random bf16 post-RoPE queries and keys, 28 query heads,
4 KV heads, head_dim 128) at each prompt length, the time of one layer's statistics -- the cumulative
scores (two passes over Q K^T) and the cross-modal entropy (one pass) -- over all prompt queries and
over ``--sampled`` evenly spaced queries, fused and in PyTorch; times 28 layers next to the measured
prefill of the random-weight Qwen2-7B model (``meda.kv.tiny.build_shaped``) at the same length, plain
and inside ``compress(model, "meda", ...)`` end to end. A FLOP estimate says how much of the prefill an
extra ``Q K^T`` pass must cost at any efficiency.

CPU part (``--fidelity``): on SmolLM2-135M, how far sampled statistics move what MEDA keeps: the
overlap of the kept sets (per layer and KV head, uniform budget) and of the entropy layer budgets
under exact vs sampled statistics, and the leading greedy tokens that agree with exact statistics
(h2o, and meda with its entropy budgets kept on text: see ``READS_STATISTICS``).

CPU part (``--chunked``): on SmolLM2-135M, what compressing chunk by chunk (``prefill_chunk_size``)
costs against one-shot compression of the same prompts: leading greedy tokens equal to the one-shot
and to the full-cache answers, and how often the answer still names the hidden fact.

    python benchmarks/kv_stats.py --quick --out runs/kv_stats_quick.json        # GPU, < 150 s on an H200
    python benchmarks/kv_stats.py --out docs/results/kv_stats_h200.json          # GPU, every length in full
    python benchmarks/kv_stats.py --fidelity --out docs/results/kv_stats_fidelity_smollm2.json   # CPU
    python benchmarks/kv_stats.py --chunked --out docs/results/kv_chunked_fidelity_smollm2.json  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from meda.kv import entropy, kernels, scoring
from meda.report import print_table

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 28, 28, 4, 128  # Qwen2-7B
PARAMS = 7.6e9  # Qwen2-7B parameters (embeddings included; the prefill's linear FLOPs are ~2 x PARAMS x N)


@contextmanager
def fused(on: bool):
    """Route the public statistics functions to the fused kernel (on) or the PyTorch path (off)."""
    old = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernels.ENV_SWITCH]
        else:
            os.environ[kernels.ENV_SWITCH] = old


def gpu_seconds(fn: Callable[[], object], reps: int, warmup: bool = True) -> float:
    """Median wall time of ``fn`` on the GPU (after one warm-up call unless ``warmup=False``)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return stats.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def evenly_spaced(n: int, count: int | None, device: str) -> torch.Tensor | None:
    """The session's query subset: ``count`` evenly spaced rows (None = all)."""
    if count is None or count >= n:
        return None
    return torch.linspace(0, n - 1, count, device=device).round().long()


def layer_statistics(query, key, valid, vision, rows) -> None:
    """What a MEDA session computes per layer: cumulative scores and cross-modal entropy."""
    scaling = HEAD_DIM**-0.5
    scoring.cumulative_attention_scores(query, key, valid, scaling=scaling, query_subset=rows)
    entropy.cross_modal_entropy(query, key, vision, valid, scaling=scaling, query_subset=rows)


def qk_pass_flops(n: int) -> float:
    """FLOPs of one causal ``Q K^T`` pass of one layer: ``Hq x N^2 / 2 x 2D``."""
    return Q_HEADS * n * n * HEAD_DIM


def prefill_flops(n: int) -> float:
    """Linear layers (2 x params x N) plus causal attention (Q K^T and P V) in every layer."""
    return 2 * PARAMS * n + LAYERS * 2 * qk_pass_flops(n)


def synthetic_layer(n: int, sampled: int, quick: bool, device: str = "cuda") -> dict:
    """Per-layer timings on random bf16 q/k (text-shaped groups: the last 32 tokens are the 'question')."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, Q_HEADS, n, HEAD_DIM, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device=device, dtype=dtype, generator=g)
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    vision = valid.clone()
    vision[:, -32:] = False
    reps = 2 if quick else 3
    out: dict = {"tokens": n}
    subset = evenly_spaced(n, sampled, device)
    with fused(True):
        out["fused_all_s"] = gpu_seconds(lambda: layer_statistics(q, k, valid, vision, None), reps)
        out["fused_sampled_s"] = gpu_seconds(lambda: layer_statistics(q, k, valid, vision, subset), reps)
    with fused(False):
        out["torch_sampled_s"] = gpu_seconds(lambda: layer_statistics(q, k, valid, vision, subset), reps)
        # the chunked PyTorch path costs the same per query row (every row reads all N keys): in --quick
        # mode at long prompts it is timed on 4096 rows and scaled by N / 4096 (marked in the output)
        probe = evenly_spaced(n, 4096, device) if quick and n > 32768 else None
        t = gpu_seconds(lambda: layer_statistics(q, k, valid, vision, probe), 1, warmup=False)
        out["torch_all_s"] = t * (n / 4096 if probe is not None else 1.0)
        out["torch_all_scaled_from_rows"] = 4096 if probe is not None else None
    # the attention of the prefill itself, for scale: one causal SDPA forward of the layer (GQA expanded)
    kk = k.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    out["sdpa_layer_s"] = gpu_seconds(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, kk, is_causal=True), reps
    )
    return out


def model_prefill(model, n: int, sampled: int, quick: bool) -> dict:
    """Measured prefill of the random-weight Qwen2-7B: stock, inside compress('full'), and MEDA end to end."""
    from meda.kv.compress import compress

    ids = torch.randint(100, 150000, (1, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))

    def run(session=None):
        with torch.inference_mode():
            if session is None:
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                with session:
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch.cuda.empty_cache()

    out: dict = {"tokens": n}
    torch.cuda.reset_peak_memory_stats()
    out["stock_s"] = gpu_seconds(run, 1, warmup=False)
    out["full_session_s"] = gpu_seconds(lambda: run(compress(model, "full", 1.0)), 1, warmup=False)
    opts = {"score_queries": sampled, "entropy_queries": sampled}
    with fused(True):
        out["meda_sampled_fused_s"] = gpu_seconds(lambda: run(compress(model, "meda", 0.1, **opts)), 1, warmup=False)
        if not quick or n <= 32768:
            out["meda_all_fused_s"] = gpu_seconds(lambda: run(compress(model, "meda", 0.1)), 1, warmup=False)
    with fused(False):
        out["meda_sampled_torch_s"] = gpu_seconds(lambda: run(compress(model, "meda", 0.1, **opts)), 1, warmup=False)
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def gpu_main(args) -> dict:
    from meda.kv.tiny import build_shaped

    if not torch.cuda.is_available():
        raise SystemExit("the GPU part needs CUDA; on CPU run --fidelity")
    if not kernels.fused_available(torch.zeros(1, device="cuda")):
        raise SystemExit("the fused kernel is not available here: install triton (pip install triton)")
    tokens = [int(t) for t in args.tokens.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quick": args.quick}
    result["sampled_queries"] = args.sampled
    result["layers"] = []
    for n in tokens:
        t0 = time.perf_counter()
        result["layers"].append(synthetic_layer(n, args.sampled, args.quick))
        print(f"layer statistics at {n} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
        _save(args.out, result)
    result["prefill"] = []
    if not args.no_model:
        model = build_shaped("qwen2-7b", device="cuda").model
        with torch.inference_mode():
            model(input_ids=torch.ones(1, 512, dtype=torch.long, device="cuda"), logits_to_keep=1)  # warm-up
        for n in tokens:
            t0 = time.perf_counter()
            result["prefill"].append(model_prefill(model, n, args.sampled, args.quick))
            print(f"model prefill at {n} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
            _save(args.out, result)
        del model
    print_gpu(result)
    return result


def print_gpu(result: dict) -> None:
    prefill = {p["tokens"]: p for p in result["prefill"]}
    rows = []
    for lay in result["layers"]:
        n = lay["tokens"]
        base = prefill.get(n, {}).get("full_session_s")
        for label, key in (
            ("fused, all queries", "fused_all_s"),
            (f"fused, {result['sampled_queries']} queries", "fused_sampled_s"),
            ("pytorch, all queries" + (" (scaled)" if lay["torch_all_scaled_from_rows"] else ""), "torch_all_s"),
            (f"pytorch, {result['sampled_queries']} queries", "torch_sampled_s"),
        ):
            total = lay[key] * LAYERS
            rows.append([n, label, lay[key] * 1000, total, total / base if base else float("nan")])
        # 3 Q K^T passes (2 for the scores, 1 for the entropy) over all queries, as a share of the prefill FLOPs
        rows.append([n, "FLOP floor, all queries (3 QK passes)", float("nan"), float("nan"),
                     3 * LAYERS * qk_pass_flops(n) / prefill_flops(n)])  # fmt: skip
    print_table(
        f"MEDA statistics, Qwen2-7B shape ({LAYERS} layers), {result['device']}",
        ["tokens", "statistics", "ms per layer", f"s x {LAYERS} layers", "share of prefill"],
        rows,
    )
    if result["prefill"]:
        print_table(
            "Measured prefill (random-weight Qwen2-7B, batch 1), seconds",
            ["tokens", "stock", "compress full", "meda sampled fused", "meda all fused", "meda sampled pytorch"],
            [
                [
                    p["tokens"],
                    p["stock_s"],
                    p["full_session_s"],
                    p["meda_sampled_fused_s"],
                    p.get("meda_all_fused_s", float("nan")),
                    p["meda_sampled_torch_s"],
                ]
                for p in result["prefill"]
            ],
        )


class _QKRecorder:
    """Stands in for a compression session on each decoder attention module: keeps the post-RoPE
    ``(query [B, Hq, N, D], key [B, Hkv, N, D])`` of one prefill per layer, changes nothing."""

    def __init__(self) -> None:
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_attention(self, module, query, key, mask, *, additive):
        self.qk[module.layer_idx] = (query.detach().clone(), key.detach().clone())
        return mask

    def static_layer_for(self, module, key):
        return None  # no static decode buffers here


def record_qk(model, inputs: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One prefill of ``model`` with its post-RoPE queries and keys recorded per layer."""
    from meda.kv import attention
    from meda.kv.session import decoder_attention_modules

    attention.register()
    recorder, modules = _QKRecorder(), decoder_attention_modules(model)
    model.set_attn_implementation(attention.wrapped_name("sdpa"))
    for m in modules.values():
        setattr(m, attention.SESSION_ATTR, recorder)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=True)
    finally:
        for m in modules.values():
            delattr(m, attention.SESSION_ATTR)
        model.set_attn_implementation("sdpa")
    return recorder.qk


def kept_overlap(exact: torch.Tensor, approx: torch.Tensor, keep: int, valid: torch.Tensor) -> float:
    """Mean over KV heads of ``|kept(exact) & kept(approx)| / keep`` (recent window 32 kept in both)."""
    from meda.kv.selection import select_indices

    n = valid.shape[1]
    a = select_indices(exact, keep, valid, recent_window=32).token_mask(n)
    b = select_indices(approx, keep, valid, recent_window=32).token_mask(n)
    return float(((a & b).sum(-1).float() / a.sum(-1).clamp_min(1)).mean())


# the recipes whose kept tokens the sampled statistics change on a text prompt: the recommended meda scores
# keys with SnapKV's window and gives text-only prompts uniform budgets (reading no statistic), so here it
# keeps its entropy budgets on text; h2o keeps the keys of the highest cumulative scores
READS_STATISTICS: dict[str, dict] = {"meda": {"text_only_allocator": "entropy"}, "h2o": {}}


def fidelity_main(args) -> dict:
    """Sampled vs exact statistics on SmolLM2-135M (CPU): kept sets, layer budgets, greedy tokens."""
    from kv_fidelity import agree, prompts
    from meda.kv.allocation import entropy_budgets
    from meda.kv.compress import compress
    from meda.kv.groups import question_mask
    from meda.kv.models import load_model
    from meda.kv.prompting import build_inputs

    model, tok = load_model("smollm2-135m", device="cpu")
    samples = [64, 256] if args.quick else [64, 128, 256, 512]
    budget, new_tokens = 0.2, 8 if args.quick else 12
    cases = prompts(2, args.paragraphs or 6) if args.quick else prompts(4, args.paragraphs or 8)
    acc = {s: {"kept_overlap": [], "budget_moved": [], "meda_agree": 0, "h2o_agree": 0} for s in samples}
    t0 = time.perf_counter()
    for prompt, _ in cases:
        inputs = build_inputs(tok, prompt)
        n = inputs["input_ids"].shape[1]
        qk = record_qk(model, inputs)
        valid = torch.ones(1, n, dtype=torch.bool)
        context = valid & ~question_mask(valid, 32)
        scale = qk[0][0].shape[-1] ** -0.5

        def stats_for(rows, qk=qk, context=context, valid=valid, scale=scale):
            sc = [
                scoring.cumulative_attention_scores(q, k, valid, scaling=scale, query_subset=rows)
                for q, k in qk.values()
            ]
            en = [
                entropy.cross_modal_entropy(q, k, context, valid, scaling=scale, query_subset=rows)
                for q, k in qk.values()
            ]
            return sc, torch.stack(en)[:, 0]

        exact_scores, exact_entropy = stats_for(None)
        exact_budget = entropy_budgets(exact_entropy, budget).fractions
        with torch.inference_mode():
            refs = {}
            for method, options in READS_STATISTICS.items():
                with compress(model, method, budget, **options):
                    refs[method] = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, n:]
            for s in samples:
                rows = evenly_spaced(n, s, "cpu")
                sc, en = stats_for(rows)
                keep = round(budget * n)
                acc[s]["kept_overlap"].append(
                    stats.mean(kept_overlap(e, a, keep, valid) for e, a in zip(exact_scores, sc, strict=True))
                )
                acc[s]["budget_moved"].append(
                    float((entropy_budgets(en, budget).fractions - exact_budget).abs().sum() / 2)
                )
                for method, options in READS_STATISTICS.items():
                    with compress(model, method, budget, score_queries=s, entropy_queries=s, **options):
                        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, n:]
                    acc[s][f"{method}_agree"] += agree(out, refs[method])
    total = len(cases) * new_tokens
    runs = [
        {
            "queries": s,
            "kept_overlap": stats.mean(a["kept_overlap"]),
            "budget_moved": stats.mean(a["budget_moved"]),
            "meda_tokens_agree": a["meda_agree"] / total,
            "h2o_tokens_agree": a["h2o_agree"] / total,
        }
        for s, a in acc.items()
    ]
    print_table(
        f"SmolLM2-135M, budget {budget}, {len(cases)} prompts of ~{n} tokens: sampled vs exact statistics "
        f"({time.perf_counter() - t0:.0f} s)",
        ["queries", "kept-set overlap (h2o scores)", "layer budget moved (meda)", "meda (entropy budgets) tokens =",
         "h2o tokens ="],
        [
            [r["queries"], r["kept_overlap"], r["budget_moved"], r["meda_tokens_agree"], r["h2o_tokens_agree"]]
            for r in runs
        ],
    )
    return {"model": "smollm2-135m", "budget": budget, "prompts": len(cases), "prompt_tokens": n,
            "new_tokens": new_tokens, "runs": runs}  # fmt: skip


def chunked_main(args) -> dict:
    """Chunk-by-chunk vs one-shot compression on SmolLM2-135M (CPU): greedy tokens and answers."""
    from kv_fidelity import agree, prompts
    from meda.kv.compress import compress
    from meda.kv.models import load_model
    from meda.kv.prompting import build_inputs

    model, tok = load_model("smollm2-135m", device="cpu")
    methods, chunk_sizes = (["meda", "h2o"], [128]) if args.quick else (["meda", "h2o", "snapkv"], [128, 256])
    budget, new_tokens = 0.2, 8 if args.quick else 12
    cases = prompts(2, args.paragraphs or 6) if args.quick else prompts(4, args.paragraphs or 8)
    runs: dict[str, dict] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt, name in cases:
            inputs = build_inputs(tok, prompt)
            n = inputs["input_ids"].shape[1]
            full = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, n:]
            for method in methods:
                with compress(model, method, budget):
                    one = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, n:]
                for chunk in [None, *chunk_sizes]:
                    label = f"{method} one-shot" if chunk is None else f"{method} chunks of {chunk}"
                    if chunk is None:
                        out, report = one, None
                    else:
                        with compress(model, method, budget) as report:
                            out = model.generate(
                                **inputs, max_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk
                            )[0, n:]
                    r = runs.setdefault(label, {"hits": 0, "agree_full": 0, "agree_one_shot": 0, "kept": []})
                    r["hits"] += name in tok.decode(out)
                    r["agree_full"] += agree(out, full)
                    r["agree_one_shot"] += agree(out, one)
                    if report is not None:
                        r["kept"].append(report.kept_fraction)
    total = len(cases) * new_tokens
    table = [
        {
            "config": label,
            "answer_hits": r["hits"],
            "tokens_agree_full": r["agree_full"] / total,
            "tokens_agree_one_shot": r["agree_one_shot"] / total,
            "kept_fraction": stats.mean(r["kept"]) if r["kept"] else budget,
        }
        for label, r in runs.items()
    ]
    print_table(
        f"SmolLM2-135M, budget {budget}, {len(cases)} prompts of ~{n} tokens: chunk by chunk vs one shot "
        f"({time.perf_counter() - t0:.0f} s)",
        ["config", "answer names the fact", "tokens = full cache", "tokens = one-shot", "kept fraction"],
        [
            [
                t["config"],
                f"{t['answer_hits']}/{len(cases)}",
                t["tokens_agree_full"],
                t["tokens_agree_one_shot"],
                t["kept_fraction"],
            ]
            for t in table
        ],
    )
    return {"model": "smollm2-135m", "budget": budget, "prompts": len(cases), "prompt_tokens": n,
            "new_tokens": new_tokens, "runs": table}  # fmt: skip


def _save(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="GPU: fewer repetitions, PyTorch all-query timings past 32k scaled from 4,096 rows; CPU: 2 short prompts",
    )
    ap.add_argument("--tokens", default="32768,131072", help="comma-separated prompt lengths (GPU part)")
    ap.add_argument("--sampled", type=int, default=2048, help="query rows of the sampled statistics")
    ap.add_argument("--no-model", action="store_true", help="skip the model prefill (layer timings only)")
    ap.add_argument("--fidelity", action="store_true", help="CPU: sampled vs exact statistics on SmolLM2-135M")
    ap.add_argument("--chunked", action="store_true", help="CPU: chunk-by-chunk vs one-shot compression on SmolLM2")
    ap.add_argument(
        "--paragraphs",
        type=int,
        default=None,
        help="CPU parts: filler paragraphs per prompt, about 107 tokens each (default 8, 6 with --quick: ~856 tokens)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (updated as they come)")
    args = ap.parse_args()
    result = fidelity_main(args) if args.fidelity else chunked_main(args) if args.chunked else gpu_main(args)
    _save(args.out, result)


if __name__ == "__main__":
    main()
