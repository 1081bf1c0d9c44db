"""A compression session: watch one prefill, then compress its cache before decoding.

Lifecycle per ``generate`` call (or any forward that starts from an empty cache):

1. forward pre-hook on the model: remember ``input_ids`` / ``attention_mask`` /
   ``mm_token_type_ids`` to derive token groups;
2. each decoder attention call of the prefill (``on_attention``): score keys and, for
   MEDA, measure the layer's cross-modal entropy from the post-RoPE queries and keys;
3. forward hook: once every layer has been seen, allocate per-layer budgets, select,
   merge, and replace each cache layer by a :class:`CompressedLayer`;
4. decode steps: ``on_attention`` returns the compressed layer's own mask.
"""

from __future__ import annotations

import math
import weakref

import torch

from meda.kv import allocation, entropy, merging, scoring, selection, sparsity
from meda.kv.attention import SESSION_ATTR, SESSION_MASKS_ITSELF, wrapped_name
from meda.kv.cache import CompressedLayer, attention_mask_for, cache_bytes
from meda.kv.chunked import ChunkedPrefill
from meda.kv.fast_decode import StaticDecoder
from meda.kv.groups import TokenGroups, token_groups, vision_token_ids
from meda.kv.recipes import Recipe
from meda.kv.report import CompressionReport
from meda.kv.static_cache import StaticLayer
from meda.kv.support import (
    attention_softcap,
    decoder_layers,
    decoder_sub_blocks,
    returned_cache,
    rotary_functions,
)

SUPPORTED_ATTENTION = ("sdpa", "eager")
DECODE_MODES = ("dynamic", "static", "compiled")  # "compiled": static, norms, MLPs, rotary compiled
_MISSING = object()


def decoder_attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer_idx: attention module}`` of the text decoder (vision towers excluded); decided by capability
    (:mod:`meda.kv.support`), ``NotImplementedError`` naming the model and what it lacks otherwise."""
    return decoder_layers(model).modules


def parse_budget(budget: float | int) -> float | int:
    """Validate ``budget``: a float in (0, 1] (kept fraction) or an int >= 2 (kept tokens per layer; 1 is refused
    because it is nearly always meant as 1.0)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1] or an int >= 2, got {budget!r}")
    if isinstance(budget, float):
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise ValueError(
                f"budget={budget} is not a kept fraction in (0, 1]; pass e.g. 0.2 for 20% of the prefill, "
                "or an int for kept tokens per layer"
            )
    elif budget < 2:
        raise ValueError(
            f"budget={budget} (an int) would keep {max(budget, 0)} token(s) per layer: for a kept fraction pass a "
            "float such as 0.2, or 1.0 for the full cache; for a token count pass 2 or more"
        )
    return budget


