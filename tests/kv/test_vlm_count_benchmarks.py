"""benchmarks/vlm_count_attention.py, vlm_count_targets.py, vlm_needle_errors.py and vlm_count_errors.py on
the CPU: the attention probe against eager attention's own weights, the image masses, the count targets with
and without balance, the sorting of the needle's wrong answers and the half matches behind count answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorded_last_row_equals_eager_attention_weights_and_leaves_the_output_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    probe = _benchmark("vlm_count_attention")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        eager = model(ids, output_attentions=True)
        recorder = probe.install(model, [layer.self_attn for layer in model.model.layers])
        probed = model(ids)
    assert sorted(recorder.rows) == [0, 1]
    for layer, weights in enumerate(eager.attentions):
        torch.testing.assert_close(recorder.rows[layer], weights[0, :, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probed.logits, eager.logits, rtol=1e-4, atol=1e-5)


def test_image_masses_split_matching_and_other_images() -> None:
    probe = _benchmark("vlm_count_attention")
    row = torch.zeros(2, 10)
    row[0, 2:4] = 0.25  # image 0 (positions 2-3)
    row[0, 6:8] = 0.125  # image 2 (positions 6-7)
    row[1, 4:6] = 0.5  # image 1
    hit, miss = probe.image_masses(row, torch.tensor([2, 3, 4, 5, 6, 7]), [True, False, True])
    assert hit == [0.75, 0.0] and miss == [0.0, 1.0]


def test_count_targets_lean_on_two_at_64_images_unless_balanced() -> None:
    targets = _benchmark("vlm_count_targets")
    plain = targets.count_answers(64, 40, 8, 0.25, balance=False)
    balanced = targets.count_answers(64, 40, 8, 0.25, balance=True)
    assert plain["2"] > 0.5 * sum(plain.values())
    assert set(balanced.values()) == {40} and sorted(balanced) == targets.VALUES


def test_needle_errors_sort_wrong_answers_by_what_the_named_image_shows() -> None:
    needle = _benchmark("vlm_needle_errors")
    items = ["red star", "red circle", "blue star", "green digit 7", None]
    assert needle.kind_of_error("1", 1, items, "red star") == "right"
    assert needle.kind_of_error("2.", 1, items, "red star") == "colour"
    assert needle.kind_of_error("3", 1, items, "red star") == "kind"
    assert needle.kind_of_error("4", 1, items, "red star") == "other"
    assert needle.kind_of_error("4", 1, items, "blue digit 7") == "kind"  # a digit's kind is its numeral
    for answer in ("5", "9", "Image", ""):  # an empty frame, no such image, no number
        assert needle.kind_of_error(answer, 1, items, "red star") == "not an image"
    rows = [
        {
            "size": 8,
            "position": t,
            "truth": t,
            "answer": a,
            "error": e,
            "answered_place": int(a),
            "shuffled": False,
            "gives_place": False,
        }
        for t, a, e in [(1, "1", "right"), (3, "2", "colour"), (8, "8", "right"), (7, "4", "other")]
    ]
    assert needle.summary(rows) == (
        "8 images: accuracy 0.50 (4 samples); right by needle quarter 1/1 0/1 0/0 1/2; "
        "wrong answers: {'colour': 1, 'other': 1}; place of the named image minus the needle's: {-3: 1, -1: 1}"
    )


def test_half_matches_count_the_images_that_share_colour_or_kind_only() -> None:
    from meda.kv.eval.tasks_mm import make_count

    errors = _benchmark("vlm_count_errors")
    for seed in range(4):
        sample = make_count(seed, 16)
        target = sample.meta["target"].replace("digit ", "").split(" ", 1)
        shown = [name.replace("digit ", "").split(" ", 1) for name in sample.meta["items"]]
        expected = sum((colour == target[0]) != (kind == target[1]) for colour, kind in shown)
        assert errors.half_matches(seed, 16) == expected
        # with every other image drawn as a hard negative, all of them are half matches
        assert errors.half_matches(seed, 16, half_match=1.0) == 16 - make_count(seed, 16, 1.0).meta["count"]
    rows = [{"size": 16, "seed": s, "correct": s % 2 == 0} for s in range(4)]
    line = errors.by_half_matches(rows)
    right, wrong = (sorted(errors.half_matches(s, 16) for s in seeds) for seeds in ((0, 2), (1, 3)))
    assert line == f"half matches per sample: 16: right {right} wrong {wrong}"


def test_count_probability_lines_and_digit_tokens() -> None:
    errors = _benchmark("vlm_count_errors")
    rows = [
        {"size": 8, "truth": "3", "probs": {"2": 0.1, "3": 0.8, "4": 0.1}},
        {"size": 8, "truth": "1", "probs": {"1": 0.4, "2": 0.5}},  # no "0" among the counts: nothing below 1
        {"size": 64, "truth": "6", "probs": {"5": 0.3, "6": 0.2, "7": 0.5}},
    ]
    assert errors.by_probability(rows) == (
        "probability of the true count: 8: 0.60 (one away 0.35); 64: 0.20 (one away 0.80)"
    )
    assert errors.by_probability([{"size": 8, "truth": "3"}]) == ""  # a file written before probs were recorded

    class Digits:  # one token per digit, as SmolLM2's tokenizer splits numbers
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [100 + int(ch) for ch in text]

    assert errors.digit_token_ids(Digits()) == {str(d): 100 + d for d in range(1, 10)}

    class Words:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1, 2]

    with pytest.raises(ValueError, match="encodes '1' as 2 tokens"):
        errors.digit_token_ids(Words())
