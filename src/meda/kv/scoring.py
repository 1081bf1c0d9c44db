"""Key importance scores for KV selection: cumulative attention (H2O / MEDA) and SnapKV's window score.

Both scorers work per KV head: the attention of the ``G`` query heads that share a KV head (GQA) is
summed onto it, keys are never expanded to query heads. Queries are processed in chunks, so memory
is ``O(batch x query_heads x chunk x tokens)``; no ``tokens x tokens`` map is ever built.

Shapes: ``query [B, Hq, Nq, D]`` (post-RoPE), ``key [B, Hkv, N, D]`` with ``Hq = Hkv * G`` and
``Nq <= N``; query row ``r`` sits at key position ``N - Nq + r`` (the queries are the last ``Nq``
tokens, as in a prefill with ``Nq == N`` or a chunk of one). ``valid [B, N]`` is False at padding.
Query ``i`` sees key ``j`` when ``j <= i`` and ``j`` is valid; padded queries see nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from meda.kv.kernels import fused_available


def check_attention_inputs(query: Tensor, key: Tensor, valid: Tensor) -> None:
    """Raise ``ValueError`` unless ``query [B,Hq,Nq,D]``, ``key [B,Hkv,N,D]``, ``valid [B,N]`` agree."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"query and key must be 4-D [batch, heads, tokens, head_dim]; got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    batch, q_heads, n_queries, dim = query.shape
    kb, kv_heads, n_keys, kdim = key.shape
    if kb != batch or kdim != dim:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or head_dim")
    if q_heads % kv_heads:
        raise ValueError(
            f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads}); pass post-RoPE queries "
            "of the same layer, not expanded keys"
        )
    if n_queries > n_keys:
        raise ValueError(f"more queries ({n_queries}) than keys ({n_keys}); queries must be the last tokens")
    if valid.dtype != torch.bool or tuple(valid.shape) != (batch, n_keys):
        raise ValueError(
            f"valid must be a bool tensor [batch, tokens] = [{batch}, {n_keys}]; got {valid.dtype} {tuple(valid.shape)}"
        )


def batch_query_rows(query_rows: Tensor | None, batch: int, n_queries: int, device: torch.device) -> Tensor:
    """``LongTensor [B, S]``: ``query_rows`` (``[S]`` or ``[B, S]``, None for all ``n_queries`` rows) checked to
    lie in ``[0, n_queries)`` and expanded to the batch. Raises ``ValueError`` on a bad shape or value."""
    if query_rows is None:
        query_rows = torch.arange(n_queries, device=device)
    if query_rows.dim() not in (1, 2) or (query_rows.dim() == 2 and query_rows.shape[0] != batch):
        raise ValueError(f"query rows must be [S] or [batch, S]; got {tuple(query_rows.shape)}")
    query_rows = query_rows.to(device=device, dtype=torch.long).expand(batch, -1)
    if query_rows.numel() and (query_rows.min() < 0 or query_rows.max() >= n_queries):
        raise ValueError(f"query rows must lie in [0, {n_queries}); got values outside that range")
    return query_rows


