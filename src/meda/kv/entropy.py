"""Cross-modal attention entropy of one layer (MEDA, Wan et al. 2025), the signal behind layer budgets.

For each query head, text queries attend over the vision keys only (``A_TV``) and vision queries over
the text keys only (``A_VT``), causally and over valid keys. With ``H(row) = -sum_j A log A``:

    E_TV = mean of H over text queries that see >= 1 vision key      (0 if there is none)
    E_VT = mean of H over vision queries that see >= 1 text key      (0 if there is none)
    E    = mean over query heads of (E_TV + E_VT)

"Vision" is any boolean token group; "text" is its valid complement. Without images, pass the
context-vs-question split (or any mask) as ``vision``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meda.kv.kernels import fused_available
from meda.kv.scoring import batch_query_rows, check_attention_inputs, masked_logits


def cross_modal_entropy(
    query: Tensor,
    key: Tensor,
    vision: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_chunk: int = 512,
    query_subset: Tensor | None = None,
) -> Tensor:
    """Cross-modal attention entropy per batch row.

    Args:
        query: ``[B, Hq, Nq, D]`` post-RoPE queries (the last ``Nq`` tokens); key: ``[B, Hkv, N, D]``.
        vision: ``BoolTensor [B, N]``, True at vision (or "group A") tokens.
        valid: ``BoolTensor [B, N]``, False at padding.
        scaling: logit scale.
        softcap: attention-logit soft-cap (``softcap * tanh(logits / softcap)``), None for none.
        query_chunk: query rows per chunk (peak memory at most about ``2 x B x Hq x query_chunk x N`` floats).
        query_subset: optional ``LongTensor [S]`` or ``[B, S]`` of query rows to evaluate instead of all
            (a sampled or observation subset); the means then run over the eligible rows of the subset.

    Returns:
        ``float32 [B]`` entropies (``E`` above).
    """
    sums, counts = cross_modal_entropy_sums(
        query, key, vision, valid, scaling=scaling, softcap=softcap, query_chunk=query_chunk, query_subset=query_subset
    )
    return (sums / counts.clamp_min(1.0)).sum(dim=1) / query.shape[1]


def cross_modal_entropy_sums(
    query: Tensor,
    key: Tensor,
    vision: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_chunk: int = 512,
    query_subset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The parts of :func:`cross_modal_entropy` (same arguments), to add up over prompt chunks.

    Returns:
        ``(sums [B, 2], counts [B, 2])`` float32 over (text rows, vision rows): the row entropies summed
        over eligible rows and query heads, and the number of eligible rows. On CUDA with Triton the fused
        kernel computes them (:mod:`meda.kv.kernels`). Elsewhere PyTorch computes the two cross-modal blocks
        only (text rows over the vision keys, vision rows over the text keys; each gathered per batch row and
        padded to the longest row), chunk by chunk of query rows, each chunk cut to the keys it can see.
    """
    if vision.dtype != torch.bool or vision.shape != valid.shape:
        raise ValueError(
            f"vision must be a bool tensor shaped like valid {tuple(valid.shape)}; got {vision.dtype} "
            f"{tuple(vision.shape)}"
        )
    check_attention_inputs(query, key, valid)
    if fused_available(query):
        from meda.kv.kernels.statistics import entropy_sums

        return entropy_sums(query, key, vision, valid, scaling=scaling, softcap=softcap, query_subset=query_subset)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1; got {query_chunk}")
    batch, n_queries, n_keys = query.shape[0], query.shape[2], key.shape[2]
    rows = batch_query_rows(query_subset, batch, n_queries, query.device)  # [B, S]
    positions = rows + (n_keys - n_queries)
    query_vision, query_valid = vision.gather(1, positions), valid.gather(1, positions)
    key_positions = torch.arange(n_keys, device=key.device).expand(batch, -1)  # [B, N]
    sums = torch.zeros(batch, 2, device=key.device, dtype=torch.float32)  # [text rows, vision rows]
    counts = torch.zeros(batch, 2, device=key.device, dtype=torch.float32)
    for side, is_vision in enumerate((False, True)):
        side_rows, rows_ok = _packed(rows, query_valid & (query_vision == is_vision))
        side_keys, keys_ok = _packed(key_positions, valid & (vision != is_vision))  # the other group's keys
        sums[:, side], counts[:, side] = _block_entropy_sums(
            query, key, side_rows, rows_ok, side_keys, keys_ok, scaling=scaling, softcap=softcap, chunk=query_chunk
        )
    return sums, counts


def _packed(values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept ``values [B, M]`` of each row moved to the front in their order, cut to the longest row:
    ``(packed [B, K], kept [B, K])`` with ``K = max_b keep[b].sum()``; ``kept`` is False at the fill."""
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, : int(keep.sum(dim=1).max())]
    return values.gather(1, order), keep.gather(1, order)


def _block_entropy_sums(
    query: Tensor,
    key: Tensor,
    rows: Tensor,
    rows_ok: Tensor,
    key_positions: Tensor,
    keys_ok: Tensor,
    *,
    scaling: float,
    softcap: float | None,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Entropy sums and counts of one cross-modal block: query ``rows [B, R]`` attending causally over the keys
    at ``key_positions [B, K]`` (ascending where ``keys_ok``); fill entries (False in ``rows_ok [B, R]`` or
    ``keys_ok [B, K]``) take no part. Returns ``(sums [B], counts [B])`` float32: row entropies summed over
    the eligible rows (those that see >= 1 key) and query heads, and the number of eligible rows."""
    batch, q_heads, n_queries, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    sums = torch.zeros(batch, device=key.device, dtype=torch.float32)
    counts = torch.zeros(batch, device=key.device, dtype=torch.float32)
    if not key_positions.shape[1]:
        return sums, counts
    index = key_positions[:, None, :, None].expand(-1, kv_heads, -1, dim)
    keys32 = key.gather(2, index).float().unsqueeze(2)  # [B, Hkv, 1, K, D]
    grouped = query.unflatten(1, (kv_heads, q_heads // kv_heads))  # [B, Hkv, G, Nq, D], a view
    for start in range(0, rows.shape[1], chunk):
        part = rows[:, start : start + chunk]  # [B, c]
        positions = part + (n_keys - n_queries)
        causal = key_positions[:, None] <= positions[..., None]
        visible = rows_ok[:, start : start + chunk, None] & keys_ok[:, None] & causal  # [B, c, K]
        width = int(visible.sum(dim=-1).max())  # keys ascend, so each row's visible keys come first
        if not width:
            continue
        visible = visible[..., :width]  # [B, c, w]
        index = part[:, None, None, :, None].expand(-1, kv_heads, grouped.shape[2], -1, dim)
        q = grouped.gather(3, index).float()  # [B, Hkv, G, c, D]
        logits = masked_logits(q * scaling, keys32[..., :width, :], visible, softcap)
        log_probs = torch.log_softmax(logits, dim=-1)
        del logits  # peak memory: two chunk-sized tensors
        row_entropy = _entropy_rows(log_probs, ~visible[:, None, None])  # [B, c]
        del log_probs
        eligible = visible.any(dim=-1)  # [B, c]
        sums += (row_entropy * eligible).sum(dim=1)
        counts += eligible.sum(dim=1)
    return sums, counts


def _entropy_rows(log_probs: Tensor, hidden: Tensor) -> Tensor:
    """``-sum p log p`` over keys and query heads: ``[B, Hkv, G, c, N] -> [B, c]`` (0 log 0 := 0)."""
    return -log_probs.exp().mul_(log_probs).masked_fill_(hidden, 0.0).sum(dim=(-1, 1, 2))
