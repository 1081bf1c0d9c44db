"""The evaluation harness on a tiny random Llama with a character tokenizer (no download).

The fast path of :func:`compressed_run` (one teacher-forced forward, then decoding from a rolled-back
cache) must answer exactly what ``model.generate`` answers under the same compression; budget 1.0 must
agree with the full cache everywhere (KL 0); results.json must follow the contract.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from meda.kv import compress
from meda.kv.eval.fidelity import compressed_run, reference_run
from meda.kv.eval.harness import evaluate, parse_method, question_tokens, resolve_tasks, split_methods
from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.output import markdown_table, plot_accuracy
from meda.kv.eval.tasks import Sample, TaskSpec
from meda.kv.groups import vision_token_ids
from meda.kv.tiny import build_tiny


class CharTokenizer:
    """Bytes as token ids (0-255), a chat template, decode: enough for the harness."""

    chat_template = "plain"
    eos_token_id = None

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, texts, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor([list(texts[0].encode())[-200:]])  # the last 200 bytes: a short prompt
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("latin-1")


@functools.cache
def tiny():
    return build_tiny("llama")


def toy_task(name: str = "toy") -> TaskSpec:
    def make(seed: int, size: int) -> Sample:
        g = torch.Generator().manual_seed(seed)
        text = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (size,), generator=g))
        return Sample(text=text, answer=text[:1])

    return TaskSpec(name, "text", make, (220, 260), 6, lambda p, s: float(p[:1] == s.answer), "toy")


def greedy_under(model, inputs, method, budget, n, options=None):
    with torch.inference_mode(), compress(model, method=method, budget=budget, **(options or {})):
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize(
    ("method", "budget", "options"),
    [("snapkv", 0.2, {}), ("meda-paper", 0.1, {}), ("meda", 0.1, {}), ("vlcache", 0.3, {}), ("h2o", 0.05, {})],
)
def test_fast_path_matches_generate(method: str, budget: float, options: dict) -> None:
    t = tiny()
    tok = CharTokenizer()
    for seed in (0, 1):
        inputs = sample_inputs(tok, toy_task().make(seed, 240))
        with torch.inference_mode():
            ref = reference_run(t.model, inputs, 8, set())
            run = compressed_run(t.model, inputs, ref, method, budget, 8, set(), options)
        expected = greedy_under(t.model, inputs, method, budget, 8, options)
        assert torch.equal(run["tokens"], expected), (method, seed, run["greedy_prefix"])
        full = t.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(ref.tokens, full[0, inputs["input_ids"].shape[1] :])
        assert run["positions"] == 7 and 0 <= run["token_agreement"] <= 1 and run["kl"] >= -1e-6
        assert run["report"]["kept_fraction"] < 1


def test_budget_one_is_the_reference() -> None:
    t = tiny()
    inputs = sample_inputs(CharTokenizer(), toy_task().make(3, 240))
    with torch.inference_mode():
        ref = reference_run(t.model, inputs, 8, set())
        run = compressed_run(t.model, inputs, ref, "meda", 1.0, 8, set())
    assert torch.equal(run["tokens"], ref.tokens)
    assert run["token_agreement"] == 1.0 and run["greedy_prefix"] == 1.0 and abs(run["kl"]) < 1e-5


def test_the_harness_passes_the_cache_under_the_name_the_model_takes() -> None:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40): the
    harness uses whichever ``forward`` declares, so a full run emits no deprecation warning about it."""
    import inspect
    import warnings

    from meda.kv.support import cache_keyword

    t = tiny()
    assert cache_keyword(t.model) in inspect.signature(t.model.forward).parameters
    inputs = sample_inputs(CharTokenizer(), toy_task().make(4, 240))
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        ref = reference_run(t.model, inputs, 4, set())
        compressed_run(t.model, inputs, ref, "snapkv", 0.5, 4, set(), query_tokens=20)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_question_after_compression_is_exact_at_budget_one_and_compares_the_first_token() -> None:
    t = tiny()
    inputs = sample_inputs(CharTokenizer(), toy_task().make(3, 240))
    with torch.inference_mode():
        ref = reference_run(t.model, inputs, 8, set())
        run = compressed_run(t.model, inputs, ref, "snapkv", 1.0, 8, set(), query_tokens=20)
    assert torch.equal(run["tokens"], ref.tokens)
    assert run["positions"] == 8 and run["token_agreement"] == 1.0 and run["kl"] < 1e-5  # the first token too


