"""What meda.kv needs from a model, checked on the model itself rather than on a list of family names.

A model can be compressed when its text decoder

1. runs every layer's self-attention through transformers' attention interface: a module with an integer
   ``layer_idx``, a float ``scaling`` and ``is_causal`` whose modeling file defines ``eager_attention_forward``
   (whatever its projections: separate q/k/v, fused ``qkv_proj`` / ``c_attn``, q/k norms), and
2. keeps a cache of per-token keys and values for each layer (``DynamicCache(config=...)`` builds a
   full-attention or a sliding-window layer for it, not a recurrent/convolution state or a shared layer).

Full-attention layers are compressed; sliding-window (and chunked) layers keep their own bounded window
cache and are left as they are. A model with no full-attention layer has nothing to compress.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from meda.kv.models import family


@dataclass(frozen=True)
class DecoderLayers:
    """The text decoder's attention layers, by kind.

    Attributes:
        modules: ``{layer_idx: attention module}`` of every decoder layer, in order.
        full: indices of full-attention layers (compressed).
        sliding: indices of sliding-window / chunked layers (left with their own window cache).
        window: the sliding window (tokens) of the sliding layers, None when there are none.
    """

    modules: dict[int, torch.nn.Module]
    full: tuple[int, ...]
    sliding: tuple[int, ...]
    window: int | None


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer_idx: module}`` of the text decoder's self-attention modules (vision towers excluded)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    found: dict[int, torch.nn.Module] = {}
    for module in decoder.modules():
        if _uses_attention_interface(module):
            found[module.layer_idx] = module
    return dict(sorted(found.items()))


def decoder_sub_blocks(model: torch.nn.Module, attention: dict[int, torch.nn.Module]) -> list[torch.nn.Module]:
    """The pure sub-blocks of the decoder layers: every child of a layer holding one of ``attention``'s
    modules, other than that attention (its norms, its MLP, dropouts). They read no cache, so
    ``decode="compiled"`` compiles them one module at a time (:mod:`meda.kv.fast_decode`)."""
    attention_ids = {id(a) for a in attention.values()}
    layers = [m for m in model.modules() if any(id(c) in attention_ids for c in m.children())]
    return [c for layer in layers for c in layer.children() if id(c) not in attention_ids]


# module-level functions that attention forwards call by name to rotate queries and keys
ROTARY_FUNCTION_NAMES = ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb")


def rotary_functions(attention: dict[int, torch.nn.Module]) -> list[tuple[Any, str]]:
    """``(modeling module, name)`` of each rotary-embedding function that ``attention``'s forwards call by a
    global name (``apply_rotary_pos_emb``, Qwen2-VL's ``apply_multimodal_rotary_pos_emb``): pure functions of
    queries, keys, cos and sin that ``decode="compiled"`` swaps for a compiled copy while a step runs, since
    eager they cost ~10 small kernels per layer. Found through the forward's code (``co_names``), so a family
    whose attention rotates otherwise (or not at all) simply has none."""
    found: dict[tuple[str, str], tuple[Any, str]] = {}
    for module in attention.values():
        cls = type(module)
        namespace = sys.modules[cls.__module__]
        for name in ROTARY_FUNCTION_NAMES:
            if name in inspect.unwrap(cls.forward).__code__.co_names and callable(getattr(namespace, name, None)):
                found[(cls.__module__, name)] = (namespace, name)
    return list(found.values())


def _uses_attention_interface(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a causal self-attention that calls transformers' attention interface."""
    idx, scaling = getattr(module, "layer_idx", None), getattr(module, "scaling", None)
    if not isinstance(idx, int) or isinstance(idx, bool) or not isinstance(scaling, (int, float)):
        return False
    if not getattr(module, "is_causal", False) or getattr(module, "config", None) is None:
        return False
    return hasattr(sys.modules[type(module).__module__], "eager_attention_forward")


def decoder_layers(model: torch.nn.Module) -> DecoderLayers:
    """The decoder's attention layers by kind; ``NotImplementedError`` naming what is missing otherwise."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    name = f"{type(model).__name__} ({family(model)})"
    text = model.config.get_text_config(decoder=True)
    num_layers = int(text.num_hidden_layers)
    modules = attention_modules(model)
    if not modules:
        raise NotImplementedError(
            f"meda.kv cannot compress {name}: its text decoder has no causal self-attention layer that runs "
            "through transformers' attention interface (a layer_idx'd module with `scaling`, called through "
            "ALL_ATTENTION_FUNCTIONS), so it has no per-token key/value cache to compress"
        )
    missing = [i for i in range(num_layers) if i not in modules]
    if missing:
        raise NotImplementedError(
            f"meda.kv cannot compress {name}: decoder layers {_ranges(missing)} of {num_layers} have no "
            "self-attention through transformers' attention interface (recurrent, convolution or state-space "
            "layers keep a fixed-size state, not per-token keys/values)"
        )
    layers = DynamicCache(config=model.config).layers
    full, sliding, windows, other = [], [], set(), []
    for idx in modules:
        layer = layers[idx] if idx < len(layers) else DynamicLayer()
        if getattr(layer, "is_sliding", False) and isinstance(layer, DynamicLayer):
            sliding.append(idx)
            windows.add(int(layer.sliding_window))
        elif type(layer) is DynamicLayer:
            full.append(idx)
        else:
            other.append(f"{idx} ({type(layer).__name__})")
    if other:
        raise NotImplementedError(
            f"meda.kv cannot compress {name}: the cache of decoder layers {', '.join(other)} is not a plain "
            "per-token key/value layer (shared, indexed or linear-attention state)"
        )
    window = max(windows) if windows else None
    if not full:
        raise NotImplementedError(
            f"meda.kv has nothing to compress in {name}: all {num_layers} decoder layers use sliding-window "
            f"attention (window {window} tokens), whose cache is bounded already; meda.kv compresses "
            "full-attention layers"
        )
    return DecoderLayers(modules, tuple(full), tuple(sliding), window)


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_supported(model: Any) -> str:
    """Return the family of ``model``; raise ``NotImplementedError`` (naming the model class and the missing
    capability) when meda.kv cannot compress it."""
    decoder_layers(model)
    return family(model)


def attention_softcap(module: torch.nn.Module) -> float | None:
    """The attention-logit soft-cap of ``module`` (Gemma 2: ``logits = c * tanh(logits / c)``), or None."""
    cap = getattr(module, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return float(cap) if cap else None


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` (transformers 5.2x, which deprecates
    ``past_key_values`` for removal in 5.40) or ``past_key_values`` (5.17 and the other earlier 5.x)."""
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(cls: type) -> str:  # once per model class: callers ask at every decode step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either name (see :func:`cache_keyword`); None if it returned none."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
