"""Post-vision attention density of one layer (VL-Cache, Tu et al. 2024), the signal of its layer budgets.

VL-Cache observes that after the vision tokens, a layer's attention is sparse to a degree that varies
by layer, and gives each layer a budget in proportion to how dense it is. Here, for each query head and
each *post-vision* query (the valid tokens after the last token of the ``vision`` group: the text that
follows the images, or, for text-only prompts, the final question), an attention entry counts as dense
when it is at least ``threshold`` times its row's largest entry (VL-Cache: 1%). The layer's density is
the dense share of all visible (query, key) entries, averaged over heads and post-vision queries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meda.kv.scoring import causal_logit_chunks


def post_vision_queries(vision: Tensor, valid: Tensor) -> Tensor:
    """``BoolTensor [B, N]``: valid tokens after the last ``vision`` token of their row (all valid tokens of a
    row without vision tokens; the last valid token when a row ends with vision tokens)."""
    n = valid.shape[1]
    position = torch.arange(n, device=valid.device).expand_as(valid)
    last_vision = torch.where(vision, position, -1).amax(dim=1, keepdim=True)  # [B, 1]
    post = valid & (position > last_vision)
    last_valid = torch.where(valid, position, -1).amax(dim=1, keepdim=True)
    return post | (~post.any(dim=1, keepdim=True) & (position == last_valid))


def post_vision_density(
    query: Tensor,
    key: Tensor,
    vision: Tensor,
    valid: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    threshold: float = 0.01,
    query_chunk: int = 512,
) -> Tensor:
    """Density of post-vision attention per batch row.

    Args:
        query: ``[B, Hq, N, D]`` post-RoPE prefill queries; key: ``[B, Hkv, N, D]``.
        vision, valid: ``BoolTensor [B, N]`` (vision: the group the post-vision queries follow).
        scaling: logit scale; softcap: attention-logit soft-cap or None.
        threshold: share of the row maximum below which an entry is sparse.

    Returns:
        ``float32 [B]`` in (0, 1].
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1); got {threshold}")
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("post_vision_density needs the prefill's queries for every key (Nq == N)")
    post = post_vision_queries(vision, valid)  # [B, N]
    n = valid.shape[1]
    span = int((n - post.float().argmax(dim=1)).max())  # trailing rows that hold every row's post-vision queries
    rows = torch.arange(n - span, n, device=query.device)
    dense = torch.zeros(valid.shape[0], device=query.device)
    total = torch.zeros(valid.shape[0], device=query.device)
    for positions, logits, visible in causal_logit_chunks(
        query, key, valid, scaling=scaling, softcap=softcap, query_chunk=query_chunk, query_rows=rows
    ):
        use = post.gather(1, positions)  # [B, c]
        row_max = logits.amax(dim=-1, keepdim=True)
        counted = (visible & use[..., None])[:, None, None]  # [B, 1, 1, c, N]
        # p >= threshold * max  <=>  logit >= max + log(threshold)
        hits = (logits >= row_max + torch.log(torch.tensor(threshold))) & counted
        dense += hits.sum(dim=(1, 2, 3, 4)).float()
        total += counted.expand_as(hits).sum(dim=(1, 2, 3, 4)).float()
    return dense / total.clamp_min(1.0)
