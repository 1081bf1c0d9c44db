"""Merge evicted KV pairs into kept ones (MEDA / LOOK-M), per KV head.

Every evicted token (valid, not kept by that head) is assigned to the kept slot of the same head whose
key has the highest cosine similarity with its key (ties: lowest slot). For a kept pair ``(k, v)`` with
merged group ``M`` (``n = |M|``):

- ``average``:  ``k' = (k + sum_M k_m) / (1 + n)``                          (MEDA, LOOK-M averaged)
- ``pivot``:    ``k' = (k + mean_M k_m) / 2``                               (LOOK-M pivotal)
- ``weighted``: ``k' = (s k + sum_M s_m k_m) / (s + sum_M s_m)``, ``s`` the token scores; a group whose
  weights sum to 0 falls back to ``average``

and the same for ``v`` (``merge_keys=False`` merges values only: every kept key stays as it was). Each is
``k' = (1 - share) k + share * mean``, ``mean`` the (weighted) mean of the absorbed pairs and ``share`` what
the mode gives them (``n / (1 + n)``, ``1/2``, ``sum_M s_m / (s + sum_M s_m)``); ``cap`` bounds ``share``, so
a slot that absorbs many pairs keeps at least ``1 - cap`` of itself (with ``average``, 50 absorbed pairs
would otherwise leave it 2%).
``threshold`` drops instead of merges an evicted pair whose best cosine similarity is below it.
``targets`` optionally restricts which kept slots may receive merges
(:func:`scored_targets`: not the sink / recent-window slots). Slots with nothing merged are returned
unchanged, so with no evicted token the result equals :func:`meda.kv.selection.gather_kv` exactly.
Evicted tokens are processed in chunks of ``chunk`` positions (fewer where ``B x Hkv x chunk x K`` would pass
:data:`MAX_SIMILARITIES`): never an ``[evicted x kept]`` map at once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from meda.kv.selection import Selection, gather_kv

# At most this many float32 similarities per step ([B, Hkv, chunk, K]: 1 GiB): at batch 8 over 26k kept slots the
# default chunk of 4096 evicted positions would otherwise build 7 GB at once, and as much again for its mask.
MAX_SIMILARITIES = 1 << 28

MergeMode = Literal["average", "pivot", "weighted"]
MERGE_MODES: tuple[str, ...] = ("average", "pivot", "weighted")


def _group_sums(
    keys: Tensor,
    values: Tensor,
    slot_keys: Tensor,
    slot_mask: Tensor,
    weights: Tensor,
    chunk: int,
    threshold: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter-add weighted evicted pairs onto their most similar slot.

    Args:
        keys ``[B, H, N, Dk]``, values ``[B, H, N, Dv]``; slot_keys ``[B, H, K, Dk]``; slot_mask
        ``[B, H, K]``; weights ``[B, H, N, M]`` (M weightings at once, 0 for tokens not merged);
        threshold: pairs whose best similarity is below it get weight 0 (dropped).

    Returns:
        float32 ``(sum w k [B, H, K, M, Dk], sum w v [B, H, K, M, Dv], sum w [B, H, K, M])``.
    """
    batch, heads, n_tokens, _ = keys.shape
    width, n_weights = slot_keys.shape[2], weights.shape[-1]
    unit_slots = F.normalize(slot_keys.float(), dim=-1).transpose(-1, -2)  # [B, H, Dk, K]
    shape = (batch, heads, width, n_weights)
    sum_k = keys.new_zeros(*shape, keys.shape[-1], dtype=torch.float32)
    sum_v = values.new_zeros(*shape, values.shape[-1], dtype=torch.float32)
    sum_w = keys.new_zeros(*shape, dtype=torch.float32)
    chunk = max(1, min(chunk, MAX_SIMILARITIES // max(batch * heads * width, 1)))
    for start in range(0, n_tokens, chunk):
        k = keys[:, :, start : start + chunk].float()
        v = values[:, :, start : start + chunk].float()
        w = weights[:, :, start : start + chunk]  # [B, H, c, M]
        similarity = torch.matmul(F.normalize(k, dim=-1), unit_slots)  # [B, H, c, K]
        best, target = similarity.masked_fill(~slot_mask[:, :, None], float("-inf")).max(dim=-1)
        if threshold is not None:
            w = w * (best >= threshold)[..., None]
        target = target[..., None].expand(-1, -1, -1, n_weights)  # [B, H, c, M]
        sum_w.scatter_add_(2, target, w)
        for total, x in ((sum_k, k), (sum_v, v)):
            src = w[..., None] * x[:, :, :, None]  # [B, H, c, M, D]
            total.scatter_add_(2, target[..., None].expand_as(src), src)
    return sum_k, sum_v, sum_w


def scored_targets(selection: Selection, valid: Tensor, *, sink_tokens: int = 0, recent_window: int = 0) -> Tensor:
    """``BoolTensor [B, Hkv, K]``: kept slots that are neither sinks nor in the recent window.

    A slot is protected when its token is among the first ``sink_tokens`` or the last ``recent_window``
    valid tokens of its row (the same rule as :func:`meda.kv.selection.select_indices`). Pass the result
    as ``targets`` to :func:`merge_evicted` to merge evicted pairs only into slots kept for their score.
    """
    rank = valid.long().cumsum(dim=1) - 1  # [B, N] rank among valid tokens
    n_valid = valid.sum(dim=1)[:, None, None]
    slot_rank = rank[:, None].expand(-1, selection.indices.shape[1], -1).gather(-1, selection.indices)
    protected = (slot_rank < sink_tokens) | (slot_rank >= n_valid - recent_window)
    return selection.mask & ~protected


def merge_evicted(
    keys: Tensor,
    values: Tensor,
    selection: Selection,
    valid: Tensor,
    *,
    mode: MergeMode = "average",
    scores: Tensor | None = None,
    targets: Tensor | None = None,
    merge_keys: bool = True,
    threshold: float | None = None,
    cap: float | None = None,
    chunk: int = 4096,
    with_counts: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Kept pairs with the evicted pairs of their head merged in (see the module docstring).

    Args:
        keys: ``[B, Hkv, N, Dk]``; values: ``[B, Hkv, N, Dv]``; valid: ``BoolTensor [B, N]``.
        selection: the kept slots (:func:`meda.kv.selection.select_indices`).
        mode: ``"average"``, ``"pivot"`` or ``"weighted"``.
        scores: ``[B, Hkv, N]`` non-negative, finite at valid tokens; required for ``"weighted"``.
        targets: optional ``BoolTensor [B, Hkv, K]``: the kept slots allowed to receive evicted pairs
            (default: every kept slot). Evicted tokens go to the most similar allowed slot; slots outside
            ``targets`` are returned unchanged; a head with no allowed slot merges nothing (its evicted
            tokens are dropped).
        merge_keys: False keeps every kept key unchanged and merges the values only.
        threshold: optional cosine similarity below which an evicted pair is dropped, not merged.
        cap: optional largest share (in [0, 1]) of a merged pair that may come from the pairs it absorbed
            (see the module docstring); 0 keeps every kept pair as it was, None applies no cap.
        chunk: evicted-candidate positions per step (lowered to keep a step's similarities under
            :data:`MAX_SIMILARITIES`).
        with_counts: also return ``merged [B, Hkv]``, the evicted pairs really merged per head.

    Returns:
        ``(k [B, Hkv, K, Dk], v [B, Hkv, K, Dv])`` in the input dtype, aligned with ``selection``
        (and ``merged`` with ``with_counts``).
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}; got {mode!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    if cap is not None and not 0 <= cap <= 1:
        raise ValueError(f"cap must be None or a share in [0, 1]; got {cap}")
    kept_k, kept_v = gather_kv(keys, values, selection)
    batch, heads, n_tokens, _ = keys.shape
    if valid.dtype != torch.bool or tuple(valid.shape) != (batch, n_tokens):
        raise ValueError(f"valid must be a bool tensor [{batch}, {n_tokens}]; got {valid.dtype} {tuple(valid.shape)}")
    slot_mask = selection.mask
    if targets is not None:
        if targets.dtype != torch.bool or targets.shape != slot_mask.shape:
            raise ValueError(
                f"targets must be a bool tensor {tuple(slot_mask.shape)}; got {targets.dtype} {tuple(targets.shape)}"
            )
        slot_mask = slot_mask & targets
    evicted = valid[:, None] & ~selection.token_mask(n_tokens) & slot_mask.any(dim=-1)[..., None]
    weights = [evicted.float()]
    if mode == "weighted":
        if scores is None or tuple(scores.shape) != (batch, heads, n_tokens):
            raise ValueError(f"mode='weighted' needs scores [{batch}, {heads}, {n_tokens}]")
        scores = scores.float()
        usable = torch.isfinite(scores) & (scores >= 0)
        if (valid[:, None] & ~usable).any():
            raise ValueError("weighted merge needs finite, non-negative scores at every valid token")
        weights.append(torch.where(evicted, scores, 0.0))
    sum_k, sum_v, sum_w = _group_sums(
        keys, values, kept_k, slot_mask, torch.stack(weights, -1), chunk, threshold
    )

    count = sum_w[..., 0]  # [B, H, K] merged tokens per slot
    # Every mode is k' = (1 - share) k + share * (mean of what the slot absorbed), share <= cap.
    use_scores = torch.zeros_like(count, dtype=torch.bool)  # [B, H, K] absorbed mean weighted by scores (the
    # last weighting column; without scores there is one column)
    if mode == "weighted":
        own = scores.gather(-1, selection.indices).masked_fill(~slot_mask, 0.0)  # [B, H, K]
        weight = own + sum_w[..., 1]
        use_scores = weight > 0  # a group whose weights sum to 0 falls back to average
        share = torch.where(use_scores, sum_w[..., 1] / weight.clamp_min(1e-30), count / (1.0 + count))
    else:
        share = count / (1.0 + count) if mode == "average" else torch.full_like(count, 0.5)
    if cap is not None:
        share = share.clamp_max(cap)
    absorbed_w = torch.where(use_scores, sum_w[..., -1], count).clamp_min(1e-30)[..., None]
    merged = []
    for kept, total in ((kept_k.float(), sum_k), (kept_v.float(), sum_v)):
        absorbed_mean = torch.where(use_scores[..., None], total[..., -1, :], total[..., 0, :]) / absorbed_w
        merged.append((1.0 - share[..., None]) * kept + share[..., None] * absorbed_mean)
    changed = (slot_mask & (count > 0))[..., None]
    k = torch.where(changed, merged[0].to(keys.dtype), kept_k) if merge_keys else kept_k
    v = torch.where(changed, merged[1].to(values.dtype), kept_v)
    if with_counts:
        return k, v, count.sum(dim=-1)
    return k, v
