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
from meda.kv.scoring import causal_logit_chunks, check_attention_inputs


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
        query_chunk: query rows per chunk (peak memory about ``2 x B x Hq x query_chunk x N`` floats).
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
        kernel computes them (:mod:`meda.kv.kernels`), elsewhere the chunked PyTorch reference below.
    """
    if vision.dtype != torch.bool or vision.shape != valid.shape:
        raise ValueError(
            f"vision must be a bool tensor shaped like valid {tuple(valid.shape)}; got {vision.dtype} "
            f"{tuple(vision.shape)}"
        )
    if fused_available(query):
        from meda.kv.kernels.statistics import entropy_sums

        check_attention_inputs(query, key, valid)
        return entropy_sums(query, key, vision, valid, scaling=scaling, softcap=softcap, query_subset=query_subset)
    batch = query.shape[0]
    sums = torch.zeros(batch, 2, device=key.device, dtype=torch.float32)  # [text rows, vision rows]
    counts = torch.zeros(batch, 2, device=key.device, dtype=torch.float32)
    chunks = causal_logit_chunks(
        query, key, valid, scaling=scaling, softcap=softcap, query_chunk=query_chunk, query_rows=query_subset
    )
    for positions, logits, visible in chunks:
        query_vision = vision.gather(1, positions)  # [B, c]
        hidden = ~(visible & (vision[:, None, :] != query_vision[..., None]))[:, None, None]  # [B,1,1,c,N]
        log_probs = torch.log_softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
        del logits  # peak memory: two chunk-sized tensors
        row_entropy = _entropy_rows(log_probs, hidden)  # [B, c], summed over query heads
        del log_probs
        eligible = ~hidden[:, 0, 0].all(dim=-1)  # [B, c]; padded queries see no key
        rows = torch.stack((~query_vision, query_vision), dim=-1) & eligible[..., None]  # [B, c, 2]
        sums += (row_entropy[..., None] * rows).sum(dim=1)
        counts += rows.sum(dim=1)
    return sums, counts


def _entropy_rows(log_probs: Tensor, hidden: Tensor) -> Tensor:
    """``-sum p log p`` over keys and query heads: ``[B, Hkv, G, c, N] -> [B, c]`` (0 log 0 := 0)."""
    return -log_probs.exp().mul_(log_probs).masked_fill_(hidden, 0.0).sum(dim=(-1, 1, 2))
