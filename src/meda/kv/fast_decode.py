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
   (gpt-fast's recipe);
3. with ``compile=True`` (``compress(..., decode="compiled")``) the decoder layers' pure sub-blocks (norms,
   MLPs: :func:`meda.kv.support.decoder_sub_blocks`) and the attention's rotary embedding
   (:func:`meda.kv.support.rotary_functions`) run compiled by ``torch.compile`` inside the step
   (:class:`CompiledSubBlocks`; inductor fuses each norm, the MLP's activation and the rotation of queries
   and keys into few kernels) and
   that step is what the graph captures, after two warm-up steps; the attention and the cache writes stay
   as in ``static``. A compile or capture error falls back to the uncompiled step (a warning and a report
   note say so);
4. on the CPU, or when capture fails (a warning says why), the same step runs eagerly (compiled or not).

The step reads no host state: the static layers' counters are kept here (room checked before a step,
counters advanced after it), and the attention finds its layer through :attr:`StaticDecoder.step_layers`
(a plain list, which ``torch.compile`` traces without a graph break).

The first such step of a cache prefilled inside the block first moves it into static layers
(:meth:`meda.kv.session.CompressionSession.prepare_static`): until then prompt chunks may still be
appended to the compressed cache. Positions come from ``generate`` itself (it passes
``position_ids`` for every supported family, M-RoPE included), so the model never derives them
inside the step; a step without them runs eagerly. Everything else (prefill, steps over dynamic
caches, multi-token steps) goes straight to the model's own ``forward``.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from meda.cuda_graphs import capture
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


