"""Static cache layers for the fast decode path: buffers allocated once, written in place.

After a prefill (compressed or not) each full-attention cache layer becomes a :class:`StaticLayer`:
keys and values live in buffers ``[batch, kv_heads, stored + room, head_dim]``; the prefill's kept
pairs fill the first ``stored`` slots and decoded token ``t`` goes to slot ``stored + t``. Which
slots hold a token is an additive key bias ``[batch, kv_heads, 1, slots]`` (0 or -inf), so padded
rows and AdaKV's uneven heads need no other mask. The write slot is a device tensor that the
update advances itself: a decode step allocates nothing and reads nothing back to the host, which
is what lets :mod:`meda.kv.fast_decode` capture it in a CUDA graph.

Host-side counters (``decoded``, ``logical_length``) and the room check move in ``update`` for a layer
used on its own; the decoder of :mod:`meda.kv.fast_decode` turns that off (``self_counting = False``)
and keeps the books itself (:func:`ensure_room` before a step, :meth:`StaticLayer.advance` after it),
so the step reads no host state: a CUDA graph or ``torch.compile`` sees only device work.
"""

from __future__ import annotations

import math

import torch

from meda.kv.cache import CompressedLayer, tensor_bytes

# Slot counts are rounded up to a multiple of this: bf16 matrix products over an unaligned slot count
# fall back to slow kernels (measured on the H200: 6,585 slots cost more than 32,800).
SLOT_ALIGN = 64


class StaticLayer(CompressedLayer):
    """A cache layer with preallocated buffers: ``stored`` prefill slots plus ``room`` decode slots.

    Attributes:
        keys, values: ``[batch, kv_heads, stored + room, head_dim]`` buffers (fixed addresses).
        key_bias: ``[batch, kv_heads, 1, stored + room]`` in the keys' dtype: 0 where a slot holds a
            token, -inf where it is empty (padding, a head that kept fewer tokens, free decode slots).
        slot: long ``[1]`` on the device, the slot the next decoded token is written to.
        stored: prefill slots; room: decode slots (at least the room asked for, rounded up so that
            ``stored + room`` is a multiple of :data:`SLOT_ALIGN`); decoded: tokens decoded so far.
        self_counting: ``update`` checks the room and advances the counters itself (True for a layer used
            on its own; the static decoder sets False and does both around each step).
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, logical_length: int, room: int
    ):
        """``keys``/``values`` ``[batch, kv_heads, stored, head_dim]``, ``key_mask`` ``[batch, kv_heads, stored]``."""
        if room < 1:
            raise ValueError(f"a static cache layer needs room for at least one decoded token, got room={room}")
        super(CompressedLayer, self).__init__()  # DynamicLayer's init: no tensors yet
        b, h, stored, d = keys.shape
        room = -(-(stored + room) // SLOT_ALIGN) * SLOT_ALIGN - stored
        self.device = keys.device
        self.keys = keys.new_zeros(b, h, stored + room, d)
        self.values = values.new_zeros(b, h, stored + room, values.shape[-1])
        self.keys[:, :, :stored] = keys
        self.values[:, :, :stored] = values
        self.key_bias = torch.full((b, h, 1, stored + room), -math.inf, dtype=keys.dtype, device=keys.device)
        self.key_bias[:, :, 0, :stored].masked_fill_(key_mask.to(keys.device), 0.0)
        self.slot = torch.full((1,), stored, dtype=torch.long, device=keys.device)
        self.stored, self.room, self.decoded = stored, room, 0
        self.logical_length = int(logical_length)
        self.is_initialized = True
        self.all_valid = False
        self.self_counting = True

    @property
    def key_mask(self) -> torch.Tensor:
        """bool ``[batch, kv_heads, stored + room]``: slots that hold a token."""
        return self.key_bias[:, :, 0, :] == 0

    @property
    def free_slots(self) -> int:
        return self.room - self.decoded

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write one new token ``[batch, kv_heads, 1, head_dim]`` in place; returns the whole buffers."""
        if key_states.shape[-2] != 1:
            raise NotImplementedError(
                f"a static cache layer takes one new token per step, got {key_states.shape[-2]}; "
                "continued prompts, generate(prefill_chunk_size=...) and assisted decoding need "
                "compress(..., decode='dynamic')"
            )
        if self.self_counting and self.free_slots < 1:
            self.grow(self.room)
        self.keys.index_copy_(2, self.slot, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.slot, value_states.to(self.values.dtype))
        self.key_bias.index_fill_(3, self.slot, 0.0)
        self.slot.add_(1)
        if self.self_counting:
            self.advance()
        return self.keys, self.values

    def advance(self) -> None:
        """Host-side bookkeeping of one decoded token (called by ``update``, or by the decoder after a step)."""
        self.decoded += 1
        self.logical_length += 1

    def grow(self, extra: int) -> None:
        """Reallocate with ``extra`` more decode slots (new buffer addresses: a captured graph is stale)."""
        b, h, _, d = self.keys.shape
        extra = -(-extra // SLOT_ALIGN) * SLOT_ALIGN
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, extra, d)], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, extra, self.values.shape[-1])], dim=2)
        self.key_bias = torch.cat([self.key_bias, self.key_bias.new_full((b, h, 1, extra), -math.inf)], dim=3)
        self.room += extra

    def stored_bytes(self) -> int:
        """Real bytes of the buffers (free decode slots included) and the key bias."""
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + tensor_bytes(self.key_bias)

    def reset(self) -> None:
        """Empty the layer, keeping its buffers: every slot free, the next token goes to slot 0."""
        self.key_bias.fill_(-math.inf)
        self.slot.zero_()
        self.room += self.stored
        self.stored, self.decoded, self.logical_length = 0, 0, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows in place (buffer addresses stay valid for a graph)."""
        idx = beam_idx.to(self.keys.device)
        for t in (self.keys, self.values, self.key_bias):
            t.copy_(t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache cannot change its batch size; use compress(..., decode='dynamic')")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache cannot change its batch size; use compress(..., decode='dynamic')")


def static_layers(cache) -> list[StaticLayer] | None:
    """The cache's layers when every one is a :class:`StaticLayer`, else None."""
    layers = list(getattr(cache, "layers", None) or [])
    if layers and all(isinstance(layer, StaticLayer) for layer in layers):
        return layers
    return None


def ensure_room(layers: list[StaticLayer]) -> bool:
    """Give every layer at least one free slot (doubling the room where needed); True if any grew."""
    grew = False
    for layer in layers:
        if layer.free_slots < 1:
            layer.grow(layer.room)
            grew = True
    return grew
