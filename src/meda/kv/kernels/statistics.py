"""The fused statistics with the reference's semantics: what :mod:`meda.kv.scoring` and
:mod:`meda.kv.entropy` dispatch to on CUDA (see :func:`meda.kv.kernels.fused_available`).

The kernels (:mod:`meda.kv.kernels.attention_stats`) produce per-row and per-key numbers; the
glue here picks the query rows, counts which rows and keys take part, and reduces exactly as the
PyTorch reference does. Shapes as in :mod:`meda.kv.scoring`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meda.kv.kernels import attention_stats
from meda.kv.scoring import batch_query_rows


def query_rows(query: Tensor, subset: Tensor | None) -> Tensor:
    """``LongTensor [B, S]`` of evaluated query rows, ascending per batch row (all rows when ``subset`` is
    None). Sorting changes nothing the statistics report: both are sums over rows."""
    rows = batch_query_rows(subset, query.shape[0], query.shape[2], query.device)
    return rows if subset is None else rows.sort(dim=-1).values


def cumulative_scores(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_subset: Tensor | None = None,
    average_over_queries: bool = False,
) -> Tensor:
    """Fused :func:`meda.kv.scoring.cumulative_attention_scores`: ``float32 [B, Hkv, N]``, ``-inf`` at padding.

    Two passes over ``Q K^T``: the row log-sum-exp, then the per-key sums of ``exp(s - lse)``.
    """
    rows = query_rows(query, query_subset)
    lse2 = attention_stats.row_statistics(query, key, valid, rows, scaling=scaling, softcap=softcap, mode="lse")
    total = attention_stats.column_sums(query, key, valid, rows, lse2, scaling=scaling, softcap=softcap)
    if average_over_queries:
        total = total / _seen_by(rows, valid, key.shape[2] - query.shape[2]).clamp_min(1.0)[:, None]
    return total.masked_fill(~valid[:, None], float("-inf"))


def _seen_by(rows: Tensor, valid: Tensor, offset: int) -> Tensor:
    """``float32 [B, N]``: how many evaluated valid queries see each key (queries at or after it)."""
    positions = rows + offset
    counts = torch.zeros(valid.shape, device=valid.device, dtype=torch.float32)
    counts.scatter_add_(1, positions, valid.gather(1, positions).float())
    return counts.flip(-1).cumsum(-1).flip(-1) * valid


def entropy_sums(
    query: Tensor,
    key: Tensor,
    vision: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_subset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused cross-modal entropy parts: ``(sums [B, 2], counts [B, 2])`` over (text rows, vision rows).

    ``sums`` adds each eligible row's entropy over the query heads; ``counts`` counts eligible rows (a
    valid query that sees at least one valid key of the other group).
    """
    rows = query_rows(query, query_subset)
    row_h = attention_stats.row_statistics(
        query, key, valid, rows, scaling=scaling, softcap=softcap, mode="entropy", vision=vision
    ).sum(dim=1)  # [B, S], summed over query heads
    positions = rows + (key.shape[2] - query.shape[2])
    seen_vision = (valid & vision).long().cumsum(-1).gather(1, positions)  # valid vision keys at or before
    seen_text = (valid & ~vision).long().cumsum(-1).gather(1, positions)
    q_vision = vision.gather(1, positions)
    eligible = valid.gather(1, positions) & torch.where(q_vision, seen_text > 0, seen_vision > 0)
    groups = torch.stack((~q_vision, q_vision), dim=-1) & eligible[..., None]  # [B, S, 2]
    return (row_h[..., None] * groups).sum(dim=1), groups.sum(dim=1).float()