def _no_recompile(compiled: bool):
    """While capturing a compiled step: a recompile (which would compile and autotune inside the capture)
    raises instead."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("fail_on_recompile")
    return contextlib.nullcontext()


class CompiledSubBlocks:
    """The decoder layers' pure sub-blocks, run through ``torch.compile`` while a decode step runs.

    One compiled function per module class, shared by every layer: dynamo takes the module as an input and
    guards on its parameters' shapes, not on its identity, so a model of any depth compiles about one
    layer's sub-blocks (``benchmarks/kv_compile_time.py`` on the CPU: 14.4 s at 4 layers, 12.9 s at 28, where
    compiling the whole step took 28.6 s and 80.7 s). The compiled forwards are instance attributes
    set for the step only (:meth:`installed`): the prefill and everything else run the model's own modules.
    A sub-block that already has an instance ``forward`` (accelerate's device hooks) is left uncompiled.

    ``functions`` are ``(modeling module, name)`` of module-level functions the attention calls by name (the
    rotary embedding: :func:`meda.kv.support.rotary_functions`): for the step only, that name in that module
    is a compiled copy (one graph for all layers), and the original is put back after the step. While a
    compiled step runs, any model of the same family in the process sees the compiled copy (same results).
    """

    def __init__(self, modules: list[torch.nn.Module], functions: list[tuple[Any, str]] | None = None):
        self.modules = [m for m in modules if "forward" not in vars(m)]
        self.left_uncompiled = len(modules) - len(self.modules)
        self.functions = list(functions or [])
        self._by_class: dict[type, Callable] = {}
        self._by_function: dict[tuple[str, str], Callable] = {}

    @property
    def compiled_classes(self) -> list[str]:
        """Names of the module classes and functions compiled so far (one compiled graph set each)."""
        return sorted([cls.__name__ for cls in self._by_class] + [name for _, name in self._by_function])

    @contextlib.contextmanager
    def installed(self, backend: str | Callable, mode: str):
        """Within the block each sub-block's ``forward`` is its class's compiled forward and each of
        ``functions`` is its compiled copy."""
        options = {"mode": mode} if backend == "inductor" else {}
        for module in self.modules:
            cls = type(module)
            if cls not in self._by_class:
                self._by_class[cls] = torch.compile(cls.forward, backend=backend, **options)
            module.forward = functools.partial(self._by_class[cls], module)
        originals = [(namespace, name, getattr(namespace, name)) for namespace, name in self.functions]
        for namespace, name, original in originals:
            key = (namespace.__name__, name)
            if key not in self._by_function:
                self._by_function[key] = torch.compile(original, backend=backend, **options)
            setattr(namespace, name, self._by_function[key])
        try:
            yield
        finally:
            for namespace, name, original in originals:
                setattr(namespace, name, original)
            for module in self.modules:
                vars(module).pop("forward", None)


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
        compile: run (and capture) the step with ``sub_blocks`` compiled by ``torch.compile``
            (``compile_backend``, default inductor, in ``compile_mode``; tests trace with the "eager" backend).
        counts: ``{"graph": steps replayed, "eager": static steps run outside a graph, "compiled": those of
            them run compiled, "captures": n}``.
        notes: what the report should say (capture or compile failures, steps that could not be captured).
        timing: record CUDA events around each replay (``replay_ms`` gives their median).
        step_layers: the cache's static layers while this decoder runs a step, else None.
    """

    def __init__(
        self,
        forward: Callable,
        *,
        prepare: Callable | None = None,
        use_graph: bool = True,
        compile: bool = False,
        sub_blocks: list[torch.nn.Module] | None = None,
        functions: list[tuple[Any, str]] | None = None,
        compile_mode: str = "default",
        compile_backend: str | Callable = "inductor",
    ):
        """``forward``: the model's own; ``prepare(cache, attention_mask) -> bool`` moves a prefilled cache into
        static layers at its first one-token step (the session's :meth:`prepare_static`); ``sub_blocks``: the
        modules that ``compile`` compiles (:func:`meda.kv.support.decoder_sub_blocks`); ``functions``: the
        module-level functions it compiles (:func:`meda.kv.support.rotary_functions`)."""
        self.forward = forward
        self.prepare = prepare
        self.use_graph = use_graph
        self.compile, self.compile_mode, self.compile_backend = compile, compile_mode, compile_backend
        self.sub_blocks = CompiledSubBlocks(sub_blocks or [], functions)
        self.counts = {"graph": 0, "eager": 0, "compiled": 0, "captures": 0}
        self.notes: list[str] = []
        self.timing = False
        self.step_layers: list[StaticLayer] | None = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if compile and self.sub_blocks.left_uncompiled:
            self._note(
                f"{self.sub_blocks.left_uncompiled} decoder sub-blocks have their own forward wrapper (device "
                "hooks) and run uncompiled"
            )
        self._drop_graph()
        functools.update_wrapper(self, forward)  # generate inspects forward's signature

    def _drop_graph(self) -> None:
        self._graph = None
        self._sig: tuple | None = None
        self._cache_ref = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._output = None
        self._warm: tuple[tuple | None, int, int] = (None, 0, 0)  # (signature, id(cache), warm-up steps run)

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
        for layer in layers:
            layer.self_counting = False  # this decoder keeps the books (the step reads no host state)
        if ensure_room(layers):
            self._drop_graph()  # buffers moved
        sig = _signature(step)
        if self._graph is not None and sig == self._sig and self._cache_ref() is cache:
            return self._replay(step, layers)
        if self._graph is not None:
            self._drop_graph()
        capture = self._can_capture(ids, sig, step)
        out = self._eager(step, layers, on_side_stream=capture)
        if capture and self._warmed_up(sig, cache):
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

    def _warmed_up(self, sig: tuple, cache) -> bool:
        """Count a warm-up step of this signature and cache; True once enough ran to capture (a compiled
        sub-block's first two calls may compile twice: static shapes, then dynamic ones)."""
        last_sig, last_cache, n = self._warm
        n = n + 1 if (last_sig, last_cache) == (sig, id(cache)) else 1
        self._warm = (sig, id(cache), n)
        return n >= (2 if self.compile else 1)

    def _eager(self, step: dict[str, Any], layers: list[StaticLayer], *, on_side_stream: bool):
        """One step outside a graph (compiled when asked; a compile error reruns it uncompiled)."""
        slots = [layer.slot.clone() for layer in layers] if self.compile else None
        try:
            out = self._run(step, layers, on_side_stream, compiled=self.compile)
        except Exception as err:
            if not self.compile:
                raise
            for layer, slot in zip(layers, slots, strict=True):  # undo the writes of a partly run step
                layer.slot.copy_(slot)
            self._compile_failed("torch.compile of the decode step", err)
            out = self._run(step, layers, on_side_stream, compiled=False)
        self.counts["eager"] += 1
        self.counts["compiled"] += int(self.compile)
        for layer in layers:
            layer.advance()
        return out

    def _run(self, step: dict[str, Any], layers: list[StaticLayer], on_side_stream: bool, *, compiled: bool):
        self.step_layers = layers
        compiling = self.sub_blocks.installed(self.compile_backend, self.compile_mode) if compiled else None
        try:
            with compiling or contextlib.nullcontext():
                if not on_side_stream:
                    return self.forward(**step)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.forward(**step)
                torch.cuda.current_stream().wait_stream(side)
                return out
        finally:
            self.step_layers = None

    def _compile_failed(self, what: str, err: Exception) -> None:
        self.compile = False
        message = f"{what} failed ({type(err).__name__}: {str(err)[:300]}); decoding continues with the "
        message += "uncompiled step (captured as a CUDA graph where possible; same tokens, slower)"
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self._note(message)

    def _capture(self, step: dict[str, Any], sig: tuple, cache, layers: list[StaticLayer]) -> None:
        ensure_room(layers)  # the captured step writes one slot; room for it must exist now
        inputs = {k: v.clone() for k, v in step.items() if torch.is_tensor(v)}
        graph = torch.cuda.CUDAGraph()
        compiled = self.compile
        try:
            with _no_recompile(compiled), capture(graph):
                output = self._run({**step, **inputs}, layers, on_side_stream=False, compiled=compiled)
        except Exception as err:  # a host sync, an unsupported op, or a recompile inside the step
            torch.cuda.synchronize()
            if compiled:  # capture the uncompiled step at the next warm-up instead
                self._compile_failed("CUDA graph capture of the compiled decode step", err)
                self._drop_graph()
                return
            self.use_graph = False
            message = f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); decoding "
            message += "continues uncaptured over the static cache (slower, same tokens)"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._note(message)
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
