"""Training batches for ``meda-vlm-mini``: the four multimodal tasks plus a ``describe`` warm-up task.

Prompts are built by the evaluation harness's own :func:`meda.kv.eval.inputs.sample_inputs`, so the model
is trained on exactly the prompts it is evaluated on. A batch is a pure function of ``(seed, index)``: the
task, the number of images and the sample seeds are drawn from ``random.Random(f"{seed}/{index}")``, and
every sample seed is ``>= TRAIN_SEED_START`` (disjoint from the evaluation seeds). So an interrupted run
that resumes at batch ``index`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.tasks import IMAGE_PLACEHOLDER, Sample
from meda.kv.eval.tasks_mm import (
    COUNT_RANGE,
    ITEMS,
    TRAIN_SEED_START,
    assoc_question,
    count_question,
    make_assoc,
    make_count,
    make_needle,
    make_order,
    needle_question,
    order_question,
    random_placement,
    render,
)
from meda.kv.vlm.architecture import TOKENS_PER_IMAGE

ANSWER_END = "<|im_end|>"


def describe_question(index: int) -> str:
    return f"What does image {index + 1} show? Answer with the colour and the object."


def make_describe(seed: int, size: int) -> Sample:
    """Warm-up task (training only): ``size`` images; name the item shown in one of them."""
    rng = random.Random(f"describe/{seed}/{size}")
    items = [rng.choice(ITEMS) for _ in range(size)]
    images = [render(item, random_placement(rng)) for item in items]
    k = rng.randrange(size)
    text = "".join(f"Image {i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(size)) + describe_question(k)
    meta = {"items": [item.describe() for item in items], "asked": k}
    return Sample(text=text, answer=items[k].describe(), images=images, meta=meta)


SHUFFLED_TASKS = ("mm-needle", "describe")  # the tasks whose answers or questions name an image by its number


def shuffle_labels(sample: Sample, rng: random.Random) -> Sample:
    """``sample`` (an mm-needle or describe sample) with its images numbered in a random order: the ``Image k:``
    labels become a permutation of 1..N drawn from ``rng``, kept in ``meta["labels"]`` (image ``i``'s label).
    The needle's answer becomes its image's label; describe's question names the asked image's label (training
    only: the evaluation numbers images 1..N, and a model may lean on that order instead of reading the label,
    docs/vlm-runs.md, fifteenth run)."""
    size = len(sample.meta["items"])
    labels = rng.sample(range(1, size + 1), size)
    numbers = iter(labels)
    body, question = sample.text.rsplit("\n", 1)
    body = re.sub(r"^Image \d+:", lambda _: f"Image {next(numbers)}:", body, flags=re.MULTILINE)
    meta, answer = {**sample.meta, "labels": labels}, sample.answer
    if "position" in meta:  # mm-needle: the answer is the needle's number
        answer = str(labels[meta["position"] - 1])
    elif "asked" in meta:  # describe: the question names the image by its number
        question = describe_question(labels[meta["asked"]] - 1)
    else:
        raise ValueError(f"only {' and '.join(SHUFFLED_TASKS)} samples can be numbered in a random order")
    return dataclasses.replace(sample, text=f"{body}\n{question}", answer=answer, meta=meta)


def _labels(sample: Sample) -> list[int]:
    """Image ``i``'s number in the prompt: ``i + 1`` unless :func:`shuffle_labels` drew another order."""
    return sample.meta.get("labels") or list(range(1, len(sample.meta["items"]) + 1))


# what an image shows, as a class index: ITEMS' order, then one class for an empty video frame
ITEM_NAMES = (*(item.describe() for item in ITEMS), "empty")
_ITEM_INDEX = {name: i for i, name in enumerate(ITEM_NAMES)}


_BY_NAME = {item.describe(): item for item in ITEMS}


QA = tuple[str, str]


def _order_pool(sample: Sample, rng: random.Random) -> list[QA]:
    other = "last" if sample.meta["which"] == "first" else "first"
    kinds = [_BY_NAME[name].kind for name in sample.meta["events"].values()]  # in frame order
    return [(order_question(rng.sample(kinds, 3), other), kinds[0] if other == "first" else kinds[-1])]


def _describe_pool(sample: Sample, rng: random.Random) -> list[QA]:
    labels = _labels(sample)
    return [(describe_question(labels[i] - 1), name) for i, name in enumerate(sample.meta["items"])]


def _needle_pool(sample: Sample, rng: random.Random) -> list[QA]:
    names, labels = sample.meta["items"], _labels(sample)
    tally = Counter(names)
    return [(needle_question(_BY_NAME[n]), str(labels[i])) for i, n in enumerate(names) if tally[n] == 1]


def _count_pool(sample: Sample, rng: random.Random) -> list[QA]:
    low, high = sample.meta["count_range"]
    tally = Counter(sample.meta["items"])
    return [(count_question(_BY_NAME[n]), str(c)) for n, c in tally.items() if n and low <= c <= high]


def count_list_question(item: str) -> str:
    return f"Which images show a {item}? Answer with the image numbers in order."


def _count_list_pool(sample: Sample) -> list[QA]:
    """Training only (``BatchOptions.count_list``): for every item in 2 up to the top of the sample's
    ``count_range`` of the images, which images they are (``"3, 17, 40"``), so that a count sample also trains
    finding each match, not only their sum."""
    names = sample.meta["items"]
    where: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name:
            where.setdefault(name, []).append(i + 1)
    low, high = sample.meta["count_range"]
    low = max(2, low)
    return [(count_list_question(n), ", ".join(map(str, at))) for n, at in where.items() if low <= len(at) <= high]


def _assoc_pool(sample: Sample, rng: random.Random) -> list[QA]:
    pairs = zip(sample.meta["items"], sample.meta["words"], strict=True)
    return [(assoc_question(_BY_NAME[n]), w) for n, w in pairs]


# task -> every (question, answer) the task could ask about a sample's images
_FOLLOW_UP_POOLS: dict[str, Callable[[Sample, random.Random], list[QA]]] = {
    "describe": _describe_pool,
    "mm-needle": _needle_pool,
    "mm-count": _count_pool,
    "mm-order": _order_pool,
    "mm-assoc": _assoc_pool,
}


def _one_per_count(pool: list[QA], taken: str) -> list[QA]:
    """``pool`` without count questions whose answer another one (or ``taken``, the sample's own) already has."""
    seen, kept = {taken}, []
    for question, answer in pool:
        if answer.isdigit():
            if answer in seen:
                continue
            seen.add(answer)
        kept.append((question, answer))
    return kept


def follow_ups(
    task: str, sample: Sample, rng: random.Random, count: int, count_list: bool = False, balance: bool = False
) -> list[QA]:
    """Up to ``count`` more ``(question, answer)`` turns on the same images, each a question the task itself
    asks, with its exact answer, other than the one ``sample`` asks (training only); with ``count_list``,
    mm-count's pool also holds :func:`_count_list_pool`'s questions.

    Why: one sample's answer is 2-3 tokens against 600-4,600 prompt tokens, so a step learns from very few
    targets; follow-up turns give the same forward pass several. ``mm-count`` keeps at most one follow-up
    whose answer is 1 (most items of a sample appear once), so the answers do not lean towards 1; with
    ``balance``, at most one per count and none with the sample's own (with ``make_count(plant=True)``
    samples: each count 1-6 once, at every size that has room for them).
    """
    if task not in _FOLLOW_UP_POOLS:
        raise ValueError(f"no follow-up questions for task {task!r}")
    pool = [qa for qa in _FOLLOW_UP_POOLS[task](sample, rng) if not sample.text.endswith(qa[0])]
    if task == "mm-count" and count_list:
        pool += _count_list_pool(sample)
    rng.shuffle(pool)
    if task == "mm-count" and balance:
        pool = _one_per_count(pool, sample.answer)
    elif task == "mm-count":
        ones = [qa for qa in pool if qa[1] == "1"]
        pool = [qa for qa in pool if qa[1] != "1"] + ones[:1]
        rng.shuffle(pool)
    return pool[:count]


# name -> (make, weight in the training mix). Needle and count weigh most: in the third H200 run (equal
# weights) describe, order and assoc had answer losses of 0.001-0.007 at step 1,200, needle and count 0.5.
TRAIN_TASKS: dict[str, tuple[Callable[[int, int], Sample], float]] = {
    "describe": (make_describe, 0.1),
    "mm-needle": (make_needle, 0.3),
    "mm-count": (make_count, 0.3),
    "mm-order": (make_order, 0.15),
    "mm-assoc": (make_assoc, 0.15),
}


@dataclass
class Batch:
    """One training batch.

    Attributes:
        input_ids: ``[batch, tokens]``, right-padded (causal attention never sees the padding).
        pixel_values: ``[images, 3, H, W]``, all images of the batch in order.
        positions: ``[targets]`` flat indices into ``batch * tokens`` whose next token is a target.
        targets: ``[targets]`` the answer token ids (answer + end of turn).
        items: ``[images]`` what each image shows, an index into :data:`ITEM_NAMES`.
        task: which task the batch holds; images: images per sample.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    items: torch.Tensor
    task: str
    images: int


def parse_mix(text: str) -> dict[str, float]:
    """``"mm-count=0.45,mm-needle,describe=0.05"`` -> ``{task: weight}``; a bare name takes its default weight
    from :data:`TRAIN_TASKS`. Raises ``ValueError`` naming an unknown task or a bad weight."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in TRAIN_TASKS:
            raise ValueError(f"unknown training task {name!r}; choose from {', '.join(TRAIN_TASKS)}")
        try:
            mix[name] = float(weight) if weight else TRAIN_TASKS[name][1]
        except ValueError:
            raise ValueError(f"weight of {name!r} must be a number, got {weight!r}") from None
        if not mix[name] > 0:
            raise ValueError(f"weight of {name!r} must be positive, got {mix[name]}")
    if not mix:
        raise ValueError("no training task given")
    return mix


DEFAULT_MIX = {name: weight for name, (_, weight) in TRAIN_TASKS.items()}


@dataclass(frozen=True)
class BatchOptions:
    """What a training run may change about its batches. The defaults draw plain batches (one question per
    sample, no describe warm-up); :mod:`meda.kv.vlm.train`'s flags set what the shipped weights saw.

    Attributes:
        mix: ``{task: weight}``, the share of the batches of each task (:func:`parse_mix`).
        describe_first: the first batches that are all ``describe`` (grounding the vision tower first).
        questions: question-answer turns per sample: the task's own, then :func:`follow_ups`.
        count_half_match: the share of hard negatives among mm-count's other images
            (:func:`~meda.kv.eval.tasks_mm.make_count`).
        large_share: the share of task batches (not ``describe``) drawn at ``max_images / 2`` to ``max_images``
            images; 0 draws exactly what runs before this option drew.
        large_after: the batch index from which ``large_share`` applies (a curriculum: the batches before it
            are exactly those of ``large_share=0``, the ones from it on exactly those of ``large_share``).
        count_list: mm-count's follow-ups also ask which images show an item (:func:`_count_list_pool`).
        count_balance: mm-count samples plant items in 1-6 images and ask about each count once
            (``make_count(plant=True)``, ``follow_ups(balance=True)``): the count targets are then about
            uniform at every size, where otherwise 64-image samples ask 65% of their counts with answer 2.
        shuffle_labels: the share of mm-needle and describe samples whose images are numbered in a random order
            (:func:`shuffle_labels`), so that only the label before an image tells its number.
        count_max: the largest count mm-count's samples and follow-ups ask (``make_count(max_count=...)``);
            the evaluation asks 1-6.
    """

    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    describe_first: int = 0
    questions: int = 1
    count_half_match: float = 0.0
    large_share: float = 0.0
    large_after: int = 0
    count_list: bool = False
    count_balance: bool = False
    shuffle_labels: float = 0.0
    count_max: int = COUNT_RANGE[1]


def draw_spec(seed: int, index: int, max_images: int, options: BatchOptions = BatchOptions()) -> tuple[str, int, int]:
    """``(task, images per sample, salt of the sample seeds)`` of batch ``index``: ``describe`` for the first
    ``options.describe_first`` batches, then a task drawn from ``options.mix`` by weight; sizes half
    log-uniform, half uniform (``describe``: 1-8 images), and from batch ``options.large_after`` on, with
    probability ``options.large_share`` (not for ``describe``), uniform over the upper half."""
    rng = random.Random(f"{seed}/{index}")
    drawn = rng.choices(tuple(options.mix), weights=tuple(options.mix.values()))[0]
    task = "describe" if index < options.describe_first else drawn
    low, high = (1, min(8, max_images)) if task == "describe" else (min(3, max_images), max_images)
    size = round(low * (high / low) ** rng.random()) if rng.random() < 0.5 else rng.randint(low, high)
    tilted = options.large_share > 0 and index >= options.large_after and task != "describe"
    if tilted and rng.random() < options.large_share:
        size = rng.randint(max(low, high // 2), high)
    return task, max(low, min(high, size)), rng.randrange(2**31)


def conversation(
    tokenizer: Any, prompt: list[int], answer: str, turns: list[QA]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``prompt`` (ending in the assistant's generation prompt) + ``answer``, then each follow-up
    ``(question, answer)`` as a further user and assistant turn in SmolLM2's chat format, and the
    ``[start, stop)`` span of every answer with its end-of-turn token (the training targets)."""

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    row, spans = list(prompt), []
    for question, reply in [(None, answer), *turns]:
        if question is not None:
            row += tokens(f"\n<|im_start|>user\n{question}{ANSWER_END}\n<|im_start|>assistant\n")
        target = tokens(reply + ANSWER_END)
        spans.append((len(row), len(row) + len(target)))
        row += target
    return row, spans


def make_batch(
    processor: Any,
    seed: int,
    index: int,
    max_images: int,
    tokens_per_batch: int,
    options: BatchOptions = BatchOptions(),
) -> Batch:
    """Batch ``index`` of the stream ``seed``: as many samples of one task and size (:func:`draw_spec`) as fit
    the token budget, each with up to ``options.questions`` question-answer turns (every answer and its
    end-of-turn token is a target)."""
    task, size, salt = draw_spec(seed, index, max_images, options)
    questions = options.questions
    per_sample = size * (TOKENS_PER_IMAGE + 8) + 80 + 30 * (questions - 1)
    count = max(1, tokens_per_batch // per_sample)
    make = TRAIN_TASKS[task][0]
    if task == "mm-count":
        make = functools.partial(
            make_count, half_match=options.count_half_match, plant=options.count_balance, max_count=options.count_max
        )
    tokenizer = processor.tokenizer
    rows, pixels, spans, items = [], [], [], []
    for j in range(count):
        sample_seed = TRAIN_SEED_START + salt * 4096 + j
        sample = make(sample_seed, size)
        if task in SHUFFLED_TASKS and random.Random(f"shuffle/{sample_seed}").random() < options.shuffle_labels:
            sample = shuffle_labels(sample, random.Random(f"labels/{sample_seed}"))
        enc = sample_inputs(processor, sample)
        turns = follow_ups(
            task, sample, random.Random(sample_seed), questions - 1, options.count_list, options.count_balance
        )
        row, row_spans = conversation(tokenizer, enc["input_ids"][0].tolist(), sample.answer, turns)
        rows.append(row)
        spans.append(row_spans)
        pixels.append(enc["pixel_values"])
        items += [_ITEM_INDEX[name or "empty"] for name in sample.meta["items"]]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((count, width), pad, dtype=torch.long)
    positions, targets = [], []
    for b, (row, row_spans) in enumerate(zip(rows, spans, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        for start, stop in row_spans:
            positions.extend(b * width + p - 1 for p in range(start, stop))
            targets.extend(row[start:stop])
    return Batch(
        ids, torch.cat(pixels), torch.tensor(positions), torch.tensor(targets), torch.tensor(items), task, size
    )


class BatchStream(torch.utils.data.IterableDataset):
    """Batches ``start, start + 1, ...`` of the stream; with DataLoader workers each worker makes every
    ``num_workers``-th batch and the loader's round-robin keeps the order."""

    def __init__(
        self, processor: Any, seed: int, start: int, max_images: int, tokens_per_batch: int, options: BatchOptions
    ) -> None:
        super().__init__()
        self.processor, self.seed, self.start, self.options = processor, seed, start, options
        self.max_images, self.tokens_per_batch = max_images, tokens_per_batch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield make_batch(self.processor, self.seed, index, self.max_images, self.tokens_per_batch, self.options)
            index += workers
