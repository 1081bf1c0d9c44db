"""GPU speed and memory of compressed caches on real-shaped models with random weights.

One :class:`SpeedCase` is one ``generate`` call: a preset shape (``meda.kv.tiny.PRESETS``), a prompt
length, a batch size, a method and budget, and a decode path:

- ``stock``: transformers alone, no session (the baseline every figure is compared with);
- ``dynamic``: inside ``compress(...)``, transformers' own decode loop over the compressed cache;
- ``static``: inside ``compress(..., decode="static")``, the fast path (static buffers, CUDA graph);
- ``compiled``: ``decode="compiled"``, the same with the layers' norms, MLPs and rotary embedding compiled by
  ``torch.compile``.

Per case: prefill seconds (time to the first token: forward, statistics and compression), the median
decode milliseconds per token of the generate loop (and, for ``static``, the median GPU time of one
graph replay), peak and held memory, the real KV bytes, and the bandwidth floor: the bytes one decode
step must read (the decoder's weights, not the input embedding table or a vision tower, plus the kept
KV pairs) over the device-to-device copy bandwidth measured in the same process.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from meda.cuda_graphs import capture
from meda.kv.attention import SESSION_ATTR
from meda.kv.cache import cache_bytes
from meda.kv.compress import compress
from meda.kv.report import CompressionReport
from meda.report import human_bytes, print_table

DECODES = ("stock", "dynamic", "static", "compiled")


@dataclass(frozen=True)
class SpeedCase:
    """One measured generation."""

    preset: str
    tokens: int
    batch: int
    method: str  # "full" or a compression method; "stock" runs are method "full", decode "stock"
    budget: float
    decode: str
    chunk: int = 0  # generate(prefill_chunk_size=chunk): the prompt compressed chunk by chunk; 0 = one prefill

    @property
    def key(self) -> str:
        """Stable name, e.g. ``qwen2-7b/32768/b1/snapkv/0.05/static`` (what ``--only`` matches); a chunked
        prefill adds ``/c<chunk>``."""
        key = f"{self.preset}/{self.tokens}/b{self.batch}/{self.method}/{self.budget:g}/{self.decode}"
        return f"{key}/c{self.chunk}" if self.chunk else key


def speed_cases(
    presets: list[str],
    tokens: list[int],
    batches: list[int],
    methods: list[str],
    budgets: list[float],
    decodes: list[str],
) -> list[SpeedCase]:
    """The cross product, in order; ``full`` runs once at budget 1.0 per decode path, ``stock`` is one case."""
    bad = sorted(set(decodes) - set(DECODES))
    if bad:
        raise ValueError(f"unknown decode path(s) {bad}; choose from {', '.join(DECODES)}")
    cases = []
    for preset in presets:
        for n in tokens:
            for b in batches:
                for method in methods:
                    if method == "stock":
                        cases.append(SpeedCase(preset, n, b, "full", 1.0, "stock"))
                        continue
                    for budget in [1.0] if method == "full" else budgets:
                        cases += [SpeedCase(preset, n, b, method, budget, d) for d in decodes if d != "stock"]
    return cases


class _StepClock(LogitsProcessor):
    """Records a synchronised timestamp each time generate asks for the next token's logits."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


class _ProfileWindow(LogitsProcessor):
    """Starts ``prof`` at generate's ``at_step``-th logits call and stops it at the next one."""

    def __init__(self, prof, at_step: int) -> None:
        self.prof, self.at_step, self.calls = prof, at_step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at_step:
            torch.cuda.synchronize()
            self.prof.start()
        elif self.calls == self.at_step + 1:
            torch.cuda.synchronize()
            self.prof.stop()
        return scores


