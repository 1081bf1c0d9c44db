"""Attention functions that let a compression session watch prefill and mask decode.

Two names are registered with transformers' ``AttentionInterface`` (and its mask
interface): ``meda_sdpa`` and ``meda_eager``. Both call the stock implementation; on a
decoder attention module that belongs to an active session they first hand
``(query, key)`` to the session (prefill statistics) or swap in the layer's own mask
(decode over a compressed layer). Every other module (vision towers, models outside
a session) runs exactly the stock code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

SESSION_ATTR = "_meda_session"
BASES = ("sdpa", "eager")
# On CUDA, layers of a compressed cache differ in length and grow every step; backends that build a
# plan per shape (cuDNN attention) then re-plan at every layer of every step. These do not.
SHAPE_AGNOSTIC_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def wrapped_name(base: str) -> str:
    return f"meda_{base}"


def _eager_for(module: torch.nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward; use sdpa")
    return fn


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = sdpa_attention_forward if base == "sdpa" else _eager_for(module)
        session = getattr(module, SESSION_ATTR, None)
        if session is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        attention_mask = session.on_attention(module, query, key, attention_mask, additive=base == "eager")
        if base == "sdpa" and query.is_cuda:
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
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
