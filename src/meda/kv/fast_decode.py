"""The fast decode step: ``generate``'s per-token forward over static cache layers, as a CUDA graph.

``compress(model, ..., decode="static")`` puts a :class:`StaticDecoder` in front of the model's
``forward``. A call that is one decode step over a cache whose layers are all
:class:`~meda.kv.static_cache.StaticLayer` runs like this:

1. the growing 2-D ``attention_mask`` is dropped (each static layer carries its own key bias),
   token-type ids passed at full length are cut to the step's token; every other tensor argument
   (``input_ids``, ``position_ids``, ...) has the same shape at every step and is copied into a
   static input buffer;
2. on CUDA, the first such step runs eagerly (on a side stream: the warm-up), then the step is
   captured once in a CUDA graph; every later step copies its inputs and replays the graph
   (gpt-fast's recipe, without ``torch.compile``);
3. on the CPU, or when capture fails (a warning says why), the same step runs eagerly.

The first such step of a cache prefilled inside the block first moves it into static layers
(:meth:`meda.kv.session.CompressionSession.prepare_static`): until then prompt chunks may still be
appended to the compressed cache. Positions come from ``generate`` itself (it passes
``position_ids`` for every supported family, M-RoPE included), so the model never derives them
inside the step; a step without them runs eagerly. Everything else (prefill, steps over dynamic
caches, multi-token steps) goes straight to the model's own ``forward``.
"""

from __future__ import annotations

import functools
import statistics
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from meda.kv.static_cache import StaticLayer, ensure_room, static_layers

CACHE_KWARGS = ("cache", "past_key_values")
DROPPED_KWARGS = ("attention_mask",)
# per-token inputs that some transformers versions pass at full sequence length on every step (5.17 does
# for mm_token_type_ids); cut to the step's tokens, as later versions do themselves
PER_TOKEN_KWARGS = ("mm_token_type_ids", "token_type_ids")


