"""The task registry shared by the text and the multimodal tasks.

A task turns ``(seed, size)`` into one :class:`Sample`: a prompt, its images, and the exact answer.
Text tasks live in :mod:`meda.kv.eval.tasks_text`, multimodal ones in :mod:`meda.kv.eval.tasks_mm`;
each registers itself with :func:`register`, so adding a task is one function in one module.

Prompt convention: ``Sample.text`` is the user turn; each image appears in it as the literal
placeholder :data:`IMAGE_PLACEHOLDER` (in the order of ``Sample.images``). The harness wraps the turn
in the model's chat template and replaces each placeholder by the processor's own image token, whose
expansion into patch tokens the processor does (never a fixed count here).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_PLACEHOLDER = "<image>"
TASK_MODULES = ("meda.kv.eval.tasks_text", "meda.kv.eval.tasks_mm")


@dataclass
class Sample:
    """One generated example.

    Attributes:
        text: the user turn, with one :data:`IMAGE_PLACEHOLDER` per image.
        answer: the exact expected answer (scored by the task's ``score``).
        images: PIL images, in placeholder order (empty for text tasks).
        choices: the options of a multiple-choice question, if any.
        meta: anything the task wants to record (needle depth, counts, ...), JSON-ready.
    """

    text: str
    answer: str
    images: list[Any] = field(default_factory=list)
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def exact_match(prediction: str, sample: Sample) -> float:
    """1.0 when the first whitespace-separated word of ``prediction`` equals the answer (case and
    surrounding punctuation ignored), else 0.0."""
    words = prediction.strip().split()
    first = words[0].strip(".,;:!?\"'()[]").lower() if words else ""
    return float(first == sample.answer.strip().lower())


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the CLI name (``passkey``, ``mm-needle``, ...).
        kind: ``text`` or ``multimodal``.
        make: ``make(seed, size) -> Sample``; ``size`` is the task's length knob (tokens for text
            tasks, images or frames for multimodal ones).
        sizes: the sizes the full evaluation runs; ``sizes[-1]`` is the largest.
        max_new_tokens: generation length that suffices for the answer.
        score: ``score(prediction, sample) -> float in [0, 1]``.
        description: one line for ``--help`` and the docs.
        count: how many distinct samples exist (the rows of a data set such as MileBench, where
            ``make(i, size)`` returns row ``i``); None for generated tasks, whose seeds never run out.
    """

    name: str
    kind: Literal["text", "multimodal"]
    make: Callable[[int, int], Sample]
    sizes: tuple[int, ...]
    max_new_tokens: int = 8
    score: Callable[[str, Sample], float] = exact_match
    description: str = ""
    count: int | None = None


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to :data:`TASKS` (a name may be registered once)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is registered twice")
    TASKS[spec.name] = spec
    return spec


def _load_task_modules() -> None:
    for module in TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a task module not written yet, never a missing dependency
            if err.name != module:
                raise


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; ``ValueError`` listing the known ones otherwise."""
    _load_task_modules()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def all_tasks() -> dict[str, TaskSpec]:
    """Every registered task by name."""
    _load_task_modules()
    return dict(TASKS)
