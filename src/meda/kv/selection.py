"""Which KV pairs each head keeps: protected sinks and recent tokens, then priority tokens, then top score.

The order of preference, per KV head, is lexicographic:

1. the first ``sink_tokens`` valid tokens (earliest first), then the last ``recent_window`` valid
   tokens (latest first) -- StreamingLLM is exactly this with all-zero scores;
2. ``priority`` tokens (MEDA / LOOK-M "text first"; equivalent to adding ``max(score)`` to them when
   scores are non-negative), by score;
3. every other valid token, by score (ties: earlier token first);
4. padding, never kept.

Each head keeps its first ``min(keep, valid tokens)`` tokens, so ``keep >= valid tokens`` keeps
every valid token in order (budget 1.0 is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """Kept token positions per KV head.

    Attributes:
        indices: ``LongTensor [B, Hkv, K]``, ``K`` the largest kept count; the kept positions come
            first, ascending (original order), then filler slots.
        mask: ``BoolTensor [B, Hkv, K]``, True at kept slots; False at filler slots (their index is an
            arbitrary in-range position: never read them unmasked).
    """

    indices: Tensor
    mask: Tensor

    @property
    def counts(self) -> Tensor:
        """``LongTensor [B, Hkv]``: tokens kept per head."""
        return self.mask.sum(dim=-1)

    def token_mask(self, num_tokens: int) -> Tensor:
        """``BoolTensor [B, Hkv, num_tokens]``: True at the positions this selection keeps."""
        out = torch.zeros(*self.indices.shape[:2], num_tokens, dtype=torch.bool, device=self.indices.device)
        return out.scatter_(-1, self.indices, self.mask)


def _as_keep(keep: Tensor | int, batch: int, heads: int, device: torch.device) -> Tensor:
    """Broadcast ``keep`` (int, ``[B]``, ``[B, 1]`` or ``[B, Hkv]``) to ``LongTensor [B, Hkv]``."""
    keep = torch.as_tensor(keep, device=device)
    if keep.is_floating_point():
        raise ValueError("keep must hold integer token counts; convert fractions with fractions_to_counts")
    if keep.dim() == 1:
        keep = keep[:, None]
    try:
        keep = keep.long().expand(batch, heads)
    except RuntimeError as err:
        raise ValueError(
            f"keep {tuple(keep.shape)} does not broadcast to [batch, kv_heads] = [{batch}, {heads}]"
        ) from err
    if (keep < 0).any():
        raise ValueError("keep must be >= 0 tokens per head")
    return keep


def select_indices(
    scores: Tensor,
    keep: Tensor | int,
    valid: Tensor,
    *,
    sink_tokens: int = 0,
    recent_window: int = 0,
    priority: Tensor | None = None,
) -> Selection:
    """Choose the kept tokens of every KV head (see the module docstring for the rules).

    Args:
        scores: ``[B, Hkv, N]`` importance, higher is kept first (values at padding are ignored).
        keep: tokens to keep per head: ``LongTensor [B, Hkv]``, or broadcastable ``[B, 1]``, ``[B]``, int.
        valid: ``BoolTensor [B, N]``, False at padding.
        sink_tokens: leading valid tokens always kept (attention sinks).
        recent_window: trailing valid tokens always kept (SnapKV: pass its observation window).
        priority: optional ``BoolTensor [B, N]`` of tokens preferred over the rest (e.g. text).

    Returns:
        :class:`Selection` with ``K = max_b,h min(keep, valid tokens of b)``.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [batch, kv_heads, tokens]; got {tuple(scores.shape)}")
    batch, heads, n_tokens = scores.shape
    for name, mask in (("valid", valid), ("priority", priority)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (batch, n_tokens)):
            raise ValueError(
                f"{name} must be a bool tensor [batch, tokens] = [{batch}, {n_tokens}]; got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
    if sink_tokens < 0 or recent_window < 0:
        raise ValueError(f"sink_tokens and recent_window must be >= 0; got {sink_tokens}, {recent_window}")
    if torch.isnan(scores).logical_and(valid[:, None]).any():
        raise ValueError("scores are NaN at valid tokens; check the scorer's inputs")
    keep = _as_keep(keep, batch, heads, scores.device)

    n_valid = valid.sum(dim=1, keepdim=True)  # [B, 1]
    rank = valid.cumsum(dim=1) - 1  # rank among valid tokens
    sink = valid & (rank < sink_tokens)
    recent = valid & (rank >= n_valid - recent_window) & ~sink
    tier = torch.full_like(rank, 3)
    if priority is not None:
        tier = tier.masked_fill(priority, 2)
    tier = tier.masked_fill(recent, 1).masked_fill(sink, 0).masked_fill(~valid, 4)

    position = torch.arange(n_tokens, device=scores.device, dtype=torch.float32).expand(batch, n_tokens)
    protected_order = torch.where(sink, -position, position)  # sinks earliest first, recent latest first
    within = torch.where(
        (sink | recent)[:, None], protected_order[:, None], scores.float().masked_fill(~valid[:, None], 0.0)
    )
    order = within.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, tier[:, None].expand(-1, heads, -1).gather(-1, order).argsort(dim=-1, stable=True))

    kept = torch.minimum(keep, n_valid)  # [B, Hkv]
    width = int(kept.max()) if kept.numel() else 0
    slots = torch.arange(width, device=scores.device)
    mask = slots < kept[..., None]
    top = order[..., :width]
    # Kept positions first in ascending order, filler slots after them.
    indices = torch.where(mask, top, top + n_tokens).sort(dim=-1).values.remainder(n_tokens)
    return Selection(indices=indices, mask=mask)


def gather_kv(keys: Tensor, values: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
    """Gather the selected pairs: ``keys [B, Hkv, N, Dk]``, ``values [B, Hkv, N, Dv]`` ->
    ``([B, Hkv, K, Dk], [B, Hkv, K, Dv])`` in the input dtype (filler slots hold arbitrary tokens)."""
    index = selection.indices
    if keys.dim() != 4 or values.shape[:3] != keys.shape[:3] or index.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and selection {tuple(index.shape)} "
            "must share [batch, kv_heads] and keys/values the token count"
        )
    k = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
    v = values.gather(2, index[..., None].expand(-1, -1, -1, values.shape[-1]))
    return k, v
