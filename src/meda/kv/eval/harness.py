"""The evaluation loop behind ``meda kv eval``: tasks x methods x budgets on one model.

For every sample (task, size, seed) the full cache answers once (:func:`~meda.kv.eval.fidelity.reference_run`);
every (method, budget) then answers from a compressed cache and is compared with it
(:func:`~meda.kv.eval.fidelity.compressed_run`). A cell (task, method, budget) aggregates its samples:
``accuracy`` (mean task score), ``accuracy_interval`` (its 95% Wilson interval where scores are 0/1),
``samples``, ``fidelity`` (mean ``token_agreement`` and ``kl`` over all compared continuation positions,
mean ``greedy_prefix`` over samples), the per-size accuracy, the mean kept fraction and prompt length.
``results.json`` is rewritten after every sample, so an interrupted run leaves every finished sample on disk.

Method specs are ``name`` or ``name:option=value,option=value`` (recipe overrides, e.g.
``meda:tau=4,merge=none``); the spec string is the row's ``method``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meda.kv.eval.fidelity import compressed_run, reference_run
from meda.kv.eval.inputs import eos_ids, sample_inputs
from meda.kv.eval.intervals import accuracy_interval
from meda.kv.eval.milebench import PREFIX, load_milebench
from meda.kv.eval.tasks import TaskSpec, get_task
from meda.kv.groups import vision_token_ids
from meda.kv.recipes import resolve_recipe


def parse_method(spec: str) -> tuple[str, dict[str, object]]:
    """``"meda:tau=4,merge=none"`` -> ``("meda", {"tau": 4, "merge": "none"})`` (validated)."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, object] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"method option {item!r} in {spec!r} must look like name=value, e.g. meda:tau=4")
        key, value = (x.strip() for x in item.split("=", 1))
        options[key] = value if key in _TEXT_OPTIONS else _parse_value(value)
    resolve_recipe(name, **options)  # unknown method / option -> ValueError now, not after the model loads
    return name, options


def split_methods(text: str) -> list[str]:
    """Method specs from the CLI: split on ``;`` when the text has one (specs with options), else on ``,``."""
    parts = text.split(";") if ";" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


_TEXT_OPTIONS = frozenset({"merge", "merge_targets", "allocator", "scorer"})  # "none" is a value there, not None


def _parse_value(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def resolve_tasks(names: Sequence[str]) -> list[TaskSpec]:
    """Task specs for CLI names: built-in task names and ``milebench:PATH`` (every MileBench task there)."""
    specs: list[TaskSpec] = []
    for name in names:
        specs += load_milebench(name[len(PREFIX) :]) if name.startswith(PREFIX) else [get_task(name)]
    return specs


@dataclass
class Cell:
    """Running sums of one (task, method, budget)."""

    scores: list[float] = field(default_factory=list)
    by_size: dict[int, list[float]] = field(default_factory=dict)
    agree: float = 0.0
    kl: float = 0.0
    positions: int = 0
    prefix: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, score: float, size: int, tokens: int, run: dict[str, Any] | None, seconds: float) -> None:
        self.scores.append(score)
        self.by_size.setdefault(size, []).append(score)
        self.tokens.append(tokens)
        self.seconds += seconds
        if run is not None:
            if run["positions"]:
                self.agree += run["token_agreement"] * run["positions"]
                self.kl += run["kl"] * run["positions"]
                self.positions += run["positions"]
            self.prefix.append(run["greedy_prefix"])
            self.kept.append(run["report"]["kept_fraction"])

    def row(self, task: str, method: str, budget: float | int, reference: bool) -> dict[str, Any]:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        if reference:
            fidelity: dict[str, Any] = {"reference": True, "token_agreement": 1.0, "kl": 0.0, "greedy_prefix": 1.0}
        else:
            fidelity = {
                "token_agreement": self.agree / self.positions if self.positions else None,
                "kl": self.kl / self.positions if self.positions else None,
                "greedy_prefix": mean(self.prefix),
                "positions": self.positions,
            }
        return {
            "task": task,
            "method": method,
            "budget": budget,
            "accuracy": mean(self.scores),
            "accuracy_interval": accuracy_interval(self.scores),
            "samples": len(self.scores),
            "fidelity": fidelity,
            "accuracy_by_size": {str(k): mean(v) for k, v in sorted(self.by_size.items())},
            "kept_fraction": 1.0 if reference else mean(self.kept),
            "prompt_tokens": mean(self.tokens),
            "seconds": self.seconds,
        }


def check_question_after(tasks: Sequence[TaskSpec], methods: Sequence[str]) -> None:
    """With the question fed after compression it is a prompt chunk over the compressed cache, split off after
    the last image: text tasks (no image) and methods whose allocator cannot compress chunk by chunk (VL-Cache's
    ``density``) are refused before any model loads.

    Raises:
        ValueError: naming those tasks or methods.
    """
    from meda.kv.chunked import CHUNK_ALLOCATORS

    text_tasks = [t.name for t in tasks if t.kind == "text"]
    if text_tasks:
        raise ValueError(
            f"--question-after-compression splits prompts after their last image; {', '.join(text_tasks)} "
            "have none (their answers are several tokens: run them without it)"
        )
    refused = []
    for spec in methods:
        name, options = parse_method(spec)
        recipe = resolve_recipe(name, **options)
        if recipe is not None and recipe.allocator not in CHUNK_ALLOCATORS:
            refused.append(f"{spec} (allocator {recipe.allocator})")
    if refused:
        raise ValueError(
            f"--question-after-compression feeds the question as a prompt chunk over the compressed cache, which "
            f"{', '.join(refused)} cannot compress (allocators that can: {', '.join(CHUNK_ALLOCATORS)}); "
            "drop them from --methods or run without the option"
        )


