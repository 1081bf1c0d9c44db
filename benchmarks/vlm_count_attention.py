"""Where mm-count's answer position looks: attention from the prompt's last token to the matching images, by size.

A reading of the counting errors in docs/vlm-runs.md is that a count read from the attention the matching images
receive is diluted as the images grow. This measures it. For each model, held-out mm-count samples at each size
are prefilled with the full cache (one forward, no generation); at every layer and head the softmax of the last
prompt token's query (the position that writes the answer) is split into the mass on the image tokens of the
images that match the question (``M``), on the other images (``U``) and elsewhere (text, the first token).

Per head: *selectivity* at the smallest size, ``(M / c) / (U / (N - c))`` with ``c`` matches among ``N``
images; the ``--heads`` most selective heads of the model are its *matching heads*. For them the script prints,
per size, the mean mass per matching image (``M / c``) and the mean total on matching images (``M``): if a count
were read from ``M``, a per-match mass that falls with the size would show up as under-counting at large sizes.

    python benchmarks/vlm_count_attention.py --models meda-vlm-mini,/tmp/ck13,/tmp/ck14 --sizes 8,64 --samples 6

Checkpoint folders come from ``python -m meda.kv.vlm.assemble --weights RUN/meda-vlm-mini --out DIR``.
CPU: about 20 s per 64-image sample on two cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.tasks_mm import make_count
from meda.kv.models import load_model

PROBE = "meda_count_probe"


class LastRowRecorder:
    """An attention function (registered as :data:`PROBE`) that runs stock SDPA and, for the language model's
    layers, keeps the last query's attention weights ``[heads, keys]`` (float32) per layer."""

    def __init__(self, layers: list[Any]) -> None:
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):
        layer = self.index.get(id(module))
        if layer is not None:
            keys = repeat_kv(key, query.shape[1] // key.shape[1])  # [1, heads, keys, dim]
            scores = (query[:, :, -1:].float() @ keys.float().transpose(-1, -2)) * module.scaling
            self.rows[layer] = scores.softmax(-1)[0, :, 0]  # the last query sees every key (causal)
        return sdpa_attention_forward(module, query, key, value, mask, **kw)


def install(model: Any, layers: list[Any], sub_config: str | None = None) -> LastRowRecorder:
    """Register a recorder for ``layers`` and switch ``model`` (or its ``sub_config`` part) to it."""
    recorder = LastRowRecorder(layers)
    AttentionInterface.register(PROBE, recorder)
    AttentionMaskInterface.register(PROBE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation({sub_config: PROBE} if sub_config else PROBE)
    return recorder


def image_masses(row: torch.Tensor, image_positions: torch.Tensor, matching: list[bool]) -> tuple[list, list]:
    """``row`` ``[heads, keys]`` -> per head, the mass on matching images and on the other images."""
    per_image = row[:, image_positions].reshape(row.shape[0], len(matching), -1).sum(-1)  # [heads, images]
    hit = torch.tensor(matching)
    return per_image[:, hit].sum(-1).tolist(), per_image[:, ~hit].sum(-1).tolist()


def measure(model_name: str, sizes: list[int], samples: int) -> list[dict]:
    model, processor = load_model(model_name, device="cpu")
    layers = [layer.self_attn for layer in model.model.language_model.layers]
    recorder = install(model, layers, "text_config")
    image_id = model.config.image_token_id
    records = []
    for size in sizes:
        for seed in range(samples):
            sample = make_count(seed, size)
            inputs = sample_inputs(processor, sample)
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
            positions = (inputs["input_ids"][0] == image_id).nonzero().flatten()
            matching = [name == sample.meta["target"] for name in sample.meta["items"]]
            for layer, row in sorted(recorder.rows.items()):
                hit, miss = image_masses(row, positions, matching)
                records.append({"model": model_name, "size": size, "seed": seed, "count": sum(matching),
                                "layer": layer, "matching": hit, "other": miss})
            print(f"{model_name}: {size} images, seed {seed} done", flush=True)
    return records


def report(records: list[dict], heads: int) -> None:
    """Per model: its ``heads`` most selective heads at the smallest size, and their masses per size."""
    for model_name in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model_name]
        sizes = sorted({r["size"] for r in mine})
        small = [r for r in mine if r["size"] == sizes[0]]
        n_heads = len(small[0]["matching"])
        select: dict[tuple[int, int], float] = {}
        for layer in sorted({r["layer"] for r in small}):
            rows = [r for r in small if r["layer"] == layer]
            for h in range(n_heads):
                per_match = sum(r["matching"][h] / r["count"] for r in rows) / len(rows)
                per_other = sum(r["other"][h] / (r["size"] - r["count"]) for r in rows) / len(rows)
                select[(layer, h)] = per_match / max(per_other, 1e-9)
        top = sorted(select, key=select.get, reverse=True)[:heads]
        print(f"\n{model_name}: matching heads (layer.head, selectivity at {sizes[0]} images): "
              + ", ".join(f"{layer}.{h} ({select[(layer, h)]:.0f}x)" for layer, h in top))
        print("| images | mass per matching image | mass on all matching images | mass on the other images "
              "| correlation of the count with the mass on matching images |")
        print("|---|---|---|---|---|")
        for size in sizes:
            rows = [r for r in mine if r["size"] == size]
            picks = [(r, h) for r in rows for (layer, h) in top if r["layer"] == layer]
            per = sum(r["matching"][h] / r["count"] for r, h in picks) / len(picks)
            total = sum(r["matching"][h] for r, h in picks) / len(picks)
            other = sum(r["other"][h] for r, h in picks) / len(picks)
            by_sample: dict[int, list[float]] = {}
            for r, h in picks:
                by_sample.setdefault(r["seed"], [r["count"], 0.0])[1] += r["matching"][h] / len(top)
            pairs = torch.tensor(list(by_sample.values())).T  # [2, samples]: count, mean mass on matching images
            print(f"| {size} | {per:.3f} | {total:.3f} | {other:.3f} | {float(torch.corrcoef(pairs)[0, 1]):+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="meda-vlm-mini", help="comma list: aliases or checkpoint folders")
    p.add_argument("--sizes", default="8,64", help="comma list of image counts (the first picks the heads)")
    p.add_argument("--samples", type=int, default=6, help="held-out samples per size (seeds 0 ..)")
    p.add_argument("--heads", type=int, default=5, help="matching heads reported per model")
    p.add_argument("--json", type=Path, help="write every record here (or read them with --report)")
    p.add_argument("--report", action="store_true", help="only print the tables from --json")
    args = p.parse_args()
    if args.report:
        report(json.loads(args.json.read_text()), args.heads)
        return
    records = []
    for name in args.models.split(","):
        records += measure(name, [int(s) for s in args.sizes.split(",")], args.samples)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for r in records:  # five decimals: the masses that matter are above 1e-4
            r["matching"], r["other"] = [round(x, 5) for x in r["matching"]], [round(x, 5) for x in r["other"]]
        args.json.write_text(json.dumps(records) + "\n")
    report(records, args.heads)


if __name__ == "__main__":
    main()