def test_question_after_compression_lets_the_cache_decide_a_one_token_answer() -> None:
    """With the question in the compressed prefill the first answer token is the full cache's whatever the
    method (nothing is compared); fed after compression it reads the compressed cache and can differ."""
    t = tiny()
    inputs = sample_inputs(CharTokenizer(), toy_task().make(5, 240))
    with torch.inference_mode():
        ref = reference_run(t.model, inputs, 1, set())
        inside = compressed_run(t.model, inputs, ref, "streamingllm", 0.1, 1, set())
        after = compressed_run(t.model, inputs, ref, "streamingllm", 0.1, 1, set(), query_tokens=12)
    assert inside["positions"] == 0 and inside["kl"] is None and torch.equal(inside["tokens"], ref.tokens)
    assert after["positions"] == 1 and after["kl"] > 1e-4, after["kl"]
    assert after["report"]["kept_fraction"] < 0.5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_question_after_the_last_image_is_exact_at_budget_one_on_vlms(family: str) -> None:
    """The image inputs stay with the compressed part; the question chunk (M-RoPE positions included) continues it."""
    t = build_tiny(family)
    inputs = t.inputs(1)
    query = question_tokens(inputs["input_ids"], vision_token_ids(t.model.config))
    assert 0 < query < inputs["input_ids"].shape[1]
    with torch.inference_mode():
        ref = reference_run(t.model, inputs, 6, set())
        exact = compressed_run(t.model, inputs, ref, "meda", 1.0, 6, set(), query_tokens=query)
        small = compressed_run(t.model, inputs, ref, "meda", 0.3, 6, set(), query_tokens=query)
    assert torch.equal(exact["tokens"], ref.tokens) and exact["kl"] < 1e-5 and exact["positions"] == 6
    assert small["report"]["compressions"] == 2 and small["report"]["kept_fraction"] < 0.5


def test_question_tokens_counts_what_follows_the_last_image_and_refuses_prompts_without_one() -> None:
    ids = torch.tensor([[1, 9, 9, 2, 9, 3, 4, 5]])
    assert question_tokens(ids, [9]) == 3
    with pytest.raises(ValueError, match="no image token"):
        question_tokens(ids, [7])
    with pytest.raises(ValueError, match="ends with an image"):
        question_tokens(torch.tensor([[1, 2, 9]]), [9])


def test_evaluate_records_question_after_compression(tmp_path: Path) -> None:
    t = build_tiny("llava")

    class Images:  # a processor stand-in: the tiny model's own multimodal inputs for every sample
        image_processor = object()

        def __call__(self, *args, **kwargs):
            return t.inputs(1)

    task = TaskSpec("toy-mm", "multimodal", lambda seed, size: Sample(text="<image>", answer="x", images=[0]), (1,), 4,
                    lambda p, s: 0.0, "toy")  # fmt: skip
    processor = Images()
    processor.image_token, processor.tokenizer = "<image>", CharTokenizer()
    payload = evaluate(
        t.model, processor, model_name="tiny-llava", tasks=[task], methods=["full", "snapkv"], budgets=[1.0],
        samples=1, out=tmp_path, progress=False, question_after_compression=True,
    )  # fmt: skip
    cells = {(r["method"], r["budget"]): r for r in payload["runs"]}
    assert payload["config"]["question_after_compression"] is True
    assert cells[("snapkv", 1.0)]["fidelity"]["positions"] == 4  # every answer token, the first included
    assert "Question after compression" in markdown_table(payload)


