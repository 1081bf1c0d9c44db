"""Training batches for ``meda-vlm-mini``: the four multimodal tasks plus a ``describe`` warm-up task.

Prompts are built by the evaluation harness's own :func:`meda.kv.eval.inputs.sample_inputs`, so the model
is trained on exactly the prompts it is evaluated on. A batch is a pure function of ``(seed, index)``: the
task, the number of images and the sample seeds are drawn from ``random.Random(f"{seed}/{index}")``, and
every sample seed is ``>= TRAIN_SEED_START`` (disjoint from the evaluation seeds). So an interrupted run
that resumes at batch ``index`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.tasks import IMAGE_PLACEHOLDER, Sample
from meda.kv.eval.tasks_mm import (
    ITEMS,
    TRAIN_SEED_START,
    make_assoc,
    make_count,
    make_needle,
    make_order,
    random_placement,
    render,
)
from meda.kv.vlm.architecture import TOKENS_PER_IMAGE

ANSWER_END = "<|im_end|>"


def make_describe(seed: int, size: int) -> Sample:
    """Warm-up task (training only): ``size`` images; name the item shown in one of them."""
    rng = random.Random(f"describe/{seed}/{size}")
    items = [rng.choice(ITEMS) for _ in range(size)]
    images = [render(item, random_placement(rng)) for item in items]
    k = rng.randrange(size)
    text = "".join(f"Image {i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(size))
    text += f"What does image {k + 1} show? Answer with the colour and the object."
    meta = {"items": [item.describe() for item in items]}
    return Sample(text=text, answer=items[k].describe(), images=images, meta=meta)


# what an image shows, as a class index: ITEMS' order, then one class for an empty video frame
ITEM_NAMES = (*(item.describe() for item in ITEMS), "empty")
_ITEM_INDEX = {name: i for i, name in enumerate(ITEM_NAMES)}


# name -> (make, weight in the training mix)
TRAIN_TASKS: dict[str, tuple[Callable[[int, int], Sample], float]] = {
    "describe": (make_describe, 0.2),
    "mm-needle": (make_needle, 0.2),
    "mm-count": (make_count, 0.2),
    "mm-order": (make_order, 0.2),
    "mm-assoc": (make_assoc, 0.2),
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


def draw_spec(
    seed: int, index: int, max_images: int, tasks: tuple[str, ...] = tuple(TRAIN_TASKS), describe_first: int = 0
) -> tuple[str, int, int]:
    """``(task, images per sample, salt of the sample seeds)`` of batch ``index``: ``describe`` for the first
    ``describe_first`` batches (grounding the vision tower first), then a task drawn from ``tasks`` by
    weight; sizes half log-uniform, half uniform (``describe``: 1-8 images)."""
    rng = random.Random(f"{seed}/{index}")
    drawn = rng.choices(tasks, weights=[TRAIN_TASKS[n][1] for n in tasks])[0]
    task = "describe" if index < describe_first else drawn
    low, high = (1, min(8, max_images)) if task == "describe" else (min(3, max_images), max_images)
    size = round(low * (high / low) ** rng.random()) if rng.random() < 0.5 else rng.randint(low, high)
    return task, max(low, min(high, size)), rng.randrange(2**31)


def make_batch(
    processor: Any,
    seed: int,
    index: int,
    max_images: int,
    tokens_per_batch: int,
    tasks: tuple[str, ...] = tuple(TRAIN_TASKS),
    describe_first: int = 0,
) -> Batch:
    """Batch ``index`` of the stream ``seed``: as many samples of one task and size as fit the token budget."""
    task, size, salt = draw_spec(seed, index, max_images, tasks, describe_first)
    per_sample = size * (TOKENS_PER_IMAGE + 8) + 80
    count = max(1, tokens_per_batch // per_sample)
    make = TRAIN_TASKS[task][0]
    tokenizer = processor.tokenizer
    end = tokenizer(ANSWER_END, add_special_tokens=False)["input_ids"]
    rows, pixels, answers, items = [], [], [], []
    for j in range(count):
        sample = make(TRAIN_SEED_START + salt * 4096 + j, size)
        enc = sample_inputs(processor, sample)
        answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + end
        rows.append(enc["input_ids"][0].tolist() + answer)
        answers.append(len(answer))
        pixels.append(enc["pixel_values"])
        items += [_ITEM_INDEX[name or "empty"] for name in sample.meta["items"]]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((count, width), pad, dtype=torch.long)
    positions, targets = [], []
    for b, (row, n) in enumerate(zip(rows, answers, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        start = len(row) - n
        positions.extend(b * width + p - 1 for p in range(start, len(row)))
        targets.extend(row[start:])
    return Batch(
        ids, torch.cat(pixels), torch.tensor(positions), torch.tensor(targets), torch.tensor(items), task, size
    )


class BatchStream(torch.utils.data.IterableDataset):
    """Batches ``start, start + 1, ...`` of the stream; with DataLoader workers each worker makes every
    ``num_workers``-th batch and the loader's round-robin keeps the order."""

    def __init__(
        self,
        processor: Any,
        seed: int,
        start: int,
        max_images: int,
        tokens_per_batch: int,
        tasks: tuple[str, ...] = tuple(TRAIN_TASKS),
        describe_first: int = 0,
    ) -> None:
        super().__init__()
        self.processor, self.seed, self.start, self.tasks = processor, seed, start, tasks
        self.describe_first = describe_first
        self.max_images, self.tokens_per_batch = max_images, tokens_per_batch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield make_batch(
                self.processor,
                self.seed,
                index,
                self.max_images,
                self.tokens_per_batch,
                self.tasks,
                self.describe_first,
            )
            index += workers
