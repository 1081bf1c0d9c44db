"""MileBench's file format, read from rows this test writes; ROUGE-L and option scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meda.kv.eval.harness import resolve_tasks
from meda.kv.eval.milebench import load_milebench, rouge_l
from meda.kv.eval.tasks import IMAGE_PLACEHOLDER


def write_task(root: Path, name: str, items: list[dict], images: list[str]) -> Path:
    from PIL import Image

    folder = root / name
    (folder / "images").mkdir(parents=True)
    for i, file in enumerate(images):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / file)
    payload = {"meta_data": {"task_instruction": ["Look at the images.", "Answer briefly."]}, "data": items}
    (folder / f"{name}.json").write_text(json.dumps(payload))
    return folder


def item(i: int, context: str, paths: list[str], response: str, choices: list[str] | None = None) -> dict:
    instance = {"context": context, "images_path": paths}
    if choices is not None:
        instance["choice_list"] = choices
    return {
        "sample_id": i,
        "task_instruction_id": i % 2,
        "response": response,
        "image_quantity_level": "Level-1",
        "task_instance": instance,
    }


def test_multiple_choice_task(tmp_path: Path) -> None:
    rows = [
        item(0, "Which is red? {image#2} or {image#1}", ["a.png", "b.png"], "B", ["first", "second"]),
        item(1, "Pick one: {image#1}", ["a.png", "b.png"], "second", ["first", "second"]),  # b.png not named
    ]
    write_task(tmp_path, "ObjectOrder", rows, ["a.png", "b.png"])
    (task,) = load_milebench(tmp_path / "ObjectOrder")
    assert task.name == "milebench:ObjectOrder" and task.count == 2 and task.kind == "multimodal"
    first = task.make(0, 0)
    assert first.text.startswith("Look at the images.\nWhich is red? <image> or <image>")
    assert "A. first\nB. second" in first.text and first.answer == "B"
    assert first.images[0].getpixel((0, 0)) == (40, 0, 0)  # {image#2} comes first, as placed
    second = task.make(1, 0)
    assert second.answer == "B"  # the response was the option text
    assert second.text.count(IMAGE_PLACEHOLDER) == len(second.images) == 2  # the unnamed image is put first
    assert second.images[0].getpixel((0, 0)) == (40, 0, 0)
    assert task.score("B", first) == 1.0 and task.score("(B) second", first) == 1.0
    assert task.score("A", first) == 0.0 and task.score("the second one", first) == 1.0
    assert task.score("no idea", first) == 0.0


def test_open_answers_use_rouge_l_and_roots_hold_several_tasks(tmp_path: Path) -> None:
    write_task(tmp_path, "Caption", [item(0, "{image#1} Describe it.", ["x.png"], "a red square")], ["x.png"])
    write_task(tmp_path, "Count", [item(0, "{image#1} How many?", ["x.png"], "B", ["1", "2"])], ["x.png"])
    tasks = {t.name: t for t in resolve_tasks([f"milebench:{tmp_path}"])}
    assert set(tasks) == {"milebench:Caption", "milebench:Count"}
    caption = tasks["milebench:Caption"]
    sample = caption.make(0, 0)
    assert sample.choices is None
    assert caption.score("a red square", sample) == 1.0
    assert caption.score("A red square!", sample) == 1.0
    assert caption.score("blue circle", sample) == 0.0
    assert caption.score("a square", sample) == pytest.approx(rouge_l("a square", "a red square"))


def test_rouge_l_against_hand_counts() -> None:
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4; P = 4/6, R = 4/5
    p, r = 4 / 6, 4 / 5
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no MileBench task"):
        load_milebench(tmp_path)
    folder = write_task(tmp_path, "Broken", [item(0, "{image#3}", ["x.png"], "B", ["1", "2"])], ["x.png"])
    (task,) = load_milebench(folder)
    with pytest.raises(ValueError, match="beyond its 1 images_path"):
        task.make(0, 0)
    write_task(tmp_path, "Missing", [item(0, "{image#1}", ["gone.png"], "yes")], [])
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_milebench(tmp_path / "Missing")[0].make(0, 0)
    (tmp_path / "Bad").mkdir()
    (tmp_path / "Bad" / "Bad.json").write_text('{"data": []}')
    with pytest.raises(ValueError, match=r"meta_data\.task_instruction"):
        load_milebench(tmp_path / "Bad")
