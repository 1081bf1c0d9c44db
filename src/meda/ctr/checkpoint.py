"""Atomic checkpoint files: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


class ResumeError(ValueError):
    """A run cannot be resumed: no checkpoint, or one written with other settings or data."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a killed write never leaves a broken file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.exists():
        raise ResumeError(f"no checkpoint at {path}; run without --resume to start a new run")
    return torch.load(path, map_location="cpu", weights_only=True)