def test_evaluate_writes_the_contract(tmp_path: Path) -> None:
    t = tiny()
    payload = evaluate(
        t.model, CharTokenizer(), model_name="tiny-llama", tasks=[toy_task()], methods=["full", "snapkv", "meda:tau=4"],
        budgets=[0.2, 1.0], samples=2, sizes=[230], out=tmp_path, progress=False,
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "tiny-llama" and saved["runs"] == payload["runs"]
    cells = {(r["task"], r["method"], r["budget"]): r for r in saved["runs"]}
    assert set(cells) == {("toy", "full", 1.0)} | {("toy", m, b) for m in ("snapkv", "meda:tau=4") for b in (0.2, 1.0)}
    for run in saved["runs"]:
        assert set(run) >= {"task", "method", "budget", "accuracy", "samples", "fidelity"} and run["samples"] == 2
        low, high = run["accuracy_interval"]  # exact-match scores: a 95% interval around the accuracy
        assert low <= run["accuracy"] <= high
    full = cells[("toy", "full", 1.0)]
    for method in ("snapkv", "meda:tau=4"):  # budget 1.0 keeps everything: the reference's answers exactly
        exact = cells[("toy", method, 1.0)]
        assert exact["accuracy"] == full["accuracy"] and exact["fidelity"]["token_agreement"] == 1.0
        assert exact["fidelity"]["kl"] < 1e-5 and exact["fidelity"]["positions"] == 2 * 5
        assert cells[("toy", method, 0.2)]["kept_fraction"] < 0.3
    table = markdown_table(saved)
    assert "| snapkv |" in table and "| full (budget 1.0) |" in table
    (png,) = plot_accuracy(saved, tmp_path)
    assert png.name == "accuracy_toy.png" and png.stat().st_size > 1000


def test_method_specs_and_inputs_are_checked() -> None:
    assert split_methods("full,snapkv") == ["full", "snapkv"]
    assert split_methods("snapkv;meda:tau=4,merge=none") == ["snapkv", "meda:tau=4,merge=none"]
    assert parse_method("meda:tau=4,merge=none,score_queries=none") == (
        "meda", {"tau": 4, "merge": "none", "score_queries": None}
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("nope")
    with pytest.raises(ValueError, match="unknown option"):
        parse_method("meda:taux=1")
    with pytest.raises(ValueError, match="name=value"):
        parse_method("meda:tau")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks(["passkey", "nope"])
    with pytest.raises(ValueError, match="text-only"):
        sample_inputs(CharTokenizer(), Sample(text="<image> what?", answer="x", images=[object()]))
    with pytest.raises(ValueError, match="placeholders"):
        sample_inputs(CharTokenizer(), Sample(text="<image><image>", answer="x", images=[object()]))


def test_table_adds_accuracy_by_size_when_a_task_ran_at_several_sizes() -> None:
    """The main cells average over sizes (1.0 at 16 images and 0.25 at 64 reads 0.625): a second table shows
    each size; with one size there is none."""
    def run(method: str, budget: float, by_size: dict[str, float]) -> dict:
        return {"task": "mm-needle", "method": method, "budget": budget, "samples": 8, "fidelity": {},
                "accuracy": sum(by_size.values()) / len(by_size), "accuracy_by_size": by_size}

    two = markdown_table({"model": "m", "runs": [run("full", 1.0, {"16": 1.0, "64": 0.25}),
                                                 run("meda", 0.2, {"16": 0.75, "64": 0.0})]})
    assert "| method | budget | 16 | 64 |" in two
    assert "| full | 1.0 | 1.000 | 0.250 |" in two and "| meda | 0.2 | 0.750 | 0.000 |" in two
    one = markdown_table({"model": "m", "runs": [run("full", 1.0, {"64": 0.25})]})
    assert "By size" not in one
    assert "| method | 1.0 |\n|---|---|\n| full (budget 1.0) | 0.250 |" in one  # full cache only: a well-formed table


def test_full_cache_answer_is_generate_s_greedy_answer_decoded() -> None:
    """What the counting and needle diagnostics score: transformers' own greedy decoding, decoded and stripped."""
    from meda.kv.eval.fidelity import full_cache_answer

    t, tok = tiny(), CharTokenizer()
    sample = toy_task().make(2, 240)
    inputs = sample_inputs(tok, sample)
    with torch.inference_mode():
        full = t.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = tok.decode(full[0, inputs["input_ids"].shape[1] :]).strip()
    assert full_cache_answer(t.model, tok, sample, 6, "cpu") == expected
