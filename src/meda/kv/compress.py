"""The public entry point: ``with compress(model, method=..., budget=...) as report:``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from meda.kv.recipes import resolve_recipe
from meda.kv.report import CompressionReport

if TYPE_CHECKING:  # torch and transformers load when compress() first runs, so `meda --help` stays quick
    import torch


@contextmanager
def compress(
    model: torch.nn.Module,
    method: str = "meda",
    budget: float | int = 0.2,
    *,
    groups: torch.Tensor | None = None,
    question_tokens: int | None = None,
    decode: str = "dynamic",
    decode_room: int = 128,
    **options: object,
) -> Iterator[CompressionReport]:
    """Compress the KV cache of every prefill run on ``model`` inside the block.

    Args:
        model: a transformers causal LM or vision-language model loaded with
            ``attn_implementation`` "sdpa" or "eager".
        method: one of ``full, streamingllm, h2o, snapkv, pyramidkv, lookm, adakv, meda``.
        budget: a float in (0, 1], the mean kept fraction of the prefill over layers,
            or an int >= 2, the mean kept tokens per layer.
        groups: optional bool ``[batch, tokens]`` marking the second token group of the
            entropy (vision or context) when the model's ids cannot tell.
        question_tokens: for text-only prompts, how many final tokens form the
            "question" group (default: the recipe's window, 32).
        decode: ``"dynamic"`` (transformers' own decode loop over the compressed cache) or
            ``"static"``: the fast path, static per-layer buffers written in place and, on CUDA,
            each decode step replayed from a captured CUDA graph (:mod:`meda.kv.fast_decode`).
            Both give the same greedy tokens; ``"static"`` decodes one token per step (no
            assisted decoding, no continued prompts) and also applies to method ``full``.
            ``"compiled"`` is ``"static"`` with the decoder layers' norms, MLPs and rotary embedding
            compiled by ``torch.compile`` inside the captured step (one compile per module class and
            one for the rotary function, whatever the depth; falls back to the uncompiled step, with a
            report note, on any compile error). It is meant for CUDA, where the step is a captured
            graph; on the CPU it is slower than ``"static"``.
        decode_room: with ``decode="static"``, decode slots reserved per layer after the kept
            prefill; the buffers double when a generation runs past them (one re-capture).
            Attention reads every reserved slot, so keep it near ``max_new_tokens``.
        **options: fields of :class:`meda.kv.recipes.Recipe` to override, e.g.
            ``tau=0.5``, ``merge="pivot"``, ``scorer="window"``.

    Yields:
        A :class:`CompressionReport`, filled in after each compressed prefill.

    Example:
        >>> with compress(model, method="meda", budget=0.2) as report:
        ...     out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        >>> report.kv_bytes_after / report.kv_bytes_before
    """
    recipe = resolve_recipe(method, **options)
    from meda.kv import attention
    from meda.kv.session import CompressionSession

    attention.register()
    session = CompressionSession(
        model,
        method,
        recipe,
        budget,
        groups=groups,
        question_tokens=question_tokens,
        decode=decode,
        decode_room=decode_room,
    )
    try:  # attach undoes itself on error; detach restores the model on any exit, errors included
        session.attach()
        yield session.report
    finally:
        session.detach()
