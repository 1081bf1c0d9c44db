"""Fidelity of a compressed cache to the full cache on the same input.

The full cache first answers greedily (:func:`reference_run`); its tokens are the *continuation* and its
next-token distributions the reference. A compressed run (:func:`compressed_run`) then

1. prefills the prompt inside ``compress(...)`` (the cache is compressed when the prefill ends),
2. feeds the reference continuation teacher-forced, one token per step as decoding does (a multi-token
   forward would be a prompt chunk to the session): at every continuation position after the first (the
   first token is predicted from the prefill, before compression) it compares its next-token
   distribution ``q`` with the full cache's ``p``:
   ``token_agreement`` = share of positions whose argmax equals the full cache's token,
   ``kl`` = mean ``KL(p || q)`` in nats,
3. answers greedily itself (the prediction that is scored), reusing step 2: it agrees with the reference
   up to the first position whose argmax differs; from there it decodes on its own, from the compressed
   cache as it was at that position (:class:`CacheSnapshot`).

``greedy_prefix`` is the share of the reference's tokens that the compressed greedy answer reproduces
before its first difference (the figure ``benchmarks/kv_fidelity.py`` reported).

With ``query_tokens=N`` the prompt's last ``N`` tokens (the question) are fed only after the rest has been
prefilled and compressed, as one more prompt chunk over the compressed cache (question-agnostic
compression): then the first answer token too is predicted from the compressed cache, and it counts as a
compared position. Without it, an answer of one token (a count, a one-word answer) is the full cache's
whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meda.kv.compress import compress
from meda.kv.eval.inputs import eos_ids, sample_inputs
from meda.kv.support import cache_keyword, returned_cache


@dataclass
class Reference:
    """The full cache's greedy continuation.

    Attributes:
        tokens: ``LongTensor [T]`` greedy tokens (up to and including the first end-of-sequence token).
        log_probs: ``float32 [T, vocab]`` the full cache's next-token log-probabilities; row ``i``
            predicted ``tokens[i]``.
    """

    tokens: Tensor
    log_probs: Tensor


class CacheSnapshot:
    """The state of every layer of a dynamic cache, to roll it back after decoding more tokens.

    Works for cache layers whose ``update`` replaces its tensors by new ones (``torch.cat``), as
    :class:`transformers.cache_utils.DynamicLayer` and :class:`meda.kv.cache.CompressedLayer` do: the
    saved tensors are then never written to, and restoring is re-binding the layer's attributes.
    """

    def __init__(self, cache: Any):
        self.cache = cache
        self.states = [dict(vars(layer)) for layer in cache.layers]

    def restore(self) -> None:
        for layer, state in zip(self.cache.layers, self.states, strict=True):
            vars(layer).clear()
            vars(layer).update(state)


def _step(model: torch.nn.Module, tokens: Tensor, cache: Any) -> Tensor:
    """Feed ``tokens [1, q]`` on top of ``cache``; returns float32 log-probs ``[q, vocab]``."""
    out = model(input_ids=tokens, use_cache=True, **{cache_keyword(model): cache})
    return torch.log_softmax(out.logits[0].float(), dim=-1)


# inputs with one entry per prompt token ([batch, tokens]); the others (pixel values, image sizes) are per image
PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _prefill(model: torch.nn.Module, inputs: dict[str, Tensor], query_tokens: int = 0) -> tuple[Tensor, Any]:
    """Log-probs of the first answer token (float32 ``[vocab]``) and the cache after the prompt; with
    ``query_tokens`` the prompt's last ``query_tokens`` tokens go in a second forward over the cache the first
    one left (compressed by then, inside a ``compress`` block)."""
    if not query_tokens:
        out = model(**inputs, use_cache=True)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1), returned_cache(out)
    ids = inputs["input_ids"]
    if not 0 < query_tokens < ids.shape[1]:
        raise ValueError(f"query_tokens={query_tokens} must leave a prompt to compress ({ids.shape[1]} tokens)")
    cut = ids.shape[1] - query_tokens
    head = {k: (v[:, :cut] if k in PER_TOKEN_INPUTS else v) for k, v in inputs.items()}
    cache = returned_cache(model(**head, use_cache=True))
    return _step(model, ids[:, cut:], cache)[-1], cache


def _greedy(model, cache, first: Tensor, first_log_probs: Tensor, new_tokens: int, eos: set[int]):
    """Greedy decode from ``cache`` whose next token is ``first``; returns tokens and their log-prob rows."""
    tokens, rows = [first], [first_log_probs]
    while len(tokens) < new_tokens and int(tokens[-1]) not in eos:
        log_probs = _step(model, tokens[-1].view(1, 1), cache)[-1]
        rows.append(log_probs)
        tokens.append(log_probs.argmax())
    return torch.stack(tokens), torch.stack(rows)


def reference_run(model: torch.nn.Module, inputs: dict[str, Tensor], new_tokens: int, eos: set[int]) -> Reference:
    """Greedy answer of the full cache (no compression session) with its distributions."""
    log_probs, cache = _prefill(model, inputs)
    tokens, rows = _greedy(model, cache, log_probs.argmax(), log_probs, new_tokens, eos)
    return Reference(tokens=tokens, log_probs=rows)


def full_cache_answer(model: torch.nn.Module, processor: Any, sample: Any, new_tokens: int, device: Any) -> str:
    """The full cache's greedy answer to a task ``sample``, decoded and stripped as ``meda kv eval`` scores it
    (for diagnostics that need the answer alone: ``benchmarks/vlm_count_errors.py``, ``vlm_needle_errors.py``)."""
    return full_cache_reference(model, processor, sample, new_tokens, device)[0]


def full_cache_reference(
    model: torch.nn.Module, processor: Any, sample: Any, new_tokens: int, device: Any
) -> tuple[str, Reference]:
    """:func:`full_cache_answer` with the :class:`Reference` behind it (its tokens and their distributions)."""
    inputs = sample_inputs(processor, sample, device=device)
    with torch.inference_mode():
        ref = reference_run(model, inputs, new_tokens, eos_ids(model, processor))
    return getattr(processor, "tokenizer", processor).decode(ref.tokens, skip_special_tokens=True).strip(), ref


def compressed_run(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    reference: Reference,
    method: str,
    budget: float | int,
    new_tokens: int,
    eos: set[int],
    options: dict[str, object] | None = None,
    query_tokens: int = 0,
) -> dict[str, Any]:
    """One compressed generation (at most ``new_tokens``), its fidelity to ``reference`` and its report;
    ``query_tokens``: the prompt's last tokens fed after compression (module docstring).

    Returns:
        ``{"tokens": LongTensor [t], "token_agreement": float | None, "kl": float | None,
        "positions": int, "greedy_prefix": float, "report": dict}``; ``positions`` is how many
        continuation positions were compared (``None`` metrics when there were none).
    """
    ref = reference.tokens
    with compress(model, method=method, budget=budget, **(options or {})) as report:
        first_log_probs, cache = _prefill(model, inputs, query_tokens)
        branch = None  # (cache state, first differing token, its log-probs, position) at the first difference
        if int(first_log_probs.argmax()) != int(ref[0]):  # without query_tokens only numerically: uncompressed
            branch = (CacheSnapshot(cache), first_log_probs.argmax(), first_log_probs, 0)
        rows = [first_log_probs] if query_tokens else []  # the first token is compared when compression preceded it
        for i in range(1, len(ref)):  # one token per step: exactly what decoding does
            log_probs = _step(model, ref[i - 1].view(1, 1), cache)[-1]  # predicts ref[i]
            rows.append(log_probs)
            if branch is None and int(log_probs.argmax()) != int(ref[i]):
                branch = (CacheSnapshot(cache), log_probs.argmax(), log_probs, i)
        positions = len(rows)
        if positions:
            start = 0 if query_tokens else 1
            q, p = torch.stack(rows), reference.log_probs[start:]
            token_agreement = float((q.argmax(-1) == ref[start:]).float().mean())
            mean_kl = max(0.0, float((p.exp() * (p - q)).sum(-1).mean()))  # rounding leaves ~-1e-8 where p == q
        else:
            token_agreement = mean_kl = None
        if branch is None:
            tokens, split = ref, len(ref)
        else:
            snapshot, token, log_probs, split = branch
            snapshot.restore()
            rest, _ = _greedy(model, cache, token, log_probs, new_tokens - split, eos)
            tokens = torch.cat([ref[:split], rest])
    return {
        "tokens": tokens,
        "token_agreement": token_agreement,
        "kl": mean_kl,
        "positions": positions,
        "greedy_prefix": split / len(ref) if len(ref) else 1.0,
        "report": report.to_dict(),
    }
