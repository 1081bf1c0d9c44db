"""The multimodal tasks: deterministic per seed, answers consistent with what the images show."""

from __future__ import annotations

import json

import pytest

from meda.kv.eval.tasks import all_tasks, get_task
from meda.kv.eval.tasks_mm import (
    COLOURS,
    DIGITS,
    ITEMS,
    SHAPES,
    SIZES,
    Item,
    Placement,
    render,
)

MM = ("mm-needle", "mm-count", "mm-order", "mm-assoc")


def rerendered(sample):
    """Every image drawn again from the sample's recorded items and placements."""
    images = []
    for item, place, ball in sample.meta["render"]:
        images.append(render(Item(*item) if item else None, Placement(*place), tuple(ball) if ball else None))
    return images


def test_the_four_tasks_are_registered_as_multimodal() -> None:
    tasks = all_tasks()
    for name in MM:
        assert tasks[name].kind == "multimodal"
        assert tasks[name].sizes == SIZES and max(SIZES) == 64


@pytest.mark.parametrize("name", MM)
def test_same_seed_same_sample_and_other_seed_differs(name: str) -> None:
    make = get_task(name).make
    a, b, c = make(7, 16), make(7, 16), make(8, 16)
    assert (a.text, a.answer, a.meta) == (b.text, b.answer, b.meta)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert (a.text, [im.tobytes() for im in a.images]) != (c.text, [im.tobytes() for im in c.images])
    json.dumps(a.meta)  # JSON-ready


@pytest.mark.parametrize("name", MM)
@pytest.mark.parametrize("size", [8, 64])
def test_prompt_has_one_placeholder_per_image_and_images_rerender(name: str, size: int) -> None:
    sample = get_task(name).make(3, size)
    assert sample.text.count("<image>") == len(sample.images) == size
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in sample.images)
    assert [im.tobytes() for im in rerendered(sample)] == [im.tobytes() for im in sample.images]


@pytest.mark.parametrize("seed", range(5))
def test_needle_answer_is_the_only_image_of_the_target(seed: int) -> None:
    sample = get_task("mm-needle").make(seed, 32)
    items = sample.meta["items"]
    assert [i + 1 for i, d in enumerate(items) if d == sample.meta["target"]] == [int(sample.answer)]
    assert f"shows a {sample.meta['target']}?" in sample.text


@pytest.mark.parametrize("seed", range(5))
def test_count_answer_counts_the_target(seed: int) -> None:
    sample = get_task("mm-count").make(seed, 64)
    assert sample.meta["items"].count(sample.meta["target"]) == int(sample.answer)
    assert 1 <= int(sample.answer) <= 6


@pytest.mark.parametrize("seed", range(5))
def test_order_answer_is_the_first_or_last_event(seed: int) -> None:
    sample = get_task("mm-order").make(seed, 32)
    events = [(i, d) for i, d in enumerate(sample.meta["items"]) if d is not None]
    assert len(events) == 3 and len({d.split()[-1] for _, d in events}) == 3
    expected = events[0][1] if sample.meta["which"] == "first" else events[-1][1]
    assert expected.split()[-1] == sample.answer
    assert all(ball is not None for _, _, ball in sample.meta["render"])  # the moving ball is in every frame


@pytest.mark.parametrize("seed", range(5))
def test_assoc_answer_is_the_word_after_the_target_image(seed: int) -> None:
    sample = get_task("mm-assoc").make(seed, 64)
    items = sample.meta["items"]
    assert len(set(items)) == len(items)
    lines = [line for line in sample.text.splitlines() if line.startswith("Image ")]
    where = items.index(sample.meta["target"])
    assert lines[where].endswith(f"word: {sample.answer}")


def test_every_item_renders_differently() -> None:
    place = Placement(16, 16, 12, 20)
    pixels = {render(item, place).tobytes() for item in ITEMS}
    assert len(pixels) == len(ITEMS) == len(COLOURS) * (len(SHAPES) + len(DIGITS))


def test_bad_sizes_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        get_task("mm-order").make(0, 2)
    with pytest.raises(ValueError, match="at most"):
        get_task("mm-assoc").make(0, 1000)


def test_count_planting_puts_items_in_one_to_six_images_and_leaves_the_default_unchanged() -> None:
    """``plant=True`` (training only): besides the target, one item in 1 image, one in 2, ... up to 6, each
    count but the target's once (at 64 images all fit); off, the samples do not move."""
    from collections import Counter

    from meda.kv.eval.tasks_mm import make_count

    for seed in range(20):
        assert make_count(seed, 64, plant=False).meta == make_count(seed, 64).meta
        sample = make_count(seed, 64, plant=True)
        tally = Counter(sample.meta["items"])
        assert tally[sample.meta["target"]] == int(sample.answer)
        others = {c for name, c in tally.items() if name != sample.meta["target"]}
        assert others >= {c for c in range(1, 7) if c != int(sample.answer)}  # random others may also repeat
        small = make_count(seed, 8, plant=True)
        assert Counter(small.meta["items"])[small.meta["target"]] == int(small.answer)


def test_count_hard_negatives_share_one_attribute_and_leave_the_default_unchanged() -> None:
    from meda.kv.eval.tasks_mm import ITEMS, make_count

    default = make_count(3, 32)
    assert make_count(3, 32, half_match=0.0).meta == default.meta  # the evaluation samples do not move
    hard = make_count(3, 32, half_match=1.0)
    target = hard.meta["target"]
    assert hard.meta["items"].count(target) == int(hard.answer)
    by_name = {item.describe(): item for item in ITEMS}
    t = by_name[target]
    others = [by_name[n] for n in hard.meta["items"] if n != target]
    assert others and all((o.colour == t.colour) != (o.kind == t.kind) for o in others)
