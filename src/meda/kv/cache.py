"""A cache layer that holds a compressed prefill: fewer keys, a key mask, true positions.

After compression each decoder layer keeps its own number of tokens, so one mask for all
layers (what transformers builds) cannot be right. :class:`CompressedLayer` carries its
own key mask ``[batch, kv_heads, tokens]`` that the attention wrapper uses, and reports
the *logical* sequence length (prefill length + decoded tokens) so that positions of
decoded tokens (RoPE and M-RoPE) continue from N, not from the compressed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers.cache_utils import Cache, DynamicLayer


class CompressedLayer(DynamicLayer):
    """A dynamic cache layer whose stored keys are a selection of the logical sequence.

    Attributes:
        keys, values: ``[batch, kv_heads, stored, head_dim]``.
        key_mask: bool ``[batch, kv_heads, stored]``; False marks empty slots (a head or
            a batch row that kept fewer tokens than the widest one).
        logical_length: tokens seen so far (prefill + decoded), what positions count.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, logical_length: int):
        super().__init__()
        self.device = keys.device
        self.keys = keys
        self.values = values
        self.key_mask = key_mask
        self.logical_length = int(logical_length)
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        # all slots valid -> single-token decode needs no mask at all (fast path)
        self.all_valid = bool(self.key_mask.all())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, q, head_dim]`` new states; returns all stored keys and values."""
        q = key_states.shape[-2]
        if not self.is_initialized:  # after reset(): start over like an empty dynamic layer
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            self.key_mask = torch.ones(*key_states.shape[:3], dtype=torch.bool, device=key_states.device)
            self.logical_length, self.is_initialized = q, True
            self._refresh()
            return self.keys, self.values
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = torch.ones(*self.key_mask.shape[:2], q, dtype=torch.bool, device=self.key_mask.device)
        self.key_mask = torch.cat([self.key_mask, new], dim=-1)
        self.logical_length += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.logical_length

    def reset(self) -> None:
        """Empty the layer (as transformers' ``Cache.reset`` expects); the next ``update`` starts a new sequence."""
        super().reset()
        self.key_mask, self.logical_length, self.all_valid = None, 0, False

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def stored_bytes(self) -> int:
        """Real bytes of the stored tensors (keys, values and the key mask)."""
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + tensor_bytes(self.key_mask)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        super().reorder_cache(beam_idx)
        self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        super().batch_repeat_interleave(repeats)
        self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        super().batch_select_indices(indices)
        self.key_mask = self.key_mask[indices, ...]
        self._refresh()


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def cache_bytes(cache: Cache) -> int:
    """Real bytes held by every layer of ``cache`` (keys + values, plus key masks once compressed)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            total += layer.stored_bytes()
        elif getattr(layer, "is_initialized", False):
            total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
    return total


@dataclass(frozen=True)
class ValidSlots:
    """What a prompt chunk attends over when some stored slots are empty but none of the chunk's own tokens is
    padding: per batch row (and KV head where the heads differ) only the valid slots, gathered into one
    contiguous sequence whose last ``q_len`` tokens are the chunk (:func:`meda.kv.attention.valid_slot_attention`).
    It replaces a ``[batch, heads, q_len, stored]`` mask (15 GB at 8 x 32k queries over 58k slots) and keeps
    the flash / memory-efficient kernels.

    Attributes:
        key_mask: bool ``[batch, kv_heads, stored]``, the layer's key mask (the chunk's slots all True).
    """

    key_mask: torch.Tensor


def attention_mask_for(
    layer: CompressedLayer, q_len: int, n_rep: int, dtype: torch.dtype, additive: bool
) -> torch.Tensor | CausalBias | None:
    """The attention mask of one compressed layer for ``q_len`` new tokens (a decode step or a prompt chunk).

    Returns None when every stored key is visible to every query (single-token decode,
    no empty slots); for SDPA (``additive=False``) with no empty slots, a prompt chunk gets
    ``torch.nn.attention.bias.causal_lower_right(q_len, stored)``, which SDPA runs without
    materialising a mask (the flash / memory-efficient kernels on CUDA); otherwise a mask
    ``[batch, kv_heads * n_rep, q_len, stored]``, bool (True = attend) or additive float in
    ``dtype`` (0 or the dtype's minimum). The last ``q_len`` stored keys are the queries' own
    tokens: causal among themselves.
    """
    if q_len == 1 and layer.all_valid:
        return None
    km = layer.key_mask  # [B, Hkv, T]
    t = km.shape[-1]
    if layer.all_valid and not additive:
        return causal_lower_right(q_len, t)
    mask = km.repeat_interleave(n_rep, dim=1)[:, :, None, :].expand(-1, -1, q_len, -1)
    if q_len > 1:
        q_idx = torch.arange(q_len, device=km.device)[:, None]
        k_idx = torch.arange(t, device=km.device)[None, :] - (t - q_len)
        mask = mask & (k_idx <= q_idx)
    if not additive:
        return mask
    zero = torch.zeros((), dtype=dtype, device=km.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
