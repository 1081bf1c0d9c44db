"""Epoch schedules: learning-rate decay on a plateau, and named presets such as BARS.

The BARS protocol (FuxiCTR's open benchmark) trains multi-epoch with

- an L2 embedding regulariser (1e-5 on Criteo, 1e-2 on Avazu; the same gradient as the
  optimiser's coupled weight decay on the embedding group, ``embedding_l2``),
- the learning rate divided by 10 after every epoch whose validation metric did not
  improve (floor 1e-6),
- early stopping after 2 such epochs in a row (patience 2), the best epoch's model
  being the one reported.

:func:`apply_schedule` turns a preset name into :class:`~meda.ctr.train.TrainConfig`
fields; :func:`decay_on_plateau` is the end-of-epoch hook the training loop calls.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_LR = 1e-6  # FuxiCTR's floor for the decayed learning rate

# preset -> TrainConfig fields it sets (options the user passes explicitly win)
SCHEDULES: dict[str, dict[str, Any]] = {
    "none": {},
    "bars": {"embedding_l2": 1e-5, "lr_plateau_factor": 0.1, "patience": 2},
}


def apply_schedule(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields of preset ``name``, overridden by the ``explicit`` (non-None) ones."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return {**SCHEDULES[name], **{k: v for k, v in explicit.items() if v is not None}}


def decay_on_plateau(optimizer: torch.optim.Optimizer, factor: float, min_lr: float = MIN_LR) -> float:
    """Multiply every group's learning rate by ``factor`` (not below ``min_lr``); returns the new
    learning rate of the first group."""
    if not 0 < factor < 1:
        raise ValueError(f"the plateau factor must be in (0, 1), got {factor}")
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"] * factor, min(min_lr, group["lr"]))
    return optimizer.param_groups[0]["lr"]
