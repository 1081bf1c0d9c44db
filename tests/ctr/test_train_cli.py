"""``meda ctr train`` end to end on a small generated file: the metrics.json contract, several
modes into one folder, the plot, and errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "zipf.parquet"
    knobs = {"cardinality": 2000}
    schema = synthetic.schema_for("zipf", "parquet", **knobs)
    synthetic.write(synthetic.generate("zipf", 6000, seed=1, **knobs), path, "parquet", schema)
    return path


def _train(data: Path, out: Path, *extra: str):
    args = ["ctr", "train", "--data", str(data), "--format", "parquet", "--out", str(out)]
    args += ["--batch-size", "512", "--hidden-units", "32", "--embedding-dim", "4", "--no-cache", *extra]
    return runner.invoke(app, args)


def test_single_mode_writes_the_metrics_contract(data_file: Path, tmp_path: Path) -> None:
    result = _train(data_file, tmp_path, "--model", "dcnv2", "--mode", "meda", "--epochs", "2",
                    "--model-option", "structure=stacked", "--model-option", "cross_layers=2")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert {"valid_auc", "valid_logloss", "test_auc", "test_logloss"} <= set(e)
        assert 0.0 <= e["test_auc"] <= 1.0
    assert metrics["best"]["epoch"] in (1, 2)
    assert metrics["config"]["model"] == "dcnv2" and metrics["config"]["mode"] == "meda"
    assert metrics["config"]["model_options"] == {"structure": "stacked", "cross_layers": 2}
    assert "skipped_rows" in json.dumps(metrics["data"])
    assert (tmp_path / "checkpoint.pt").exists()
    assert "metrics per epoch" in result.output and "best epoch (by valid_auc)" in result.output


def test_several_modes_go_to_subfolders_with_a_summary_and_plot(data_file: Path, tmp_path: Path) -> None:
    result = _train(data_file, tmp_path, "--mode", "one-epoch,multi-epoch,meda", "--epochs", "2", "--plot")
    assert result.exit_code == 0, result.output
    for mode in ("one-epoch", "multi-epoch", "meda"):
        assert (tmp_path / mode / "metrics.json").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row[0] for row in summary["rows"]] == ["one-epoch", "multi-epoch", "meda"]
    assert (tmp_path / "test_auc.png").read_bytes()[:4] == b"\x89PNG"


def test_json_output_is_machine_readable(data_file: Path, tmp_path: Path) -> None:
    result = _train(data_file, tmp_path, "--mode", "one-epoch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"][0]["epoch"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--mode", "meda,two-epoch"), "unknown mode 'two-epoch'"),
        (("--epochs", "0"), "epochs must be >= 1"),
        (("--model", "gbdt"), "unknown model 'gbdt'"),
        (("--model-option", "depth"), "is not KEY=VALUE"),
        (("--model", "dcn", "--model-option", "depth=3"), "has no option"),
        (("--format", "tsv"), "Invalid value for --format: unknown format 'tsv'"),
    ],
)
def test_bad_options_are_rejected_with_the_choices(data_file: Path, tmp_path: Path, extra, message) -> None:
    result = _train(data_file, tmp_path, *extra)
    assert result.exit_code != 0
    assert message in result.output


def test_help_teaches_the_modes() -> None:
    result = runner.invoke(app, ["ctr", "train", "--help"])
    assert result.exit_code == 0
    for word in ("one-epoch", "multi-epoch", "meda-continual", "re-initialised", "--min-count"):
        assert word in result.output


def test_resume_of_several_modes_continues_finished_ones_and_starts_the_rest(data_file: Path, tmp_path: Path) -> None:
    first = _train(data_file, tmp_path, "--mode", "one-epoch", "--epochs", "2")
    assert first.exit_code == 0, first.output
    (tmp_path / "one-epoch").mkdir()
    for name in ("metrics.json", "checkpoint.pt"):
        (tmp_path / name).rename(tmp_path / "one-epoch" / name)
    before = json.loads((tmp_path / "one-epoch" / "metrics.json").read_text())["epochs"]
    result = _train(data_file, tmp_path, "--mode", "one-epoch,meda", "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "one-epoch" / "metrics.json").read_text())["epochs"] == before
    assert len(json.loads((tmp_path / "meda" / "metrics.json").read_text())["epochs"]) == 2


def test_resume_with_other_settings_is_a_clean_error(data_file: Path, tmp_path: Path) -> None:
    assert _train(data_file, tmp_path, "--mode", "one-epoch").exit_code == 0
    result = _train(data_file, tmp_path, "--mode", "one-epoch", "--lr", "0.01", "--resume")
    assert result.exit_code == 2
    assert "Invalid value for --resume: cannot resume" in result.output