class CompressionSession:
    """Hooks one model for the duration of a ``compress(...)`` block."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        recipe: Recipe | None,
        budget: float | int,
        *,
        groups: torch.Tensor | None = None,
        question_tokens: int | None = None,
        decode: str = "dynamic",
        decode_room: int = 128,
    ):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}; 'static' is the fast decode path")
        if isinstance(decode_room, bool) or not isinstance(decode_room, int) or decode_room < 1:
            raise ValueError(f"decode_room must be an int >= 1 (decode slots before buffers grow), got {decode_room!r}")
        self.decode, self.decode_room = decode, decode_room
        self.decoder: StaticDecoder | None = None
        self._saved_forward = _MISSING
        self._static_target = None  # weakref to the cache prefilled in this block, moved to static buffers at decode
        self.layers = decoder_layers(model)  # raises for models meda.kv cannot compress
        self.model = model
        self.recipe = recipe
        self.budget = parse_budget(budget)
        self.caller_groups = groups
        self.question_tokens = question_tokens or (recipe.window if recipe else 32)
        self.report = CompressionReport(method=method, budget=budget)
        self.modules = self.layers.modules
        self.vision_ids = vision_token_ids(model.config)
        self._configs = _unique_configs(model, self.modules.values())
        self._saved_impl: dict[int, str] = {}
        self._handles: list = []
        # the layers of the last compressed cache, weakly: a finished generation's cache is freed as usual
        self._cache_layers: weakref.WeakValueDictionary[int, CompressedLayer] = weakref.WeakValueDictionary()
        self._chunks: ChunkedPrefill | None = None  # running statistics of a prompt compressed chunk by chunk
        self._reset_forward()

    # ---- attach / detach -------------------------------------------------------------
    def attach(self) -> None:
        """Hook the model; on any error the model is left exactly as it was."""
        try:
            self._attach()
        except BaseException:
            self.detach()
            raise

    def _attach(self) -> None:
        if any(getattr(m, SESSION_ATTR, None) is not None for m in self.modules.values()):
            raise RuntimeError("this model is already inside a meda.kv.compress(...) block")
        bases = {}
        for cfg in self._configs:  # check everything before changing anything
            impl = cfg._attn_implementation
            base = impl.removeprefix("meda_") if impl else impl
            if base not in SUPPORTED_ATTENTION:
                raise NotImplementedError(
                    f"meda.kv runs with attn_implementation 'sdpa' or 'eager'; this model uses {impl!r}. "
                    "Load it with attn_implementation='sdpa'."
                )
            bases[id(cfg)] = (cfg, impl, base)
        for cfg, impl, base in bases.values():
            self._saved_impl[id(cfg)] = impl
            _set_attn_implementation(self.model, cfg, wrapped_name(base))
        for module in self.modules.values():
            setattr(module, SESSION_ATTR, self)
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))
        if self.decode != "dynamic":  # generate calls model(...) -> model.forward: the instance attribute wins
            self._saved_forward = self.model.__dict__.get("forward", _MISSING)
            compiled = self.decode == "compiled"
            sub_blocks = decoder_sub_blocks(self.model, self.modules) if compiled else None
            functions = rotary_functions(self.modules) if compiled else None
            self.decoder = StaticDecoder(
                self.model.forward,
                prepare=self.prepare_static,
                compile=compiled,
                sub_blocks=sub_blocks,
                functions=functions,
            )
            self.model.forward = self.decoder

    def detach(self) -> None:
        """Undo whatever :meth:`attach` did (also a partial attach); safe to call twice."""
        if self.decoder is not None and self.model.__dict__.get("forward") is self.decoder:
            if self._saved_forward is _MISSING:
                del self.model.forward
            else:
                self.model.forward = self._saved_forward
            self.report.notes.extend(n for n in self.decoder.notes if n not in self.report.notes)
        SESSION_MASKS_ITSELF.set(False)
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self.modules.values():
            if getattr(module, SESSION_ATTR, None) is self:
                delattr(module, SESSION_ATTR)
        for cfg in self._configs:
            if id(cfg) in self._saved_impl:
                _set_attn_implementation(self.model, cfg, self._saved_impl.pop(id(cfg)), restoring=True)

    # ---- hooks -----------------------------------------------------------------------
    def _reset_forward(self) -> None:
        self._inputs: dict = {}
        self._groups: TokenGroups | None = None
        self._scores: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, torch.Tensor] = {}
        self._density: dict[int, torch.Tensor] = {}  # VL-Cache's post-vision attention density per layer
        self._prefill_seen = False
        self._selections: dict[int, selection.Selection] = {}  # per compressed layer, for ChunkedPrefill
        self._continued: tuple | None = None  # a prompt chunk on a non-empty cache: ("ours",) or ("foreign", q, past)

    def _before_forward(self, module, args, kwargs):
        self._reset_forward()
        if self._chunks is not None:
            self._chunks.begin_forward()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs = {
            "input_ids": input_ids,
            "attention_mask": kwargs.get("attention_mask"),
            "mm_token_type_ids": kwargs.get("mm_token_type_ids"),
        }
        new = kwargs.get("inputs_embeds") if input_ids is None else input_ids
        chunk = new is not None and new.shape[1] > 1
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        SESSION_MASKS_ITSELF.set(chunk and self._masks_every_full_layer(cache))

    def _masks_every_full_layer(self, cache) -> bool:
        """Whether every full-attention layer of ``cache`` is one of this session's compressed layers: its attention
        then gets the session's own mask (see :func:`attention_mask_for`), never transformers'."""
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != len(self.modules):
            return False
        return all(self._cache_layers.get(i) is layers[i] for i in range(len(layers)) if i not in self.layers.sliding)

    def _after_forward(self, module, args, kwargs, output):
        SESSION_MASKS_ITSELF.set(False)
        if not self._prefill_seen and self._continued is None:
            return output
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            cache = returned_cache(output)
        if self._continued is not None:
            self._after_continued(cache)
            self._reset_forward()
            return output
        if cache is None:
            self.report.notes.append("forward ran without a cache (use_cache=False): nothing to compress")
            return output
        missing = sorted(set(self.layers.full) - set(self._scores)) if self.recipe else []
        if missing:
            raise RuntimeError(f"prefill statistics missing for layers {missing}; was the forward interrupted?")
        self._compress(cache)
        self._chunks = ChunkedPrefill(self, self._selections) if self.recipe is not None else None
        self._reset_forward()
        return output

    def _after_continued(self, cache) -> None:
        """After a prompt chunk on a non-empty cache: trim this session's compressed cache back to its
        running budgets (:mod:`meda.kv.chunked`), or say in the report why the chunk stays uncompressed."""
        rep = self.report
        if self._continued[0] == "ours":
            self._chunks.trim(self, cache)
        elif self.recipe is None:  # method "full": count what the cache now holds
            rep.prefill_tokens = cache.get_seq_length() if cache is not None else 0
            rep.layer_tokens = [rep.prefill_tokens] * len(self.modules)
            rep.kv_bytes_before = rep.kv_bytes_after = cache_bytes(cache) if cache is not None else 0
        else:
            _, q_len, past = self._continued
            rep.notes.append(
                f"a prompt of {q_len} tokens continued a cache of {past} tokens that this compress block did not "
                "compress: left uncompressed (meda.kv compresses caches it built; run the first prompt inside the "
                "same compress(...) block)"
            )

    def on_attention(self, module, query: torch.Tensor, key: torch.Tensor, mask, *, additive: bool):
        """Called by the attention wrapper; returns the mask the stock attention should use.

        query ``[batch, q_heads, q, head_dim]``, key ``[batch, kv_heads, stored, head_dim]``.
        """
        idx = module.layer_idx
        q_len, k_len = query.shape[-2], key.shape[-2]
        layer = self._cache_layers.get(idx)
        if layer is not None and layer.keys is key:
            if q_len > 1 and self._chunks is not None:  # a prompt chunk appended to this session's compressed cache
                self._continued = ("ours",)
                return self._chunks.observe(self, module, layer, query, key, additive)
            n_rep = query.shape[1] // key.shape[1]
            return attention_mask_for(layer, q_len, n_rep, query.dtype, additive)
        if q_len == k_len and q_len > 1:  # a prefill from an empty cache
            self._prefill_seen = True
            if self.recipe is not None:
                self._observe(idx, module, query, key)
        elif q_len > 1 and idx not in self.layers.sliding and self._continued is None:
            self._continued = ("foreign", q_len, k_len - q_len)  # a prompt continued on a cache we did not build
        return mask

    def static_layer_for(self, module, key: torch.Tensor) -> StaticLayer | None:
        """The static cache layer whose buffers ``key`` is (a decode step with ``decode="static"``), else None."""
        step = self.decoder.step_layers if self.decoder is not None else None
        if step is not None:  # inside the decoder's own step every layer is static (a plain list: compile traces it)
            return step[module.layer_idx]
        layer = self._cache_layers.get(module.layer_idx)
        return layer if isinstance(layer, StaticLayer) and layer.keys is key else None

    # ---- prefill statistics ------------------------------------------------------------
    def _groups_for(self, query: torch.Tensor) -> TokenGroups:
        if self._groups is None:
            b, n = query.shape[0], query.shape[-2]
            self._groups = token_groups(
                input_ids=self._inputs.get("input_ids"),
                attention_mask=self._inputs.get("attention_mask"),
                shape=(b, n),
                device=query.device,
                vision_ids=self.vision_ids,
                question_tokens=self.question_tokens,
                mm_token_type_ids=self._inputs.get("mm_token_type_ids"),
                caller_mask=self.caller_groups,
            )
            shortest = int(self._groups.valid.sum(-1).min())
            r = self.recipe
            if r is not None and r.scorer == "window" and shortest < r.window:
                raise ValueError(
                    f"the prompt has {shortest} tokens, fewer than the observation window ({r.window}) of "
                    f"method {self.report.method!r}; pass window={shortest} (CLI: -o window={shortest}) "
                    "or a longer prompt"
                )
        return self._groups

    def _observe(self, idx: int, module, query: torch.Tensor, key: torch.Tensor) -> None:
        r = self.recipe
        groups = self._groups_for(query).on(query.device)  # a model split across devices: this layer's
        if idx in self.layers.sliding:  # left with its own window cache: no statistics needed
            return
        logits = {"scaling": float(module.scaling), "softcap": attention_softcap(module)}
        if r.scorer == "cumulative":
            s = scoring.cumulative_attention_scores(
                query, key, groups.valid, **logits, query_subset=_evenly_spaced(query, r.score_queries)
            )
        elif r.scorer == "window":
            s = scoring.window_attention_scores(
                query, key, groups.valid, **logits, window=r.window, pool_kernel=r.pool_kernel
            )
        else:  # recency: later tokens score higher
            pos = torch.arange(key.shape[-2], device=key.device, dtype=torch.float32)
            s = pos.expand(key.shape[0], key.shape[1], -1).masked_fill(~groups.valid[:, None, :], -math.inf)
        self._scores[idx] = s
        if r.measures_entropy(groups.source):
            self._entropy[idx] = entropy.cross_modal_entropy(
                query,
                key,
                groups.vision,
                groups.valid,
                **logits,
                query_subset=_evenly_spaced(query, r.entropy_queries),
            )
        if r.allocator_for(groups.source) == "density":  # as the entropy: only where the allocator reads it
            self._density[idx] = sparsity.post_vision_density(query, key, groups.vision, groups.valid, **logits)

    # ---- compression -------------------------------------------------------------------
    def _compress(self, cache) -> None:
        rep = self.report
        self._static_target = weakref.ref(cache) if self.decode != "dynamic" else None
        rep.kv_bytes_before = cache_bytes(cache)
        rep.compressions += 1
        rep.sliding_layers, rep.sliding_window = list(self.layers.sliding), self.layers.window
        if self.recipe is None:  # method "full": measure only
            rep.kv_bytes_after = rep.kv_bytes_before
            first = cache.layers[self.layers.full[0]]
            mask = self._inputs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                valid = mask.to(device=first.keys.device, dtype=torch.bool)
            else:
                valid = first.keys.new_ones(first.keys.shape[0], first.keys.shape[-2], dtype=torch.bool)
            n = valid.sum(-1)
            rep.prefill_tokens = round(float(n.float().mean()))
            held = {i: _held_tokens(cache.layers[i], valid) for i in self.modules}
            rep.layer_tokens = [round(float(held[i].float().mean())) for i in self.modules]
            rep.layer_fractions = [float((held[i] / n.clamp_min(1)).mean()) for i in self.modules]
            return
        groups = self._groups
        n = groups.valid.sum(-1)  # [B]
        layers = list(self.layers.full)
        rep.compressed_layers = layers
        rep.groups, rep.notes = groups.source, [groups.note] if groups.note else []
        fractions, clipped_layers = self._allocate(layers, n, groups.source)  # [L, B]
        counts = torch.stack(
            [allocation.fractions_to_counts(fractions[:, b], int(n[b]))[:, 0] for b in range(len(n))], dim=1
        )  # [L, B]
        if self.layers.sliding:
            rep.notes.append(
                f"{len(self.layers.sliding)} of {len(self.modules)} layers use sliding-window attention "
                f"(window {self.layers.window}) and keep their own window cache; the budget is the mean kept "
                f"fraction of the {len(layers)} compressed full-attention layers"
            )
        rep.clipped = {"layer_budget": clipped_layers} if clipped_layers else {}
        kept, fraction, evicted, merged, new_layers = {}, {}, 0.0, 0.0, {}
        for li, idx in enumerate(layers):
            new_layers[idx], dropped, absorbed = self._compress_layer(idx, cache.layers[idx], counts[li], n)
            new = new_layers[idx]
            kept[idx], fraction[idx] = float(new.key_mask.sum(-1).float().mean()), float(fractions[li].mean())
            evicted, merged = evicted + dropped, merged + absorbed
        self._swap_layers(cache, new_layers)  # only now: an error above leaves the cache as the prefill wrote it
        for idx in self.layers.sliding:
            held = _held_tokens(cache.layers[idx], groups.valid)
            kept[idx], fraction[idx] = float(held.float().mean()), float((held / n.clamp_min(1)).mean())
        rep.prefill_tokens = round(float(n.float().mean()))
        rep.layer_tokens = [round(kept[i]) for i in self.modules]
        rep.layer_fractions = [fraction[i] for i in self.modules]
        rep.layer_entropy = [float(self._entropy[i].mean()) for i in layers] if self._entropy else []
        rep.evicted_tokens = round(evicted)
        rep.merged_tokens = round(merged)
        rep.kv_bytes_after = cache_bytes(cache)

    def _compress_layer(
        self, idx: int, layer, counts: torch.Tensor, n: torch.Tensor
    ) -> tuple[CompressedLayer, float, float]:
        """Select (and merge) one layer; returns the new layer, evicted and merged token counts.

        ``counts`` ``[B]``: tokens this layer keeps per row; ``n`` ``[B]``: valid prompt tokens.
        Counts are summed over the batch and averaged over KV heads.
        """
        r, rep, groups = self.recipe, self.report, self._groups.on(layer.keys.device)
        valid, n = groups.valid, n.to(layer.keys.device)
        if getattr(layer, "is_sliding", False):
            raise RuntimeError(
                f"cache layer {idx} is a sliding-window layer but the model's config makes layer {idx} full "
                "attention; let generate build the cache, or pass DynamicCache(config=model.config)"
            )
        scores = self._scores[idx]
        keep = counts.to(valid.device)[:, None]  # [B, 1]
        if r.head_budgets:
            keep = allocation.head_budgets(scores, keep[:, 0], valid, floor_fraction=r.head_floor)
        keep = keep.expand(-1, scores.shape[1])
        # a budget below sinks + window keeps the latest tokens of the window only
        if r.recent_window and int(keep.min()) < r.sink_tokens + r.recent_window:
            rep.clipped["recent_window"] = rep.clipped.get("recent_window", 0) + 1
        priority = groups.text if (r.text_priority and groups.source == "vision") else None
        sel = selection.select_indices(
            scores, keep, valid, sink_tokens=r.sink_tokens, recent_window=r.recent_window, priority=priority
        )
        self._selections[idx] = sel
        dropped = (n[:, None].float() - sel.mask.sum(-1).float()).clamp(min=0)  # [B, Hkv]
        if r.merge == "none":
            k, v = selection.gather_kv(layer.keys, layer.values, sel)
            absorbed = torch.zeros_like(dropped)
        else:
            targets = sel.mask
            if r.merge_targets == "scored":
                targets = merging.scored_targets(sel, valid, sink_tokens=r.sink_tokens, recent_window=r.recent_window)
            k, v, absorbed = merging.merge_evicted(
                layer.keys,
                layer.values,
                sel,
                valid,
                mode=r.merge,
                scores=scores,
                targets=targets,
                merge_keys=r.merge_keys,
                threshold=r.merge_threshold,
                cap=r.merge_cap,
                with_counts=True,
            )  # absorbed [B, Hkv]: pairs really merged (a head with no allowed target, or below threshold, drops)
        new = self._new_layer(k, v, sel.mask, layer.get_seq_length())
        return new, float(dropped.mean(-1).sum()), float(absorbed.mean(-1).sum())

    def _new_layer(self, keys, values, key_mask, logical_length: int) -> CompressedLayer:
        """The cache layer holding a compressed prefill (with ``decode="static"`` it moves into static
        buffers at the first decoded token, :meth:`prepare_static`, so prompt chunks can still follow).

        ``keys``/``values`` ``[batch, kv_heads, stored, head_dim]``, ``key_mask`` bool ``[batch, kv_heads, stored]``.
        """
        return CompressedLayer(keys.contiguous(), values.contiguous(), key_mask.contiguous(), logical_length)

    def prepare_static(self, cache, attention_mask: torch.Tensor | None) -> bool:
        """``decode="static"``, first decoded token: move the cache this block prefilled into static buffers.

        Compressed layers keep their key masks; untouched full-attention layers (method "full") get the
        prompt's padding as empty slots, from ``attention_mask`` ``[batch, >= tokens]`` (generate's 2-D
        mask); sliding-window layers keep their own cache. Returns False for a cache this block did not
        prefill (it decodes as it is).
        """
        if self._static_target is None or self._static_target() is not cache:
            return False
        self._static_target = None
        new_layers = {}
        for idx in self.modules:
            layer = cache.layers[idx]
            if getattr(layer, "is_sliding", False) or isinstance(layer, StaticLayer):
                continue
            b, h, n = layer.keys.shape[:3]
            if isinstance(layer, CompressedLayer):
                key_mask, logical = layer.key_mask, layer.logical_length
            else:
                mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
                valid = mask[:, :n].to(layer.keys.device, torch.bool) if mask is not None else None
                if valid is None:
                    valid = torch.ones(b, n, dtype=torch.bool, device=layer.keys.device)
                key_mask = valid[:, None, :].expand(-1, h, -1)
                logical = layer.get_seq_length()
            new_layers[idx] = StaticLayer(layer.keys, layer.values, key_mask, logical, room=self.decode_room)
        self._swap_layers(cache, new_layers)
        self.report.kv_bytes_after = cache_bytes(cache)
        return True

    def _swap_layers(self, cache, new_layers: dict[int, CompressedLayer]) -> None:
        self._cache_layers = weakref.WeakValueDictionary()
        for idx, layer in new_layers.items():
            cache.layers[idx] = self._cache_layers[idx] = layer

    def _allocate(self, layers: list[int], n: torch.Tensor, groups_source: str) -> tuple[torch.Tensor, int]:
        """Kept fraction per layer and batch row ``[layers, batch]``, and how many layers the
        allocator clamped to [alpha_min, 1] (most over the batch rows). ``groups_source`` ("vision",
        "text", "caller") picks the recipe's allocator for the prompt (:meth:`Recipe.allocator_for`); a
        text-only fallback is noted in the report."""
        r = self.recipe
        allocator = r.allocator_for(groups_source)
        note = f"no vision tokens in the prompt: layer budgets from the {allocator!r} allocator, not {r.allocator!r}"
        if allocator != r.allocator and note not in self.report.notes:
            self.report.notes.append(note)
        num_layers, batch = len(layers), len(n)
        if isinstance(self.budget, float):
            rho = [self.budget] * batch
        else:
            rho = [min(1.0, self.budget / max(int(nb), 1)) for nb in n]
        cols, clipped = [], 0
        statistic = {"entropy": self._entropy, "density": self._density}.get(allocator)  # per-layer [B]
        for b in range(batch):
            stat = torch.stack([statistic[i][b].float().cpu() for i in layers]) if statistic is not None else None
            res = allocation.ALLOCATORS[allocator](stat, num_layers, rho[b], r.tau, r.floor(rho[b]))
            cols.append(res.fractions.float().cpu())
            clipped = max(clipped, res.clipped_layers)
        return torch.stack(cols, dim=1), clipped


def _held_tokens(layer, valid: torch.Tensor) -> torch.Tensor:
    """Valid prompt tokens ``[B]`` an untouched cache layer holds (a sliding layer: the last ones of its window).

    ``valid [B, N]`` marks real tokens of the prefill; the layer stores the last ``stored <= N`` positions.
    """
    stored = layer.keys.shape[-2]
    return valid[:, valid.shape[-1] - stored :].sum(-1)


def _evenly_spaced(query: torch.Tensor, count: int | None) -> torch.Tensor | None:
    """``count`` evenly spaced query rows (first and last included), or None for all rows."""
    n = query.shape[-2]
    if count is None or count >= n:
        return None
    return torch.linspace(0, n - 1, count, device=query.device).round().long()


def _set_attn_implementation(model: torch.nn.Module, cfg, name: str, *, restoring: bool = False) -> None:
    """Set the attention implementation that ``cfg`` steers, through transformers' public
    ``set_attn_implementation`` on the decoder that owns ``cfg``; a config no such model owns is
    written directly (the one place that touches the private ``_attn_implementation``). When
    ``restoring``, an error of the public setter does not stop the restore."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if getattr(decoder, "config", None) is cfg and hasattr(decoder, "set_attn_implementation"):
        try:
            decoder.set_attn_implementation(name)
        except Exception:
            if not restoring:
                raise
    if cfg._attn_implementation != name:
        cfg._attn_implementation = name


def _unique_configs(model: torch.nn.Module, modules) -> list:
    """Config objects that steer the decoder's attention and mask creation."""
    seen: dict[int, object] = {}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (decoder, *modules):
        cfg = getattr(owner, "config", None)
        if cfg is not None:
            seen[id(cfg)] = cfg
    return list(seen.values())
