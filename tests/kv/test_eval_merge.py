"""Merging evaluation shards: shards over disjoint seeds give what one run over all of them gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_eval_harness import CharTokenizer, tiny, toy_task
from typer.testing import CliRunner

from meda.kv.cli import app
from meda.kv.eval.harness import evaluate
from meda.kv.eval.merge import merge_payloads

GRID = dict(
    model_name="tiny-llama", methods=["full", "snapkv", "meda"], budgets=[0.2], sizes=[230, 250], progress=False
)


def run(seed: int, samples: int, out: Path | None = None, tasks=None) -> dict:
    t = tiny()
    return evaluate(t.model, CharTokenizer(), tasks=tasks or [toy_task()], samples=samples, seed=seed, out=out, **GRID)


def assert_same(a: dict, b: dict) -> None:
    cells = lambda p: {(r["task"], r["method"], r["budget"]): r for r in p["runs"]}  # noqa: E731
    ca, cb = cells(a), cells(b)
    assert ca.keys() == cb.keys()
    for key, ra in ca.items():
        rb = cb[key]
        assert ra["samples"] == rb["samples"], key
        for field in ("accuracy", "kept_fraction", "prompt_tokens"):
            assert math.isclose(ra[field], rb[field], rel_tol=1e-9), (key, field)
        assert ra["accuracy_by_size"].keys() == rb["accuracy_by_size"].keys()
        for size, acc in ra["accuracy_by_size"].items():
            assert math.isclose(acc, rb["accuracy_by_size"][size], rel_tol=1e-9), (key, size)
        for field, value in ra["fidelity"].items():
            assert math.isclose(value, rb["fidelity"][field], rel_tol=1e-6, abs_tol=1e-9), (key, field)


@pytest.mark.slow
def test_shards_over_disjoint_seeds_equal_one_run() -> None:
    whole = run(seed=0, samples=3)
    merged = merge_payloads([run(seed=0, samples=1), run(seed=1, samples=2)])
    assert_same(merged, whole)
    assert [s["seed"] for s in merged["config"]["shards"]] == [0, 1]


def test_overlapping_seeds_missing_config_and_other_models_are_refused() -> None:
    a, b = run(seed=0, samples=2), run(seed=1, samples=1)
    with pytest.raises(ValueError, match=r"both hold seeds 1\.\.1 of toy / full"):
        merge_payloads([a, b], names=["a", "b"])
    with pytest.raises(ValueError, match="no 'config'"):
        merge_payloads([{k: v for k, v in a.items() if k != "config"}])
    with pytest.raises(ValueError, match="different models"):
        merge_payloads([a, {**b, "model": "other", "config": {**b["config"], "seed": 5}}])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_payloads([])
    after = {**b, "config": {**b["config"], "seed": 7, "question_after_compression": True}}
    with pytest.raises(ValueError, match="question after compression"):
        merge_payloads([a, after])


def test_shards_over_different_tasks_are_put_side_by_side() -> None:
    a, b = run(seed=0, samples=1), run(seed=0, samples=1, tasks=[toy_task("toy2")])
    merged = merge_payloads([a, b])
    assert {r["task"] for r in merged["runs"]} == {"toy", "toy2"}
    assert merged["config"]["tasks"] == ["toy", "toy2"]


def test_cli_merges_folders_and_writes_the_table(tmp_path: Path) -> None:
    run(seed=0, samples=1, out=tmp_path / "s0")
    run(seed=1, samples=1, out=tmp_path / "s1")
    saved = json.loads((tmp_path / "s0" / "results.json").read_text())
    assert saved["config"]["seed"] == 0  # written with the first sample, so a cut-off shard can be merged
    result = CliRunner().invoke(
        app, ["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert {r["samples"] for r in merged["runs"]} == {2 * 2}  # 2 shards x 1 sample x 2 sizes
    assert (tmp_path / "m" / "results.md").is_file() and (tmp_path / "m" / "accuracy_toy.png").is_file()
    bad = CliRunner().invoke(
        app, ["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "own --seed range" in bad.output
    missing = CliRunner().invoke(app, ["eval-merge", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no results.json" in missing.output


def cell(samples: int, accuracy: float, agreement: float, positions: int, seed: int) -> dict:
    run = {
        "task": "t", "method": "snapkv", "budget": 0.1, "accuracy": accuracy, "samples": samples,
        "fidelity": {
            "token_agreement": agreement, "kl": agreement / 10, "greedy_prefix": accuracy, "positions": positions
        },
        "accuracy_by_size": {"8": accuracy}, "kept_fraction": 0.1 * samples, "prompt_tokens": 100.0 * samples,
        "seconds": 1.0,
    }  # fmt: skip
    return {"model": "m", "runs": [run], "config": {"seed": seed, "samples": samples, "tasks": ["t"]}}


def test_means_are_weighted_by_samples_and_positions() -> None:
    (merged,) = merge_payloads([cell(1, 1.0, 1.0, 10, seed=0), cell(3, 0.0, 0.0, 30, seed=1)])["runs"]
    assert merged["samples"] == 4 and merged["accuracy"] == 0.25 and merged["accuracy_by_size"] == {"8": 0.25}
    assert merged["fidelity"] == {"token_agreement": 0.25, "kl": 0.025, "greedy_prefix": 0.25, "positions": 40}
    assert math.isclose(merged["kept_fraction"], (0.1 + 3 * 0.3) / 4) and merged["seconds"] == 2.0


def test_table_marks_cells_that_hold_fewer_samples() -> None:
    """Shards that did not all run a method merge into cells of different sizes: the table says so per cell."""
    from meda.kv.eval.output import markdown_table

    def cell(method: str, budget: float, samples: int) -> dict:
        fidelity = {"token_agreement": 1.0, "kl": 0.0}
        return {"task": "toy", "method": method, "budget": budget, "accuracy": 0.5, "samples": samples,
                "fidelity": fidelity}

    mixed = markdown_table({"model": "m", "runs": [cell("full", 1.0, 3), cell("snapkv", 0.2, 3), cell("meda", 0.2, 2)]})
    assert "3 samples per cell; cells marked n=k hold only k" in mixed
    assert "| meda | 0.500 (1.00 / 0.00) n=2 |" in mixed and "| snapkv | 0.500 (1.00 / 0.00) |" in mixed
    even = markdown_table({"model": "m", "runs": [cell("full", 1.0, 3), cell("meda", 0.2, 3)]})
    assert "n=" not in even and "(3 samples per cell;" in even
