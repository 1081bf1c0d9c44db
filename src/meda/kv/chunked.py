"""Compress as the prompt arrives: a prompt in chunks (``generate(prefill_chunk_size=...)``) or a prompt
continued on a cache this session already compressed.

The first chunk is compressed exactly like a one-shot prefill. Every later chunk is appended to the
compressed cache, attends over what is kept plus itself, and then every compressed layer is trimmed
back to its *running budget*: the recipe's allocator applied to the statistics seen so far, times the
prompt tokens seen so far. The trim after the last chunk is the final allocation (made when the prompt
ends, before the first decoded token); peak memory is the compressed cache plus one chunk.

Running statistics, per layer (see docs/kv-statistics.md):

- scores of kept slots: ``cumulative`` adds each chunk's attention (its queries over the kept cache and
  the chunk) to what a slot had; ``window`` takes the latest chunk's observation-window scores;
  ``recency`` the logical position.
- entropy: each chunk's cross-modal entropy (its queries over the kept cache and the chunk), averaged
  over chunks weighted by their valid tokens. Text-only prompts: every earlier token is "context",
  the question group is the last ``question_tokens`` tokens so far.
- a layer holds at most what it kept plus the chunk: when its final budget asks for more (its share
  grew after an early trim) it keeps everything it holds, and the report counts the layers
  (``clipped["chunk_capacity"]``) and the tokens they fell short.

Merging runs at every trim as in a one-shot compression (a slot merged into twice is the mean of its
value and each trim's evicted pairs, not a count-weighted mean over all of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from meda.kv import allocation, entropy, merging, scoring, selection
from meda.kv.cache import CompressedLayer, ValidSlots, attention_mask_for, cache_bytes
from meda.kv.groups import token_groups
from meda.kv.support import attention_softcap

CHUNK_ALLOCATORS = ("uniform", "pyramid", "entropy")


@dataclass
class LayerState:
    """What one compressed layer knows about its stored slots (``T`` slots, per KV head).

    Attributes:
        scores: float32 ``[B, Hkv, T]`` running importance (``-inf`` never; empty slots are masked).
        vision: bool ``[B, Hkv, T]`` the slot's token is in the "vision" group (vision prompts).
        position: long ``[B, Hkv, T]`` logical position of the slot's token.
        entropy: float32 ``[B]`` running cross-modal entropy (token-weighted mean over chunks).
    """

    scores: Tensor
    vision: Tensor
    position: Tensor
    entropy: Tensor

    def extend(self, slots: int, logical_end: int) -> None:
        """Add ``slots`` decoded tokens (appended since the last trim: score 0, text, latest positions)."""
        if slots <= 0:
            return
        b, h = self.scores.shape[:2]
        new_pos = torch.arange(logical_end - slots, logical_end, device=self.position.device).expand(b, h, -1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, slots)], dim=-1)
        self.vision = torch.cat([self.vision, self.vision.new_zeros(b, h, slots)], dim=-1)
        self.position = torch.cat([self.position, new_pos], dim=-1)


class ChunkedPrefill:
    """Running statistics of one prompt compressed chunk by chunk (owned by a compression session)."""

    def __init__(self, session, selections: dict[int, selection.Selection]):
        """State after the session's one-shot compression of the first chunk (its scores, groups and
        per-layer selections, before the session resets its per-forward statistics)."""
        groups = session._groups
        self.source = groups.source
        self.seen = groups.valid.sum(-1)  # [B] valid prompt tokens so far
        # [B] tokens the running entropy averages over (none while text-only chunks leave it unmeasured)
        self.entropy_seen = self.seen.clone() if session._entropy else torch.zeros_like(self.seen)
        self.chunks = 1
        self.layers: dict[int, LayerState] = {}
        for idx, sel in selections.items():
            index = sel.indices
            heads = index.shape[1]
            vision = groups.on(index.device).vision[:, None].expand(-1, heads, -1).gather(-1, index)
            ent = session._entropy.get(idx)
            if ent is None and session.recipe.needs_entropy:  # a text-only first chunk: measured from images on
                ent = torch.zeros(index.shape[0], device=index.device)
            scores = session._scores[idx].gather(-1, index).float().nan_to_num(neginf=0.0)
            self.layers[idx] = LayerState(scores, vision, index.clone(), ent.float() if ent is not None else None)
        self.pending: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.chunk = None  # TokenGroups of the chunk in flight
        self.decoded = 0  # decoded tokens appended to the cache since the last trim (they count as seen)
        self.evicted = self.merged = 0.0

    # ---- one chunk's forward -----------------------------------------------------------------
    def begin_forward(self) -> None:
        self.pending = {}
        self.chunk = None
        self.decoded = 0

    def observe(self, session, module, layer: CompressedLayer, query: Tensor, key: Tensor, additive: bool):
        """A chunk's attention call on a compressed layer (``query [B, Hq, q, D]``, ``key [B, Hkv, T, D]``,
        the chunk's keys already appended): gather its statistics; returns the layer's attention mask."""
        r = session.recipe
        idx, q_len = module.layer_idx, query.shape[-2]
        if r is not None and r.allocator not in CHUNK_ALLOCATORS:
            raise NotImplementedError(
                f"method {session.report.method!r} (allocator {r.allocator!r}) cannot compress a prompt chunk by "
                f"chunk (allocators that can: {', '.join(CHUNK_ALLOCATORS)}); pass the whole prompt at once "
                "(no prefill_chunk_size, no continued prompt)"
            )
        if self.chunk is None:
            self.chunk = self._chunk_groups(session, query, q_len, layer)
        chunk = self.chunk.on(layer.keys.device)  # built at the first layer; a split model's layers differ
        layer.key_mask[..., -q_len:] = chunk.valid[:, None, :]  # padding inside the chunk stays masked
        layer._refresh()
        if r is not None and idx in self.layers:
            state = self.layers[idx]
            self.decoded = key.shape[-2] - q_len - state.scores.shape[-1]  # tokens decoded since the last trim
            state.extend(self.decoded, layer.logical_length - q_len)
            self.pending[idx] = self._chunk_statistics(session, module, layer, state, query, key, chunk)
        km, n_rep = layer.key_mask, query.shape[1] // key.shape[1]
        if not additive and not layer.all_valid and bool(chunk.valid.all()):  # holes in the kept slots only
            return ValidSlots(km)
        if bool((km == km[:, :1]).all()):  # every head has the same empty slots: one mask broadcast over heads
            shared = SimpleNamespace(key_mask=km[:, :1], all_valid=layer.all_valid)
            return attention_mask_for(shared, q_len, 1, query.dtype, additive)  # [B, 1, q, T]
        return attention_mask_for(layer, q_len, n_rep, query.dtype, additive)  # [B, Hq, q, T]

    def _chunk_groups(self, session, query: Tensor, q_len: int, layer: CompressedLayer):
        """Token groups of the chunk's ``q_len`` tokens (the last columns of the forward's inputs)."""
        inputs, start = session._inputs, layer.logical_length - q_len

        def last(t: Tensor | None) -> Tensor | None:
            return t[..., -q_len:] if t is not None and t.dim() == 2 and t.shape[-1] >= q_len else None

        caller = session.caller_groups
        if caller is not None:
            if caller.shape[-1] < start + q_len:
                raise ValueError(
                    f"groups mask covers {caller.shape[-1]} tokens but the prompt continues to {start + q_len}; "
                    "pass a mask over the whole prompt"
                )
            caller = caller[:, start : start + q_len]
        groups = token_groups(
            input_ids=last(inputs.get("input_ids")),
            attention_mask=last(inputs.get("attention_mask")),
            shape=(query.shape[0], q_len),
            device=query.device,
            vision_ids=session.vision_ids,
            question_tokens=session.question_tokens,
            mm_token_type_ids=last(inputs.get("mm_token_type_ids")),
            caller_mask=caller,
        )
        if self.source == "vision" and groups.source != "vision":  # a text chunk after an image: all text
            groups.vision = torch.zeros_like(groups.valid)
        elif self.source == "text" and groups.source == "vision":
            self._first_images(session, groups)
        return groups

    def _first_images(self, session, groups) -> None:
        """Images arrive after text-only chunks: from here on the groups are vision vs text, so every earlier
        token (counted as context or question so far) is text, and the running entropy starts over with this
        chunk (the text-only chunks measured context-vs-question entropy, another quantity)."""
        self.source = "vision"
        self.entropy_seen = torch.zeros_like(self.seen)
        for state in self.layers.values():
            state.vision = torch.zeros_like(state.vision)
        rep = session.report
        rep.groups = groups.source
        rep.notes = [n for n in rep.notes if not n.startswith("no vision tokens in the prompt")]

    def _chunk_statistics(self, session, module, layer, state: LayerState, query, key, chunk):
        """Scores ``[B, Hkv, T]`` and entropy ``[B]`` (or None) of this chunk's queries, per KV head."""
        r = session.recipe
        heads, q_len = key.shape[1], query.shape[-2]
        group = query.shape[1] // heads
        logits = {"scaling": float(module.scaling), "softcap": attention_softcap(module)}
        past_vision = state.vision if self.source != "text" else torch.ones_like(state.vision)
        scores, sums = [], []
        for h in range(heads):
            q, k = query[:, h * group : (h + 1) * group], key[:, h : h + 1]
            valid = layer.key_mask[:, h]
            vision = torch.cat([past_vision[:, h], chunk.vision], dim=-1) & valid
            if r.scorer == "cumulative":
                rows = _evenly_spaced(q_len, r.score_queries, query.device)
                s = scoring.cumulative_attention_scores(q, k, valid, **logits, query_subset=rows)
            elif r.scorer == "window":
                s = scoring.window_attention_scores(q, k, valid, **logits, window=r.window, pool_kernel=r.pool_kernel)
            else:
                s = None
            scores.append(s)
            if r.measures_entropy(self.source):
                rows = _evenly_spaced(q_len, r.entropy_queries, query.device)
                sums.append(entropy.cross_modal_entropy_sums(q, k, vision, valid, **logits, query_subset=rows))
        score = torch.cat(scores, dim=1).nan_to_num(neginf=0.0) if scores[0] is not None else None
        ent = None
        if sums:
            ent = sum((s / c.clamp_min(1.0)).sum(-1) for s, c in sums) / query.shape[1]
        return score, ent

    # ---- after the chunk's forward: trim every compressed layer -----------------------------------
    def trim(self, session, cache) -> None:
        """Fold this chunk's statistics into the running ones and trim each layer to its running budget."""
        r, rep = session.recipe, session.report
        chunk_valid, chunk_vision = self.chunk.valid, self.chunk.vision
        new_tokens = chunk_valid.sum(-1) + self.decoded
        layers = [i for i in session.layers.full if i in self.layers]
        missing = sorted(set(layers) - set(self.pending))
        if missing:
            raise RuntimeError(f"chunk statistics missing for layers {missing}; was the forward interrupted?")
        before = cache_bytes(cache)
        for idx in layers:
            layer = cache.layers[idx]
            device = layer.keys.device
            self._fold(idx, layer, *self.pending[idx], chunk_valid.to(device), chunk_vision.to(device), r.scorer)
        self.seen = self.seen + new_tokens
        self.entropy_seen = self.entropy_seen + new_tokens
        self.chunks += 1
        if r.needs_entropy:
            session._entropy = {i: self.layers[i].entropy for i in layers}
        fractions, clipped_layers = session._allocate(layers, self.seen, self.source)
        counts = torch.stack(
            [allocation.fractions_to_counts(fractions[:, b], int(self.seen[b]))[:, 0] for b in range(len(self.seen))],
            dim=1,
        )  # [L, B]
        new_layers, kept, short_layers, short_tokens = {}, {}, 0, 0.0
        for li, idx in enumerate(layers):
            layer = cache.layers[idx]
            keep = counts[li].to(layer.keys.device)
            held = layer.key_mask.sum(-1).min(dim=-1).values  # [B] fewest valid slots over the heads
            if bool((held < keep).any()):
                short_layers += 1
                short_tokens += float((keep - held).clamp_min(0).float().mean())
            new_layers[idx], dropped, absorbed = self._trim_layer(session, idx, layer, keep)
            kept[idx] = float(new_layers[idx].key_mask.sum(-1).float().mean())
            self.evicted, self.merged = self.evicted + dropped, self.merged + absorbed
        session._swap_layers(cache, new_layers)
        rep.compressions += 1
        rep.kv_bytes_before = before
        rep.kv_bytes_after = cache_bytes(cache)
        rep.prefill_tokens = round(float(self.seen.float().mean()))
        rep.layer_tokens = [
            round(kept[i]) if i in kept else rep.layer_tokens[li] for li, i in enumerate(session.modules)
        ]
        frac = {i: float(fractions[li].mean()) for li, i in enumerate(layers)}
        rep.layer_fractions = [frac.get(i, f) for i, f in zip(session.modules, rep.layer_fractions, strict=False)]
        if r.measures_entropy(self.source):
            rep.layer_entropy = [float(self.layers[i].entropy.mean()) for i in layers]
        rep.evicted_tokens, rep.merged_tokens = round(self.evicted), round(self.merged)
        if clipped_layers:
            rep.clipped["layer_budget"] = max(rep.clipped.get("layer_budget", 0), clipped_layers)
        if short_layers:
            rep.clipped["chunk_capacity"] = short_layers
            rep.clipped["chunk_capacity_tokens"] = round(short_tokens)
        else:
            rep.clipped.pop("chunk_capacity", None)
            rep.clipped.pop("chunk_capacity_tokens", None)
        note = (
            f"prompt compressed chunk by chunk ({self.chunks} chunks): each chunk was appended and every layer "
            "trimmed back to its running budget; kv_bytes_before is the cache just before the last trim"
        )
        rep.notes = [n for n in rep.notes if not n.startswith("prompt compressed chunk by chunk")] + [note]

    def _fold(self, idx: int, layer, score, ent, chunk_valid: Tensor, chunk_vision: Tensor, scorer: str) -> None:
        """Running scores / positions / groups of ``idx`` over the stored slots (past + this chunk)."""
        state = self.layers[idx]
        b, heads = state.scores.shape[:2]
        q_len = chunk_valid.shape[-1]
        start = layer.logical_length - q_len
        pos = torch.arange(start, start + q_len, device=state.position.device).expand(b, heads, -1)
        state.position = torch.cat([state.position, pos], dim=-1)
        state.vision = torch.cat([state.vision, chunk_vision[:, None].expand(-1, heads, -1)], dim=-1)
        if scorer == "cumulative":
            state.scores = torch.cat([state.scores, state.scores.new_zeros(b, heads, q_len)], dim=-1) + score
        elif scorer == "window":
            state.scores = score.float()
        else:
            state.scores = state.position.float()
        if ent is not None:
            n_new = chunk_valid.sum(-1).float()
            seen = self.entropy_seen.to(state.entropy.device).float()
            state.entropy = (state.entropy * seen + ent * n_new) / (seen + n_new).clamp_min(1)

    def _trim_layer(self, session, idx: int, layer, keep: Tensor):
        """Select (and merge) every KV head of one layer on its own valid slots; returns the new layer,
        evicted and merged token counts (per-row sums averaged over heads, summed over the batch)."""
        r, state = session.recipe, self.layers[idx]
        heads = layer.keys.shape[1]
        mask = layer.key_mask
        scores = state.scores.masked_fill(~mask, float("-inf"))
        keep_h = keep[:, None].expand(-1, heads)
        if r.head_budgets:
            keep_h = allocation.head_budgets(scores, keep, mask.any(1), floor_fraction=r.head_floor)
        sels, ks, vs, dropped, absorbed = [], [], [], 0.0, 0.0
        for h in range(heads):
            valid = mask[:, h]
            priority = (valid & ~state.vision[:, h]) if (r.text_priority and self.source == "vision") else None
            sel = selection.select_indices(
                scores[:, h : h + 1],
                keep_h[:, h : h + 1],
                valid,
                sink_tokens=r.sink_tokens,
                recent_window=r.recent_window,
                priority=priority,
            )
            k, v = layer.keys[:, h : h + 1], layer.values[:, h : h + 1]
            lost = (valid.sum(-1) - sel.mask.sum(-1)[:, 0]).clamp_min(0).float()  # [B]
            if r.merge == "none":
                k, v = selection.gather_kv(k, v, sel)
            else:
                targets = sel.mask
                if r.merge_targets == "scored":
                    targets = merging.scored_targets(
                        sel, valid, sink_tokens=r.sink_tokens, recent_window=r.recent_window
                    )
                k, v, merged = merging.merge_evicted(
                    k,
                    v,
                    sel,
                    valid,
                    mode=r.merge,
                    scores=scores[:, h : h + 1].clamp_min(0.0),
                    targets=targets,
                    merge_keys=r.merge_keys,
                    threshold=r.merge_threshold,
                    cap=r.merge_cap,
                    with_counts=True,
                )
                absorbed += float(merged.sum())  # pairs really merged (below the threshold they are dropped)
            dropped += float(lost.sum())
            sels.append(sel)
            ks.append(k)
            vs.append(v)
        width = max(s.indices.shape[-1] for s in sels)
        index = torch.cat([_pad(s.indices, width, 0) for s in sels], dim=1)
        kept = torch.cat([_pad(s.mask, width, False) for s in sels], dim=1)
        keys = torch.cat([_pad(k, width, 0.0, dim=2) for k in ks], dim=1)
        values = torch.cat([_pad(v, width, 0.0, dim=2) for v in vs], dim=1)
        state.scores = state.scores.gather(-1, index).masked_fill(~kept, 0.0)
        state.vision = state.vision.gather(-1, index) & kept
        state.position = state.position.gather(-1, index)
        new = session._new_layer(keys, values, kept, layer.get_seq_length())
        return new, dropped / heads, absorbed / heads


def _pad(t: Tensor, width: int, value, dim: int = -1) -> Tensor:
    """Pad ``t`` along ``dim`` to ``width`` with ``value``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def _evenly_spaced(n: int, count: int | None, device) -> Tensor | None:
    """``count`` evenly spaced rows of ``n`` (first and last included), or None for all rows."""
    if count is None or count >= n:
        return None
    return torch.linspace(0, n - 1, count, device=device).round().long()
