"""Optimisers with separate embedding and network regularisation, and state resets.

Every optimiser is one entry of :data:`OPTIMIZERS`. ``adamar`` / ``adagradar`` are Adam /
Adagrad whose embedding group also gets the adaptive per-row decay of
:mod:`meda.ctr.adaptive_reg` (the network group steps as plain Adam / Adagrad).

With sparse gradients (``--sparse-grad``) the embedding tables get their own optimiser from
:data:`SPARSE_OPTIMIZERS` and the two step as one :class:`SplitOptimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from meda.ctr.adaptive_reg import LAST_UPDATE, STEP, AdagradAR, AdamAR
from meda.ctr.embedding import Rows

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adamar": AdamAR,
    "adagradar": AdagradAR,
}
# the optimiser of tables with sparse gradients, per --optimizer (SparseAdam: Adam's update on the touched rows,
# moments of the other rows left alone; Adagrad and SGD take sparse gradients themselves, unfused)
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.SparseAdam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
# optimisers whose step a CUDA graph can hold (``--graph on``, meda.ctr.graph), with the constructor options that
# make it so. Absent: AdamAR / AdagradAR (their row decay finds the touched rows with nonzero(), a host sync) and
# Adagrad (torch has no fused Adagrad on CUDA, and its unfused step reads the step count back with .item())
CAPTURABLE: dict[str, dict[str, Any]] = {"adam": {"capturable": True}, "sgd": {}}
# fused optimiser kernels torch does not have on CUDA (measured on torch 2.11: fused Adagrad raises there)
NOT_FUSED_ON_CUDA = frozenset({"adagrad"})
# options of the embedding group each optimiser accepts (``--optimizer-option KEY=VALUE``), with defaults
EMBEDDING_OPTIONS: dict[str, dict[str, float]] = {
    "adamar": {"ar_alpha": 0.01, "ar_decay": 1.0},
    "adagradar": {"ar_alpha": 0.01, "ar_decay": 1.0},
}


def build_optimizer(
    name: str,
    embedding_params: Iterable[nn.Parameter],
    network_params: Iterable[nn.Parameter],
    lr: float,
    embedding_l2: float = 0.0,
    net_l2: float = 0.0,
    options: Mapping[str, Any] | None = None,
    sparse_params: Iterable[nn.Parameter] = (),
    capturable: bool = False,
) -> torch.optim.Optimizer | SplitOptimizer:
    """One optimiser with two parameter groups: ``embedding`` (L2 ``embedding_l2``) and
    ``network`` (L2 ``net_l2``). L2 is applied as the optimiser's (coupled) weight decay, the
    same gradient as FuxiCTR's ``embedding_regularizer`` / ``net_regularizer`` terms.

    ``options`` go to the embedding group (e.g. ``ar_alpha``, ``ar_decay`` for adamar).
    ``sparse_params`` (tables whose gradients are sparse) get ``SPARSE_OPTIMIZERS[name]`` in an
    ``embedding-sparse`` group; the result is then a :class:`SplitOptimizer` of that and the dense one.
    ``capturable``: built so that its step can be captured in a CUDA graph (:data:`CAPTURABLE`).
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    embedding_options = optimizer_options(key, options or {})
    sparse = list(sparse_params)
    if sparse:
        check_sparse_grad(key, embedding_l2)
    if capturable and key not in CAPTURABLE:
        raise ValueError(f"optimizer {name!r} cannot be captured in a CUDA graph; use one of {', '.join(CAPTURABLE)}")
    graph_options = CAPTURABLE[key] if capturable else {}
    groups = [
        {"params": list(embedding_params), "weight_decay": embedding_l2, "name": "embedding", **embedding_options},
        {"params": list(network_params), "weight_decay": net_l2, "name": "network"},
    ]
    groups = [g for g in groups if g["params"]]
    # fused kernels: the same update, ~1.6x faster on CPU for large dense embedding tables
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    fused = uses_fused(key, "cuda" if on_cuda else "cpu")
    dense = [OPTIMIZERS[key](groups, lr=lr, fused=fused, **graph_options)] if groups else []
    if not sparse:
        return dense[0]
    return SplitOptimizer([SPARSE_OPTIMIZERS[key]([{"params": sparse, "name": "embedding-sparse"}], lr=lr), *dense])


