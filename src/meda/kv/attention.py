"""Attention functions that let a compression session watch prefill and mask decode.

Two names are registered with transformers' ``AttentionInterface`` (and its mask
interface): ``meda_sdpa`` and ``meda_eager``. Both call the stock implementation; on a
decoder attention module that belongs to an active session they first hand
``(query, key)`` to the session (prefill statistics) or swap in the layer's own mask
(decode over a compressed layer). Over a static cache layer (``decode="static"``) the
decode step runs :func:`static_decode_attention` instead, which reads the layer's buffers
once with no per-step allocation that depends on the step. Every other module (vision
towers, models outside a session) runs exactly the stock code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function

from meda.kv.cache import ValidSlots

SESSION_ATTR = "_meda_session"
BASES = ("sdpa", "eager")
# On CUDA, layers of a compressed cache differ in length and grow every step; backends that build a
# plan per shape (cuDNN attention) then re-plan at every layer of every step. These do not. A prefill
# from an empty cache (as many keys as queries, one shape for every layer) keeps the stock dispatch.
SHAPE_AGNOSTIC_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# True while a forward feeds a prompt chunk to a cache whose full-attention layers are all a session's compressed
# layers: the session masks each of them itself, so transformers' own causal mask ([batch, 1, chunk, logical
# length], built once per forward and then unused: 34 GB for 8 x 128k in chunks of 32k) is not built.
SESSION_MASKS_ITSELF: ContextVar[bool] = ContextVar("meda_session_masks_itself", default=False)


# The static decode attention splits its product with the values (split-K) over long buffers with few KV heads
# in the batch. Measured on the H200 (Qwen2-7B shape, docs/kv-speed.md): over 32k slots at batch 1 that product,
# one bmm [7 x 32k] x [32k x 128] per KV head, ran at 0.76 TB/s (44 us per layer, where the score product over
# the same keys took 11 us); at 128k slots the split step was at least 25% faster, at batch 8 x 32k it was 15%
# slower (enough KV heads keep the GPU busy without it).
SPLIT_FROM_SLOTS = 16384
SPLIT_UP_TO_HEADS = 8  # batch x KV heads


def split_for(batch_heads: int, slots: int) -> int | None:
    """The ``split`` :func:`static_decode_attention` uses for ``batch_heads`` (batch x KV heads) and ``slots``:
    the largest of 1024 ... 64 slots that divides ``slots`` (static slot counts are multiples of 64), or None."""
    if slots < SPLIT_FROM_SLOTS or batch_heads > SPLIT_UP_TO_HEADS:
        return None
    return next((c for c in (1024, 512, 256, 128, 64) if slots % c == 0), None)


def wrapped_name(base: str) -> str:
    return f"meda_{base}"


def _eager_for(module: torch.nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward; use sdpa")
    return fn


def static_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_bias: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """One decode step of GQA attention over static buffers, without repeating keys per query head.

    Args:
        query: ``[batch, q_heads, 1, head_dim]`` (post-RoPE).
        keys, values: ``[batch, kv_heads, slots, head_dim]``.
        key_bias: ``[batch, kv_heads, 1, slots]``, 0 for a slot that holds a token, -inf otherwise.
        scaling: the score scale (the module's ``scaling``); softcap: Gemma-2-style logit cap.
        split: with ``split=c`` (``c`` divides ``slots``) the product with the values runs as
            ``slots / c`` products of ``c`` slots each, summed in float32 (split-K: a long buffer
            is read by many thread blocks instead of one per KV head); None is one product.

    Returns:
        ``[batch, 1, q_heads, head_dim]``, the layout transformers' attention functions return.

    The query heads that share a KV head become rows of one matrix product (the ``repeat_kv``
    order: query head ``h`` reads KV head ``h // (q_heads / kv_heads)``), so keys and values are
    read once. Scores follow the eager attention's precision (products in the keys' dtype,
    softmax in float32).
    """
    b, hq, q, d = query.shape
    hkv, slots = keys.shape[1], keys.shape[2]
    if q != 1:
        raise NotImplementedError(f"static decode attention takes one query token per step, got {q}")
    rep = hq // hkv
    qg = query.reshape(b * hkv, rep, d).to(keys.dtype)
    kt = keys.view(b * hkv, slots, d).transpose(1, 2)
    bias = key_bias.view(b * hkv, 1, slots)
    if softcap is None:
        scores = torch.baddbmm(bias, qg, kt, alpha=scaling)
    else:
        scores = softcap * torch.tanh(torch.bmm(qg, kt) * (scaling / softcap)) + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    dv = values.shape[-1]
    if split is None:
        out = torch.bmm(probs, values.view(b * hkv, slots, dv))  # [B*Hkv, rep, D]
    else:
        parts = slots // split
        p = probs.view(b * hkv, rep, parts, split).transpose(1, 2).reshape(b * hkv * parts, rep, split)
        out = torch.bmm(p, values.view(b * hkv * parts, split, dv)).view(b * hkv, parts, rep, dv)
        out = out.sum(1, dtype=torch.float32).to(values.dtype)
    return out.view(b, hq, 1, dv).transpose(1, 2)


def _static_attention(layer, query, kwargs) -> tuple[torch.Tensor, None]:
    unsupported = sorted(k for k in ("s_aux", "sinks") if kwargs.get(k) is not None)
    if unsupported:
        raise NotImplementedError(f"decode='static' does not support attention with {unsupported}; use 'dynamic'")
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    b, h, slots = layer.keys.shape[:3]
    out = static_decode_attention(
        query, layer.keys, layer.values, layer.key_bias, scaling=scaling, softcap=kwargs.get("softcap"),
        split=split_for(b * h, slots),
    )
    return out, None


def lower_right_attention(module, query, key, value, bias: CausalBias, **kwargs) -> tuple[torch.Tensor, None]:
    """A prompt chunk over a compressed layer whose stored keys are all visible: SDPA with ``bias``
    (``causal_lower_right``: query ``i`` of the chunk sees every kept key and the chunk's keys up to its own).

    query ``[B, Hq, q, D]``, key / value ``[B, Hkv, T, D]``; returns ``[B, q, Hq, D]`` as transformers'
    attention functions do. No ``[B, H, q, T]`` mask is built: on CUDA this runs the flash or memory-efficient
    kernel (on the CPU SDPA materialises the bias itself).
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # transformers' own GQA expansion
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    scale = kwargs.get("scaling")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def valid_slot_attention(module, query, key, value, slots: ValidSlots, **kwargs) -> tuple[torch.Tensor, None]:
    """A prompt chunk over a compressed layer with empty slots (rows or heads that kept fewer tokens than the
    widest): per batch row, and per KV head where the row's heads differ, the valid slots are gathered and the
    chunk attends over them with :func:`lower_right_attention` (the chunk is their last ``q`` tokens).

    query ``[B, Hq, q, D]``, key / value ``[B, Hkv, T, D]``, ``slots.key_mask`` ``[B, Hkv, T]``; returns
    ``[B, q, Hq, D]``. Equal to SDPA with the explicit ``[B, Hq, q, T]`` mask, without building it: the copies
    are one row's kept keys and values at a time.
    """
    q_len, kv_heads = query.shape[-2], key.shape[1]
    group = query.shape[1] // kv_heads
    rows = []
    for b in range(query.shape[0]):
        mask = slots.key_mask[b]  # [Hkv, T]
        shared = bool((mask == mask[:1]).all())
        heads = [slice(0, kv_heads)] if shared else [slice(h, h + 1) for h in range(kv_heads)]
        parts = []
        for hs in heads:
            idx = mask[hs.start].nonzero().squeeze(-1)  # the valid slots, ascending: the chunk's are the last q_len
            k = key[b : b + 1, hs].index_select(2, idx)
            v = value[b : b + 1, hs].index_select(2, idx)
            q = query[b : b + 1, hs.start * group : hs.stop * group]
            parts.append(lower_right_attention(module, q, k, v, causal_lower_right(q_len, idx.numel()), **kwargs)[0])
        rows.append(torch.cat(parts, dim=2))  # [1, q, Hq, D]
    return torch.cat(rows, dim=0), None


def _mask_maker(base: str) -> Callable:
    """transformers' mask function for ``base``, except for the full causal mask of a forward that the session masks
    itself (:data:`SESSION_MASKS_ITSELF`): None. Sliding-window, chunked and custom masks are always built."""
    stock = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def mask(*args, **kwargs):
        chunk = kwargs.get("q_length", 1) > 1  # checked first: a (compiled) decode step never reads the flag
        plain_causal = kwargs.get("mask_function") is causal_mask_function and kwargs.get("local_size") is None
        if chunk and plain_causal and SESSION_MASKS_ITSELF.get():
            return None
        return stock(*args, **kwargs)

    return mask


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = sdpa_attention_forward if base == "sdpa" else _eager_for(module)
        session = getattr(module, SESSION_ATTR, None)
        if session is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        static = session.static_layer_for(module, key)
        if static is not None:
            return _static_attention(static, query, kwargs)
        attention_mask = session.on_attention(module, query, key, attention_mask, additive=base == "eager")
        if isinstance(attention_mask, CausalBias):
            return lower_right_attention(module, query, key, value, attention_mask, **kwargs)
        if isinstance(attention_mask, ValidSlots):
            return valid_slot_attention(module, query, key, value, attention_mask, **kwargs)
        if base == "sdpa" and query.is_cuda and query.shape[-2] != key.shape[-2]:
            with sdpa_kernel(SHAPE_AGNOSTIC_BACKENDS):
                return stock(module, query, key, value, attention_mask, **kwargs)
        return stock(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{wrapped_name(base)}_attention_forward"
    return attention


def register() -> None:
    """Register ``meda_sdpa`` and ``meda_eager`` (idempotent)."""
    for base in BASES:
        name = wrapped_name(base)
        AttentionInterface.register(name, _make(base))
        AttentionMaskInterface.register(name, _mask_maker(base))