def causal_logit_chunks(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_chunk: int = 512,
    query_rows: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield causal attention logits chunk by chunk of query rows, in float32.

    Args:
        query: ``[B, Hq, Nq, D]``; key: ``[B, Hkv, N, D]``; valid: ``[B, N]`` (see module docstring).
        scaling: logit scale (``1/sqrt(D)`` for most models).
        softcap: attention-logit soft-cap (Gemma 2): ``logits = softcap * tanh(logits / softcap)`` before
            masking; None for none.
        query_chunk: query rows per chunk.
        query_rows: optional ``LongTensor [S]`` or ``[B, S]`` of query rows to evaluate (default all).

    Yields:
        ``(positions [B, c], logits [B, Hkv, G, c, N], visible [B, c, N])``: key positions of the
        chunk's queries, their logits with ``-inf`` where a key is not visible, and the visibility mask
        (False for every key of a padded query).
    """
    check_attention_inputs(query, key, valid)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1; got {query_chunk}")
    batch, q_heads, n_queries, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    device = query.device
    query_rows = batch_query_rows(query_rows, batch, n_queries, device)
    keys32 = key.float().unsqueeze(2)  # [B, Hkv, 1, N, D]
    key_pos = torch.arange(n_keys, device=device)
    grouped = query.unflatten(1, (kv_heads, group))  # [B, Hkv, G, Nq, D], a view
    for start in range(0, query_rows.shape[1], query_chunk):
        rows = query_rows[:, start : start + query_chunk]  # [B, c]
        index = rows[:, None, None, :, None].expand(-1, kv_heads, group, -1, dim)
        q = grouped.gather(3, index).float()  # [B, Hkv, G, c, D]
        positions = rows + (n_keys - n_queries)
        query_valid = valid.gather(1, positions)  # [B, c]
        visible = (key_pos <= positions[..., None]) & valid[:, None, :] & query_valid[..., None]
        # Built inside the yield so this frame keeps no reference: the caller may free it or edit it in place.
        yield positions, masked_logits(q * scaling, keys32, visible, softcap), visible


def masked_logits(scaled_query: Tensor, keys: Tensor, visible: Tensor, softcap: float | None) -> Tensor:
    """``[B, Hkv, G, c, N]`` logits (soft-capped when ``softcap``) with ``-inf`` where ``visible [B, c, N]``
    is False."""
    logits = torch.matmul(scaled_query, keys.transpose(-1, -2))
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits.masked_fill_(~visible[:, None, None], float("-inf"))


def _summed_attention(
    chunks: Iterator[tuple[Tensor, Tensor, Tensor]], out: Tensor, seen_by: Tensor | None = None
) -> Tensor:
    """Add each chunk's softmax attention, summed over the group's heads and the queries, to ``out``
    ``[B, Hkv, N]``, and optionally to ``seen_by [B, N]`` how many of the queries see each key.

    Rows with no visible key contribute zero. Peak memory: two chunk-sized tensors.
    """
    for _, logits, visible in chunks:
        if seen_by is not None:
            seen_by += visible.sum(dim=1)
        probs = torch.softmax(logits, dim=-1)
        del logits  # free before the next chunk is built: peak stays at two chunk-sized tensors
        out += probs.masked_fill_(~visible[:, None, None], 0.0).sum(dim=(2, 3))
        del probs
    return out


def cumulative_attention_scores(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_chunk: int = 512,
    query_subset: Tensor | None = None,
    average_over_queries: bool = False,
) -> Tensor:
    """H2O / MEDA score: attention each key receives, summed over all prompt queries and the group's heads.

    ``score[b, h, j] = sum_{g in group(h)} sum_i a[b, g, i, j]`` with ``a`` the causal softmax attention
    over valid keys; padded queries contribute nothing.

    Args:
        query: ``[B, Hq, Nq, D]`` post-RoPE; key: ``[B, Hkv, N, D]``; valid: ``[B, N]``.
        scaling: logit scale.
        softcap: attention-logit soft-cap (``softcap * tanh(logits / softcap)``), None for none.
        query_chunk: query rows per chunk (memory about ``2 x B x Hq x query_chunk x N`` floats).
        query_subset: optional ``LongTensor [S]`` or ``[B, S]`` of query rows to sum over instead of all
            (cost ``O(S N)`` instead of ``O(Nq N)`` for long prompts).
        average_over_queries: divide each key's sum by the number of valid summed queries that see it
            (counters the bias of causal sums towards early tokens). Default False: the paper's / H2O's sum.

    Returns:
        ``float32 [B, Hkv, N]`` scores, ``-inf`` at padded keys. On CUDA with Triton the fused kernel
        computes them (:mod:`meda.kv.kernels`: two passes, no logit chunks), elsewhere the chunks below.
    """
    if fused_available(query):
        from meda.kv.kernels.statistics import cumulative_scores

        check_attention_inputs(query, key, valid)
        return cumulative_scores(
            query,
            key,
            valid,
            scaling=scaling,
            softcap=softcap,
            query_subset=query_subset,
            average_over_queries=average_over_queries,
        )
    batch, kv_heads, n_keys = key.shape[0], key.shape[1], key.shape[2]
    total = torch.zeros(batch, kv_heads, n_keys, device=key.device, dtype=torch.float32)
    chunks = causal_logit_chunks(
        query, key, valid, scaling=scaling, softcap=softcap, query_chunk=query_chunk, query_rows=query_subset
    )
    seen_by = torch.zeros(batch, n_keys, device=key.device, dtype=torch.float32)
    total = _summed_attention(chunks, total, seen_by)
    if average_over_queries:
        total = total / seen_by.clamp_min(1.0)[:, None]
    return total.masked_fill(~valid[:, None], float("-inf"))


def window_attention_scores(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    window: int = 32,
    pool_kernel: int = 7,
    pooling: Literal["max", "avg"] = "max",
) -> Tensor:
    """SnapKV score: attention from the last ``window`` queries, summed over them and the group's heads,
    then pooled along keys (odd ``pool_kernel``, same padding; 1 disables pooling). ``pooling="avg"``
    with ``pool_kernel=5`` is the SnapKV / PyramidKV code default (zero-padded at the ends).

    Tokens inside the observation window get their own finite score, NOT ``+inf``: the caller keeps the
    window by passing ``recent_window=window`` to :func:`meda.kv.selection.select_indices` (finite
    scores keep score-weighted merging well defined).

    Args:
        query: ``[B, Hq, Nq, D]`` post-RoPE (only the last ``window`` rows are used); key ``[B, Hkv, N, D]``;
            valid ``[B, N]``.
        scaling, softcap: logit scale and optional soft-cap, as in :func:`causal_logit_chunks`.

    Returns:
        ``float32 [B, Hkv, N]`` scores, ``-inf`` at padded keys.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and >= 1 (same padding); got {pool_kernel}")
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg'; got {pooling!r}")
    check_attention_inputs(query, key, valid)
    batch, kv_heads, n_keys = key.shape[0], key.shape[1], key.shape[2]
    n_queries = query.shape[2]
    rows = torch.arange(max(n_queries - window, 0), n_queries, device=query.device)
    total = torch.zeros(batch, kv_heads, n_keys, device=key.device, dtype=torch.float32)
    chunks = causal_logit_chunks(
        query, key, valid, scaling=scaling, softcap=softcap, query_chunk=window, query_rows=rows
    )
    total = _summed_attention(chunks, total)
    if pool_kernel > 1:
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        pooled = pool(total.view(-1, 1, n_keys), pool_kernel, stride=1, padding=pool_kernel // 2)
        total = pooled.view(batch, kv_heads, n_keys)
    return total.masked_fill(~valid[:, None], float("-inf"))