def step_cache(kwargs: dict[str, Any]):
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _signature(kwargs: dict[str, Any]) -> tuple | None:
    """What a captured graph depends on: tensor shapes/dtypes/devices and plain values; None if uncapturable."""
    sig = []
    for name, value in sorted(kwargs.items()):
        if name in CACHE_KWARGS:
            continue
        if torch.is_tensor(value):
            sig.append((name, tuple(value.shape), value.dtype, str(value.device)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            sig.append((name, value))
        else:
            return None
    return tuple(sig)


class OutputTemplate:
    """The captured step's output without a reference to its cache (a finished generation's cache must be
    freed even while the graph lives); :meth:`fill` builds each step's output around the live cache."""

    def __init__(self, kind: type, fields: dict[str, Any], cache_fields: list[str]):
        self.kind, self.fields, self.cache_fields = kind, fields, cache_fields

    @classmethod
    def of(cls, output, cache) -> OutputTemplate:
        fields = {k: v for k, v in output.items() if v is not cache}
        return cls(type(output), fields, [k for k, v in output.items() if v is cache])

    def fill(self, cache):
        """The step's output: logits copied out of the graph's buffer (the next replay overwrites it)."""
        fields = {**self.fields, **dict.fromkeys(self.cache_fields, cache), "logits": self.fields["logits"].clone()}
        return self.kind(**fields)


class StaticDecoder:
    """Replaces ``model.forward`` inside a ``decode="static"`` session (see the module docstring).

    Attributes:
        use_graph: capture and replay CUDA graphs (on CUDA only; False runs every step eagerly).
        counts: ``{"graph": steps replayed, "eager": static steps run eagerly, "captures": n}``.
        notes: what the report should say (capture failures, steps that could not be captured).
        timing: record CUDA events around each replay (``replay_ms`` gives their median).
    """

    def __init__(self, forward: Callable, *, prepare: Callable | None = None, use_graph: bool = True):
        """``forward``: the model's own; ``prepare(cache, attention_mask) -> bool`` moves a prefilled cache into
        static layers at its first one-token step (the session's :meth:`prepare_static`)."""
        self.forward = forward
        self.prepare = prepare
        self.use_graph = use_graph
        self.counts = {"graph": 0, "eager": 0, "captures": 0}
        self.notes: list[str] = []
        self.timing = False
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._drop_graph()
        functools.update_wrapper(self, forward)  # generate inspects forward's signature

    def _drop_graph(self) -> None:
        self._graph = None
        self._sig: tuple | None = None
        self._cache_ref = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._output = None

    def __call__(self, *args, **kwargs):
        cache = step_cache(kwargs)
        layers = static_layers(cache)
        ids = kwargs.get("input_ids")
        one_token = not args and ids is not None and ids.shape[-1] == 1 and kwargs.get("inputs_embeds") is None
        prefilled = layers is None and one_token and cache is not None and self.prepare is not None
        if prefilled and self.prepare(cache, kwargs.get("attention_mask")):  # first decoded token of a prefill
            layers = static_layers(cache)
        if not one_token or layers is None:
            if layers is None and any(isinstance(x, StaticLayer) for x in getattr(cache, "layers", ())):
                self._note(
                    "some cache layers (sliding-window) keep dynamic caches: decode steps ran uncaptured through "
                    "the model's forward (static buffers for the full-attention layers only)"
                )
            return self.forward(*args, **kwargs)  # prefill, dynamic caches, multi-token steps
        step = {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS}
        for name in PER_TOKEN_KWARGS:
            if torch.is_tensor(step.get(name)) and step[name].shape[-1] != ids.shape[-1]:
                step[name] = step[name][..., -ids.shape[-1] :]
        if ensure_room(layers):
            self._drop_graph()  # buffers moved
        sig = _signature(step)
        if self._graph is not None and sig == self._sig and self._cache_ref() is cache:
            return self._replay(step, layers)
        self._drop_graph()
        capture = self._can_capture(ids, sig, step)
        out = self._eager(step, on_side_stream=capture)
        if capture:
            self._capture(step, sig, cache, layers)
        return out

    # ---- eager step and capture ----------------------------------------------------------
    def _can_capture(self, ids: torch.Tensor, sig: tuple | None, step: dict[str, Any]) -> bool:
        if not (self.use_graph and ids.is_cuda):
            return False
        if sig is None or not torch.is_tensor(step.get("position_ids")):
            self._note("a decode step had no position_ids (or an argument a graph cannot hold); it ran uncaptured")
            return False
        if step.get("output_attentions") or step.get("output_hidden_states"):
            self._note("output_attentions / output_hidden_states asked for: decode steps ran uncaptured")
            return False
        return True

    def _eager(self, step: dict[str, Any], *, on_side_stream: bool):
        self.counts["eager"] += 1
        if not on_side_stream:
            return self.forward(**step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.forward(**step)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, step: dict[str, Any], sig: tuple, cache, layers: list[StaticLayer]) -> None:
        ensure_room(layers)  # the captured step writes one slot; room for it must exist now
        inputs = {k: v.clone() for k, v in step.items() if torch.is_tensor(v)}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.forward(**{**step, **inputs})
        except Exception as err:  # a host sync or an unsupported op inside the step
            self.use_graph = False
            message = f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); decoding "
            message += "continues uncaptured over the static cache (slower, same tokens)"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._note(message)
            torch.cuda.synchronize()
            return
        self._graph, self._sig, self._cache_ref = graph, sig, weakref.ref(cache)
        self._inputs, self._output = inputs, OutputTemplate.of(output, cache)
        self.counts["captures"] += 1

    def _replay(self, step: dict[str, Any], layers: list[StaticLayer]):
        if self.timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for name, buf in self._inputs.items():
            buf.copy_(step[name], non_blocking=True)
        self._graph.replay()
        if self.timing:
            end.record()
            self._events.append((start, end))
        for layer in layers:
            layer.advance()
        self.counts["graph"] += 1
        return self._output.fill(step_cache(step))

    def replay_ms(self) -> float | None:
        """Median GPU time of one replayed step (inputs copied + graph), when ``timing`` was on."""
        if not self._events:
            return None
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in self._events)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
