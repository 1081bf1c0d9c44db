"""The text tasks: seeded, about the asked length, the answer in the prompt, exact-match scoring."""

from __future__ import annotations

import pytest

from meda.kv.eval.tasks import all_tasks, get_task
from meda.kv.eval.tasks_text import CHARS_PER_TOKEN, first_number_match

TEXT_TASKS = ("passkey", "multikey", "vartrack")


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_seeded_sized_and_answerable(name: str) -> None:
    task = get_task(name)
    assert task.kind == "text" and task.sizes == (1024, 2048, 4096, 8192) and task.count is None
    for size in (1024, 4096):
        a, b, other = task.make(3, size), task.make(3, size), task.make(4, size)
        assert a.text == b.text and a.answer == b.answer  # same seed, same sample
        assert a.text != other.text
        assert a.answer.isdigit() and a.answer in a.text and not a.images
        estimated = len(a.text) / CHARS_PER_TOKEN
        assert 0.85 * size < estimated < 1.1 * size, (name, size, estimated)
        assert task.score(f"The answer is {a.answer}.", a) == 1.0
        assert task.score("I do not know.", a) == 0.0


def test_vartrack_chain_resolves_to_the_answer() -> None:
    import re

    sample = get_task("vartrack").make(0, 1024)
    asked = re.search(r"value of VAR (\w+)\?", sample.text).group(1)
    links = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", sample.text))
    values = dict(re.findall(r"VAR (\w+) = (\d+)\.", sample.text))
    seen = sample.text.index(f"VAR {asked} =")
    while asked in links:  # each copy appears after the assignment it copies
        source = links[asked]
        assert sample.text.index(f"VAR {source} =") < seen
        asked, seen = source, sample.text.index(f"VAR {source} =")
    assert values[asked] == sample.answer
    assert len(values) == sample.meta["chains"]


def test_multikey_asks_one_of_several_keys() -> None:
    sample = get_task("multikey").make(1, 2048)
    assert sample.text.count("The special magic number for") == 4
    assert f"magic number for {sample.meta['asked']} is: {sample.answer}." in sample.text


def test_first_number_match() -> None:
    sample = get_task("passkey").make(0, 1024)
    assert first_number_match(f"{sample.answer}", sample) == 1.0
    assert first_number_match(f"12 then {sample.answer}", sample) == 0.0  # the first number counts
    assert first_number_match(f"{sample.answer}7", sample) == 0.0


def test_registry_lists_text_tasks() -> None:
    assert set(TEXT_TASKS) <= set(all_tasks())
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
