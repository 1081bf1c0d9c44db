"""A real kill: ``meda ctr train`` is SIGKILLed mid-run, resumed with ``--resume``, and its
metrics.json epoch figures equal those of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meda.ctr import synthetic


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "meda", "ctr", "train", "--data", str(data), "--format", "parquet",
        "--out", str(out), "--mode", "meda", "--epochs", "2", "--batch-size", "256", "--dropout", "0.2",
        "--checkpoint-every", "5", "--no-cache", "--json", *extra,
    ]  # fmt: skip


def _figures(out: Path) -> list[dict]:
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = tmp_path / "zipf.parquet"
    schema = synthetic.schema_for("zipf", "parquet", cardinality=2000)
    synthetic.write(synthetic.generate("zipf", 20_000, seed=3, cardinality=2000), data, "parquet", schema)

    subprocess.run(_command(data, tmp_path / "full"), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["progress"]["global_step"] >= 70:
            break  # past epoch 1 (63 steps): meda has re-initialised the embeddings
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    progress = torch.load(checkpoint, weights_only=True)["progress"]
    assert progress["step"] > 0, "killed at an epoch boundary, not mid-epoch"

    subprocess.run(_command(data, killed, "--resume"), check=True, capture_output=True)
    assert _figures(killed) == _figures(tmp_path / "full")