def uses_fused(name: str, device_type: str) -> bool:
    """Whether the dense optimiser ``name`` is built with torch's fused kernel on ``device_type``
    (everywhere but :data:`NOT_FUSED_ON_CUDA` on CUDA, which run torch's default, foreach, kernels)."""
    return not (device_type == "cuda" and name.lower() in NOT_FUSED_ON_CUDA)


def check_sparse_grad(name: str, embedding_l2: float) -> None:
    """Refuse what sparse embedding gradients cannot do, naming the fix (raises ValueError)."""
    key = name.lower()
    if key not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"--sparse-grad has no sparse form of --optimizer {name}: its per-row decay needs every row's state "
            f"each step; use --optimizer {' / '.join(SPARSE_OPTIMIZERS)}, or drop --sparse-grad"
        )
    if embedding_l2:
        raise ValueError(
            f"--sparse-grad cannot apply embedding L2 (--embedding-l2 {embedding_l2}, set by --schedule bars too): "
            "weight decay touches every row, sparse updates only the looked-up ones; use --embedding-l2 0 "
            "(and no --schedule bars), or drop --sparse-grad"
        )


class SplitOptimizer:
    """Several optimisers stepped as one (the sparse tables' and the dense parameters').

    ``param_groups`` lists every part's groups (so learning-rate schedules reach all), ``state_dict`` is
    ``{"parts": [each part's state dict]}``; ``parts[0]`` owns the sparse tables.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("parts") if isinstance(state, dict) else None
        if parts is None or len(parts) != len(self.parts):
            raise ValueError("the optimiser state was saved without --sparse-grad (or with other parts)")
        for part, saved in zip(self.parts, parts, strict=True):
            part.load_state_dict(saved)


def optimizer_options(name: str, options: Mapping[str, Any]) -> dict[str, float]:
    """The embedding-group options of optimiser ``name``: its defaults updated by ``options``."""
    accepted = EMBEDDING_OPTIONS.get(name.lower(), {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = f"its options are {sorted(accepted)}" if accepted else "it takes none"
        raise ValueError(f"optimizer {name!r} has no option(s) {unknown}; {hint}")
    merged = {**accepted, **{k: float(v) for k, v in options.items()}}
    if any(v < 0 for v in merged.values()):
        raise ValueError(f"optimizer options must be >= 0, got {merged}")
    return merged


def reset_state(optimizer: torch.optim.Optimizer | SplitOptimizer, rows: Iterable[Rows]) -> None:
    """Forget the optimiser's per-row state (moments, accumulators, last-update steps) of ``rows``.

    A parameter whose rows are all named loses its whole state, exactly as a fresh parameter
    (Adam's step count, and so its bias correction, restarts). Where only some fields of a
    concatenated table are named, exactly their rows are reset: Adam's moments zeroed, Adagrad's
    sums back to ``initial_accumulator_value``, AdamAR's last-update steps moved to now; the
    parameter's step count (Adam's bias correction) carries on, so the first updates of such rows
    are up to ``(1 - beta1) / sqrt(1 - beta2)`` (3.2x at the defaults) larger than a fresh table's.
    A :class:`SplitOptimizer` is reset part by part (SparseAdam's ``exp_avg`` / ``exp_avg_sq`` as Adam's).
    """
    rows = list(rows)
    for part in optimizer.parts if isinstance(optimizer, SplitOptimizer) else [optimizer]:
        _reset_part(part, rows)


def _reset_part(optimizer: torch.optim.Optimizer, rows: list[Rows]) -> None:
    """:func:`reset_state` for one optimiser (parameters it does not hold are skipped)."""
    named: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for r in rows:
        param, covered = named.setdefault(id(r.param), (r.param, torch.zeros(r.param.shape[0], dtype=torch.bool)))
        covered[r.start : r.stop] = True
    for param, covered in named.values():
        state = optimizer.state.get(param)
        if not state:
            continue
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        adagrad = isinstance(optimizer, torch.optim.Adagrad)
        if bool(covered.all()) and not adagrad:  # Adagrad expects its state to exist
            del optimizer.state[param]
            continue
        index = covered.nonzero().squeeze(1).to(param.device)
        for key, value in state.items():
            if key == LAST_UPDATE:
                value[index] = float(group.get(STEP, 0))
            elif key == "sum":
                value[index] = group["initial_accumulator_value"]
            elif key == "step" and bool(covered.all()):
                value.zero_()
            elif torch.is_tensor(value) and value.shape == param.shape:
                value[index] = 0
