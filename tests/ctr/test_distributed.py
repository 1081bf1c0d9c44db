"""Data-parallel training through torchrun with 2 CPU processes (gloo): the same metrics.json shape
as one process, test AUC within 0.01 of it, identical replicas, and resume from rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meda.cli import app
from meda.ctr import synthetic

ARGS = ["--format", "parquet", "--mode", "meda", "--epochs", "2", "--batch-size", "512", "--hidden-units", "32",
        "--embedding-dim", "8", "--lr", "0.003", "--no-cache"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    schema = synthetic.schema_for("low-cardinality", "parquet")
    table = synthetic.generate("low-cardinality", 24_000, seed=3)
    (root / "shards").mkdir()
    for i in range(4):
        synthetic.write(table.slice(i * 6000, 6000), root / "shards" / f"part-{i}.parquet", "parquet", schema)
    synthetic.write(table, root / "all.parquet", "parquet", schema)
    return {"shards": root / "shards", "file": root / "all.parquet"}


def _torchrun(data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "meda", "ctr", "train", "--data", str(data), "--out", str(out), *ARGS, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _one_process(data: Path, out: Path) -> dict:
    result = CliRunner().invoke(app, ["ctr", "train", "--data", str(data), "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def _shape(metrics: dict) -> tuple:
    return (sorted(metrics), [sorted(e) for e in metrics["epochs"]], sorted(metrics["best"]))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "file"])
def test_two_processes_match_one(data: dict[str, Path], tmp_path: Path, source: str) -> None:
    one = _one_process(data[source], tmp_path / "one")
    two = _torchrun(data[source], tmp_path / "two")
    assert _shape(two) == _shape(one)
    assert two["distributed"] == {"world_size": 2, "replicas_identical": True}
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert abs(a["test_auc"] - b["test_auc"]) < 0.01, (a, b)
    assert one["epochs"][-1]["test_auc"] > 0.65  # the comparison is between models that learned
    assert [t["train_rows"] for t in two["timing"]] == [t["train_rows"] for t in one["timing"]]
    assert (tmp_path / "two" / "checkpoint.pt").exists()
    if source == "shards":  # resuming the finished run on both ranks reproduces its metrics
        again = _torchrun(data[source], tmp_path / "two", "--resume")
        assert again["epochs"] == two["epochs"]