def copy_bandwidth(nbytes: int = 1 << 31, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written over the time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decode step reads: the text decoder and the LM head, without the
    input embedding table (one row per token) and without vision towers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    params = {id(p): p for p in decoder.parameters() if id(p) not in skip}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        params |= {id(p): p for p in head.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


def text_prompt(config, tokens: int, batch: int, device: str) -> dict[str, torch.Tensor]:
    """``batch`` random prompts of ``tokens`` text tokens (no padding)."""
    text = getattr(config, "text_config", config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(text.vocab_size, 150000), (batch, tokens), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def long_vlm_prompt(config, tokens: int, image_side: int, device: str, batch: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``[text, vision_start, image tokens, vision_end, text]``, ``tokens`` tokens each
    (Qwen-VL layout); every row holds the same text and its own copy of the image."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (1, image_side, image_side)
    n_image = math.prod(grid) // merge**2
    if n_image + 16 > tokens:
        raise ValueError(f"{tokens} tokens cannot hold an image of {n_image} tokens; lower --image-side")
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(0)
    special = (config.vision_start_token_id, config.image_token_id, config.vision_end_token_id)
    high = min(getattr(config, "text_config", config).vocab_size, 150000, *special)  # no special id drawn as text
    text = torch.randint(min(100, high // 2), high, (tokens - n_image - 2,), generator=g)
    before = text[: len(text) // 2]
    after = text[len(text) // 2 :]
    ids = torch.cat(
        [
            before,
            torch.tensor([config.vision_start_token_id]),
            torch.full((n_image,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
            after,
        ]
    )[None].repeat(batch, 1)
    types = (ids == config.image_token_id).to(torch.int32)
    pixels = torch.randn(math.prod(grid), width, generator=g).repeat(batch, 1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": types.to(device),
        "pixel_values": pixels.to(device, torch.bfloat16),
        "image_grid_thw": torch.tensor([grid] * batch).to(device),
    }


def prompt_for(model, tokens: int, batch: int, image_side: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """A long prompt for ``model``: one image inside text per row for Qwen-VL shapes, else text."""
    if getattr(model.config, "vision_config", None) is None:
        return text_prompt(model.config, tokens, batch, device)
    return long_vlm_prompt(model.config, tokens, image_side, device, batch)


def kv_read_bytes(model, report: CompressionReport, batch: int) -> int:
    """Bytes of the kept KV pairs one decode step reads (kept tokens per layer x batch x KV heads x head_dim)."""
    text = getattr(model.config, "text_config", model.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize  # keys + values
    return int(sum(report.layer_tokens) * batch * per_token)


def run_case(
    model,
    inputs: dict[str, torch.Tensor],
    case: SpeedCase,
    *,
    decode_tokens: int,
    bandwidth: float,
    weight_bytes: int,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one :class:`SpeedCase`; returns one result row (JSON-ready)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clock = _StepClock()
    if case.decode == "stock":
        session = nullcontext(None)
    else:
        opts = {} if case.method == "full" else dict(options or {})
        session = compress(model, case.method, case.budget, decode=case.decode, decode_room=decode_tokens, **opts)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decoder = None
    with torch.inference_mode(), session as report:
        if case.decode in ("static", "compiled"):
            decoder = _decoder_of(model)
            decoder.timing = True
        out = model.generate(
            **inputs,
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
            **({"prefill_chunk_size": case.chunk} if case.chunk else {}),
        )
        held = torch.cuda.memory_allocated() - base
    steps = [1000 * (b - a) for a, b in zip(clock.times, clock.times[1:], strict=False)]
    if report is None:
        n = inputs["input_ids"].shape[1]
        cache = out.get("cache", out.get("past_key_values"))  # the field's name differs between transformers 5.x
        report = CompressionReport(method="stock", budget=1.0, prefill_tokens=n, layer_tokens=[n] * len(cache.layers))
        report.kv_bytes_before = report.kv_bytes_after = cache_bytes(cache)
    kv_read = kv_read_bytes(model, report, case.batch)
    floor_ms = 1000 * (weight_bytes + kv_read) / bandwidth
    decode_ms = statistics.median(steps) if steps else float("nan")
    row = {
        **asdict(case),
        "key": case.key,
        "prefill_tokens": report.prefill_tokens,
        "prefill_s": clock.times[0] - t0,
        "decode_ms_per_token": decode_ms,
        "first_step_ms": steps[0] if steps else None,
        "replay_ms": decoder.replay_ms() if decoder is not None else None,
        "decode_counts": dict(decoder.counts) if decoder is not None else None,
        "floor_ms": floor_ms,
        "ratio_to_floor": decode_ms / floor_ms,
        "kv_bytes_before": report.kv_bytes_before,
        "kv_bytes_after": report.kv_bytes_after,
        "kv_read_bytes": kv_read,
        "kept_fraction": report.kept_fraction,
        "held_bytes": held,
        "peak_bytes": torch.cuda.max_memory_allocated() - base,
        "notes": list(report.notes),
    }
    del out
    return row


def profile_step(
    model,
    inputs: dict[str, torch.Tensor],
    method: str,
    budget: float,
    decode: str,
    *,
    use_graph: bool = True,
    at_step: int = 6,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The GPU kernels of one decode step (``torch.profiler``, CUDA activity only).

    Profiles the window between two of ``generate``'s logits calls (step ``at_step`` to the next): one
    forward (a graph replay once captured, or the eager step with ``use_graph=False``) plus the few
    kernels of generate's own token selection. Returns the kernel count, the summed kernel time, the
    window's span on the GPU (first kernel start to last kernel end; span - busy = idle gaps between
    kernels) and the kernels grouped by name, longest total first.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    clock = _ProfileWindow(prof, at_step)
    opts = {} if method == "full" else dict(options or {})
    with torch.inference_mode(), compress(model, method, budget, decode=decode, decode_room=at_step + 4, **opts):
        decoder = _decoder_of(model)
        decoder.use_graph = use_graph
        model.generate(
            **inputs, max_new_tokens=at_step + 2, min_new_tokens=at_step + 2, do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        counts = dict(decoder.counts)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:120], []).append(e.time_range.elapsed_us())
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels) if kernels else 0
    text = getattr(model.config, "text_config", model.config)
    return {
        "kind": "profile",
        "method": method,
        "budget": budget,
        "decode": decode,
        "graph": use_graph,
        "decode_counts": counts,
        "layers": text.num_hidden_layers,
        "kernels": len(kernels),
        "kernels_per_layer": len(kernels) / text.num_hidden_layers,
        "busy_us": sum(e.time_range.elapsed_us() for e in kernels),
        "span_us": span,
        "by_name": sorted(
            ({"name": k, "count": len(v), "total_us": sum(v)} for k, v in by_name.items()),
            key=lambda r: -r["total_us"],
        ),
    }


def attention_micro(slots: list[int], *, batch: int = 1, kv_heads: int = 4, group: int = 7, head_dim: int = 128,
                    splits: tuple[int | None, ...] = (None, 64, 256, 1024), repeats: int = 50) -> list[dict]:
    """GPU microseconds of one layer's :func:`~meda.kv.attention.static_decode_attention` (bf16) per slot count
    and ``split``: the call captured once in a CUDA graph and replayed ``repeats`` times (CUDA events), so the
    host's dispatch is not what is timed (it was, in run 3's eager loop)."""
    from meda.kv.attention import static_decode_attention

    rows = []
    for n in slots:
        q = torch.randn(batch, kv_heads * group, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        bias = torch.zeros(batch, kv_heads, 1, n, device="cuda", dtype=torch.bfloat16)
        ref = static_decode_attention(q, k, v, bias, scaling=head_dim**-0.5)
        for split in splits:
            if split is not None and n % split:
                continue
            fn = functools.partial(static_decode_attention, q, k, v, bias, scaling=head_dim**-0.5, split=split)
            err = float((fn().float() - ref.float()).abs().max())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with capture(graph):
                fn()
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            rows.append({"kind": "attention", "slots": n, "batch": batch, "split": split,
                         "us": 1000 * start.elapsed_time(end) / repeats, "max_abs_diff": err,
                         "kv_bytes": 2 * k.numel() * k.element_size()})
    return rows


def _decoder_of(model):
    """The active session's :class:`~meda.kv.fast_decode.StaticDecoder` (to time its replays)."""
    for module in model.modules():
        session = getattr(module, SESSION_ATTR, None)
        if session is not None:
            return session.decoder
    raise RuntimeError("no meda.kv session is attached to the model")


def run_speed(
    cases: list[SpeedCase],
    *,
    decode_tokens: int = 32,
    image_side: int = 64,
    options: dict[str, Any] | None = None,
    models: dict[str, torch.nn.Module] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``cases`` in order (one model per preset, built once or taken from ``models``), yielding each row
    as it is measured (a compiled decode step is reused across cases of one model).

    The first row of each preset is a ``{"kind": "device", ...}`` record: device, versions, copy
    bandwidth and weight bytes, measured in this process.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("meda kv bench measures GPU speed and memory; no CUDA device is visible")
    import transformers

    from meda.kv.tiny import build_shaped

    bandwidth = copy_bandwidth()
    for preset in dict.fromkeys(c.preset for c in cases):
        model = (models or {}).get(preset) or build_shaped(preset, device="cuda").model
        weights = decode_weight_bytes(model)
        yield {
            "kind": "device",
            "preset": preset,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_weight_bytes": weights,
            "all_weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "decode_tokens": decode_tokens,
            "options": options or {},
        }
        prompts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for case in (c for c in cases if c.preset == preset):
            shape = (case.tokens, case.batch)
            if shape not in prompts:
                prompts[shape] = prompt_for(model, case.tokens, case.batch, image_side)
            inputs = prompts[shape]
            try:
                yield run_case(
                    model, inputs, case, decode_tokens=decode_tokens, bandwidth=bandwidth, weight_bytes=weights,
                    options=options,
                )
            except Exception as err:  # one failed case (out of memory, say) must not end the run
                yield {**asdict(case), "key": case.key, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        del model, prompts
        gc.collect()
        torch.cuda.empty_cache()


def prefill_over_full(row: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """What statistics, selection and merging add to the prefill: ``row``'s prefill seconds over those of the
    full cache with the same shape, decode path and chunking among ``rows`` (measured rows of one run:
    prefill times of different code are not comparable), minus 1; None where there is no such full row."""
    same = ("preset", "tokens", "batch", "decode", "chunk")
    for full in rows:
        if (
            full is not row
            and full.get("method") == "full"
            and full.get("decode") != "stock"
            and "prefill_s" in full
            and all(full.get(k) == row.get(k) for k in same)
        ):
            return row["prefill_s"] / full["prefill_s"] - 1
    return None


def print_rows(rows: list[dict[str, Any]]) -> None:
    """A readable table of measured rows (device records and errors are listed apart)."""
    runs = [r for r in rows if r.get("kind") != "device" and "error" not in r]
    over = [prefill_over_full(r, runs) for r in runs]
    print_table(
        "decode speed (median ms/token of the generate loop; floor = weights + kept KV over copy bandwidth; "
        "prefill +: over the full cache's prefill in this run)",
        ["case", "prefill s", "prefill +", "decode ms", "replay ms", "floor ms", "x floor", "KV after", "peak"],
        [
            [
                r["key"],
                r["prefill_s"],
                f"{extra:+.1%}" if extra is not None else "-",
                r["decode_ms_per_token"],
                r["replay_ms"] if r["replay_ms"] is not None else "-",
                r["floor_ms"],
                r["ratio_to_floor"],
                human_bytes(r["kv_bytes_after"]),
                human_bytes(r["peak_bytes"]),
            ]
            for r, extra in zip(runs, over, strict=True)
        ],
    )
    for r in rows:
        if "error" in r:
            print(f"{r['key']}: {r['error']}")
