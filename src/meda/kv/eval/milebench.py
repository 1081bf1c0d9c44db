"""MileBench (Song et al. 2024, the MEDA paper's benchmark) read from its own files.

Layout: ``ROOT/{task}/{task}.json`` holding

```
{"meta_data": {"task_instruction": ["...", ...], ...},
 "data": [{"sample_id": ..., "task_instruction_id": 0, "response": "...", "image_quantity_level": "Level-1",
           "task_instance": {"context": "... {image#1} ... {image#2} ...", "images_path": ["a.jpg", ...],
                             "choice_list": ["...", ...]}}, ...]}
```

Images are looked up in ``ROOT/{task}/images/`` (the released layout), else next to the JSON file.
Each ``{image#i}`` placeholder (1-based, into ``images_path``) becomes one image of the sample; images that
the context never names are put before it, as MileBench's own loader does. An item with a
``choice_list`` is multiple choice (options lettered A, B, ...; scored by the chosen letter or option
text); the others are open answers scored by ROUGE-L (F-measure over lower-cased words).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

from meda.kv.eval.tasks import IMAGE_PLACEHOLDER, Sample, TaskSpec

PREFIX = "milebench:"
_PLACEHOLDER = re.compile(r"\{image#(\d+)\}")
_WORD = re.compile(r"\w+")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) between two strings over lower-cased word tokens."""
    a, b = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return float(a == b)
    row = [0] * (len(b) + 1)
    for x in a:  # longest common subsequence, one row at a time
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def choice_score(prediction: str, sample: Sample) -> float:
    """1.0 when the prediction picks the right option: its first standalone option letter, else the first
    option text it contains (case-insensitive); 0.0 otherwise."""
    choices = sample.choices or []
    letters = _LETTERS[: len(choices)]
    picked = None
    found = re.search(rf"\b([{letters}])\b", prediction)
    if found:
        picked = letters.index(found.group(1))
    else:
        lower = prediction.lower()
        hits = [(lower.find(c.lower()), i) for i, c in enumerate(choices) if c and c.lower() in lower]
        picked = min(hits)[1] if hits else None
    return float(picked is not None and letters[picked] == sample.answer)


def open_score(prediction: str, sample: Sample) -> float:
    """ROUGE-L F-measure of the prediction against the reference answer."""
    return rouge_l(prediction, sample.answer)


def _task_files(path: Path) -> list[Path]:
    """The ``{task}/{task}.json`` files under ``path`` (a JSON file, a task folder, or a root of tasks)."""
    if path.is_file():
        return [path]
    if (own := path / f"{path.name}.json").is_file():
        return [own]
    found = sorted(p / f"{p.name}.json" for p in path.iterdir()) if path.is_dir() else []
    found = [p for p in found if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no MileBench task under {path}: expected {path}/{path.name}.json or {path}/TASK/TASK.json "
            "(the layout of the released MileBench data)"
        )
    return found


def _item_sample(item: dict[str, Any], instructions: list[str], folder: Path, index: int) -> Sample:
    """One MileBench item as a :class:`Sample` (images opened here)."""
    from PIL import Image

    try:
        instance = item["task_instance"]
        context, paths = instance["context"], list(instance["images_path"])
        instruction = instructions[int(item.get("task_instruction_id", 0))]
        response = str(item["response"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(
            f"MileBench item {index} of {folder.name} is malformed ({err!r}); see meda.kv.eval.milebench"
        ) from err
    named = [int(m) - 1 for m in _PLACEHOLDER.findall(context)]
    if any(not 0 <= i < len(paths) for i in named):
        raise ValueError(f"MileBench item {index} of {folder.name} names an image beyond its {len(paths)} images_path")
    unnamed = [i for i in range(len(paths)) if i not in named]
    order = unnamed + named
    text = IMAGE_PLACEHOLDER * len(unnamed) + _PLACEHOLDER.sub(IMAGE_PLACEHOLDER, context)
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    images = []
    for i in order:
        file = images_dir / paths[i]
        if not file.is_file():
            raise FileNotFoundError(f"MileBench image not found: {file} (item {index} of {folder.name})")
        images.append(Image.open(file).convert("RGB"))
    choices = instance.get("choice_list") or None
    answer = response
    prompt = f"{instruction}\n{text}"
    if choices:
        choices = [str(c) for c in choices]
        options = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        prompt += f"\nOptions:\n{options}\nAnswer with the option's letter from the given choices directly."
        if response in choices:
            answer = _LETTERS[choices.index(response)]
        elif response.strip().strip("()").upper() not in _LETTERS[: len(choices)]:
            raise ValueError(
                f"MileBench item {index} of {folder.name}: response {response!r} is neither an option nor its letter"
            )
        else:
            answer = response.strip().strip("()").upper()
    meta = {"sample_id": item.get("sample_id"), "image_quantity_level": item.get("image_quantity_level"),
            "images": len(images)}  # fmt: skip
    return Sample(text=prompt, answer=answer, images=images, choices=choices, meta=meta)


def _make(items: list[dict[str, Any]], instructions: list[str], folder: Path, index: int, size: int) -> Sample:
    return _item_sample(items[index % len(items)], instructions, folder, index % len(items))


def load_milebench(path: str | Path) -> list[TaskSpec]:
    """One :class:`TaskSpec` per MileBench task found at ``path`` (named ``milebench:{task}``).

    Multiple-choice tasks (items with a ``choice_list``) score by option, the others by ROUGE-L; a task
    that mixes both is scored item by item.
    """
    specs = []
    for file in _task_files(Path(path).expanduser()):
        try:
            payload = json.loads(file.read_text())
            instructions = list(payload["meta_data"]["task_instruction"])
            items = list(payload["data"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{file} is not a MileBench task file ({err!r}): it needs meta_data.task_instruction[] and data[]"
            ) from err
        if not items:
            raise ValueError(f"{file} holds no items in data[]")
        specs.append(
            TaskSpec(
                name=f"{PREFIX}{file.stem}",
                kind="multimodal",
                make=partial(_make, items, instructions, file.parent),
                sizes=(0,),
                max_new_tokens=32,
                score=_score,
                description=f"MileBench {file.stem}: {len(items)} items from {file}",
                count=len(items),
            )
        )
    return specs


def _score(prediction: str, sample: Sample) -> float:
    return choice_score(prediction, sample) if sample.choices else open_score(prediction, sample)