def question_tokens(input_ids: torch.Tensor, vision_ids: Sequence[int]) -> int:
    """How many tokens of a prompt ``input_ids [1, tokens]`` follow its last image (or video) token: the part
    that ``question_after_compression`` feeds after the compressed prefill.

    Raises:
        ValueError: the prompt holds no image token (a text task, or a model without vision ids).
    """
    ids = torch.tensor(list(vision_ids), device=input_ids.device, dtype=torch.long)
    is_vision = torch.isin(input_ids[0], ids)
    if not bool(is_vision.any()):
        raise ValueError(
            "question after compression splits a prompt after its last image; this prompt has no image token "
            "(run the text tasks without --question-after-compression: their answers are several tokens, so "
            "the cache already decides all but the first)"
        )
    after = int(input_ids.shape[1]) - int(is_vision.nonzero()[-1]) - 1
    if after == 0:
        raise ValueError("the prompt ends with an image: no question follows it to feed after compression")
    return after


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    *,
    model_name: str,
    tasks: Sequence[TaskSpec],
    methods: Sequence[str],
    budgets: Sequence[float | int],
    samples: int,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    new_tokens: int | None = None,
    out: Path | None = None,
    progress: bool = True,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    question_after_compression: bool = False,
) -> dict[str, Any]:
    """Run the evaluation and return the ``results.json`` payload (also written to ``out`` as it goes).

    Args:
        tasks: task specs (:func:`resolve_tasks`); methods: method specs (``full`` gives the reference
            row at budget 1.0, computed once per sample whether listed or not).
        budgets: kept fractions (or tokens per layer) for every compressed method.
        samples: samples per task and size (for a data set: its first ``samples`` rows).
        seed: sample ``i`` of a generated task is ``make(seed + i, size)``.
        sizes: sizes to run for every task (default: each task's own ``sizes``).
        new_tokens: answer length (default: each task's ``max_new_tokens``).
        question_after_compression: compress each prompt up to and including its last image token first and
            feed the rest (the question) over the compressed cache (:func:`question_tokens`), so that every
            answer token reads the compressed cache; prompts without images raise ``ValueError``.
    """
    from tqdm import tqdm

    parsed = {spec: parse_method(spec) for spec in methods}
    if question_after_compression:
        check_question_after(tasks, methods)
    compressed = [spec for spec, (name, _) in parsed.items() if name != "full"]
    eos = eos_ids(model, processor)
    plan = [
        (task, size, i)
        for task in tasks
        for size in (sizes or task.sizes)
        for i in range(min(samples, task.count) if task.count else samples)
    ]
    cells: dict[tuple[str, str, float | int], Cell] = {}
    payload: dict[str, Any] = {
        "model": model_name,
        "runs": [],
        "config": {  # from the start, so that a cut-off run's results.json still says which seeds it covers
            "tasks": [t.name for t in tasks],
            "methods": list(methods),
            "budgets": list(budgets),
            "samples": samples,
            "seed": seed,
            "sizes": list(sizes) if sizes else None,
            "device": str(device),
            "question_after_compression": question_after_compression,
        },
    }
    vision_ids = vision_token_ids(model.config) if question_after_compression else []
    bar = tqdm(total=len(plan) * (1 + len(compressed) * len(budgets)), desc="eval", unit="run", disable=not progress)
    started = time.perf_counter()
    with torch.inference_mode():
        for task, size, i in plan:
            sample = task.make(seed + i, size)
            inputs = sample_inputs(processor, sample, device=device)
            n_tokens = int(inputs["input_ids"].shape[1])
            query = question_tokens(inputs["input_ids"], vision_ids) if question_after_compression else 0
            tokenizer = getattr(processor, "tokenizer", processor)
            t0 = time.perf_counter()
            ref = reference_run(model, inputs, new_tokens or task.max_new_tokens, eos)
            answer = tokenizer.decode(ref.tokens, skip_special_tokens=True).strip()
            cells.setdefault((task.name, "full", 1.0), Cell()).add(
                task.score(answer, sample), size, n_tokens, None, time.perf_counter() - t0
            )
            bar.update()
            for spec in compressed:
                name, options = parsed[spec]
                for budget in budgets:
                    bar.set_postfix_str(f"{task.name} {size} {spec} {budget}")
                    t0 = time.perf_counter()
                    run = compressed_run(
                        model, inputs, ref, name, budget, new_tokens or task.max_new_tokens, eos, options, query
                    )
                    prediction = tokenizer.decode(run["tokens"], skip_special_tokens=True).strip()
                    cells.setdefault((task.name, spec, budget), Cell()).add(
                        task.score(prediction, sample), size, n_tokens, run, time.perf_counter() - t0
                    )
                    bar.update()
            payload["runs"] = [cell.row(t, m, b, m == "full") for (t, m, b), cell in cells.items()]
            payload["seconds"] = time.perf_counter() - started
            if out is not None:
                from meda.report import write_json

                write_json(Path(out) / "results.json", payload)
            if on_sample is not None:
                on_sample(payload)
    bar.close()
    if out is not None:
        from meda.report import write_json

        write_json(Path(out) / "results.json", payload)
    return payload
