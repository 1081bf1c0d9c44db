"""AdamAR / AdagradAR: per-row adaptive decoupled decay of embedding tables.

Li & Lyu, *Adaptive Regularization for Large-Scale Sparse Feature Embedding Models*
(ICLR 2026) regularise each embedding row by how long ago it was last updated: a row
updated now, ``I`` steps after its previous update, decays with the coefficient

    lambda = min(1, alpha * I)

inside a decoupled (AdamW-style) weight decay, so rare ids (long intervals) are pulled
towards zero harder than frequent ones. The paper's code is not public; this module is
our reading of it, with every choice not in the paper an option:

- "updated" = the row has a non-zero gradient in this step (it appears in the batch);
  only those rows decay. Rows never seen since the table was created (or re-initialised
  by MEDA) count their interval from that moment.
- decay of a touched row: ``theta <- theta - lr * decay * lambda * theta_prev`` (the AdamW
  form, with ``theta_prev`` the row before this step's gradient update; ``decay`` scales
  the paper's lambda and defaults to 1).
- the gradient update itself is the base optimiser's (dense Adam / Adagrad, as meda uses
  for its tables), so ``alpha = 0`` is exactly the base optimiser.

Only parameter groups with ``ar_alpha > 0`` and only 2-D tables ``[rows, dim]`` are
decayed; the network group of the same optimiser steps as plain Adam / Adagrad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# per-parameter state: step of each row's last update [rows], in the table's dtype (the optimiser's
# load_state_dict casts float state to it anyway; float32 counts steps exactly up to 2**24)
LAST_UPDATE = "ar_last_update"
STEP = "ar_step"  # per-group counter of optimiser steps


def decay_coefficient(interval: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's ``lambda = min(1, alpha * I)`` for update intervals ``interval`` ``[rows]``."""
    return (alpha * interval.to(torch.float32)).clamp_(max=1.0)


class RowDecay:
    """Mixin for a ``torch.optim.Optimizer``: adaptive per-row decoupled decay after its step.

    Groups carry ``ar_alpha`` (0 = off) and ``ar_decay`` (scale of lambda, default 1).
    """

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        pending = self._before_step()
        loss = super().step(closure)  # type: ignore[misc]
        with torch.no_grad():
            for param, last, rows, previous, coefficient in pending:
                param.index_add_(0, rows, previous * coefficient.unsqueeze(1), alpha=-1.0)
                # stored after the base step: Adam initialises a parameter's state only while it is empty
                self.state[param][LAST_UPDATE] = last  # type: ignore[attr-defined]
        return loss

    @torch.no_grad()
    def _before_step(self) -> list[tuple[torch.Tensor, ...]]:
        """Per decayed table: the table, its rows' last-update steps ``[rows]`` (already moved to
        now for the touched rows), the touched rows ``[n]``, their values before the step
        ``[n, dim]`` and ``lr * decay * lambda`` ``[n]``."""
        pending = []
        for group in self.param_groups:  # type: ignore[attr-defined]
            alpha = group.get("ar_alpha", 0.0)
            if not alpha > 0:
                continue
            born = group.get(STEP, 0)
            group[STEP] = now = born + 1
            for p in group["params"]:
                if p.grad is None or p.dim() != 2 or p.grad.is_sparse:
                    continue
                last = self.state[p].get(LAST_UPDATE)  # type: ignore[attr-defined]
                if last is None:  # fresh (or re-initialised) table: intervals count from the last step
                    last = torch.full((p.shape[0],), float(born), dtype=p.dtype, device=p.device)
                rows = p.grad.ne(0).any(dim=1).nonzero().squeeze(1)
                coefficient = decay_coefficient(now - last[rows], alpha) * (group["lr"] * group.get("ar_decay", 1.0))
                last[rows] = now
                pending.append((p, last, rows, p[rows].clone(), coefficient.to(p.dtype)))
        return pending


class AdamAR(RowDecay, torch.optim.Adam):
    """Adam with the adaptive per-row decay on groups with ``ar_alpha > 0`` (embedding tables)."""


class AdagradAR(RowDecay, torch.optim.Adagrad):
    """Adagrad with the adaptive per-row decay on groups with ``ar_alpha > 0`` (embedding tables)."""
