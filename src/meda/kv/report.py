"""What a compression did, in numbers: kept tokens, budgets, real bytes, fallbacks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompressionReport:
    """Filled in when a prefill is compressed (the last one, if several run in one session).

    Attributes:
        method, budget: what was asked.
        prefill_tokens: N, the prompt length (mean of valid tokens over the batch).
        layer_tokens: kept tokens per decoder layer after compression, mean over the batch
            (and over KV heads when heads keep different numbers); a sliding-window layer counts the
            prompt tokens its own window cache holds.
        layer_fractions: kept fraction per decoder layer (mean over the batch): the allocator's for
            compressed layers, held tokens / N for sliding-window layers.
        layer_entropy: MEDA's cross-modal entropy per compressed layer (mean over the batch), or [] where
            it was not measured (other allocators; ``meda`` on a prompt without vision tokens, whose budgets
            are uniform).
        compressed_layers: indices of the layers the budget was spread over (full-attention layers);
            [] for method "full".
        sliding_layers, sliding_window: layers left with their own sliding-window cache, and its size.
        kv_bytes_before, kv_bytes_after: real bytes of the cache tensors right after the
            prefill and right after compression (keys, values and key masks).
        evicted_tokens: tokens dropped or merged, summed over layers, heads-averaged,
            summed over the batch.
        merged_tokens: of those, how many were merged into a kept pair (not lost).
        clipped: adjustments made to the request, by name -> count (e.g. a recent
            window longer than a layer's budget).
        groups: where the entropy's token groups came from ("vision", "text", "caller").
        notes: human-readable fallbacks (e.g. a VLM prompt with no image tokens).
        compressions: how many prefills this session compressed.
    """

    method: str
    budget: float | int
    prefill_tokens: int = 0
    layer_tokens: list[int] = field(default_factory=list)
    layer_fractions: list[float] = field(default_factory=list)
    layer_entropy: list[float] = field(default_factory=list)
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    evicted_tokens: int = 0
    merged_tokens: int = 0
    clipped: dict[str, int] = field(default_factory=dict)
    groups: str = ""
    notes: list[str] = field(default_factory=list)
    compressions: int = 0
    compressed_layers: list[int] = field(default_factory=list)
    sliding_layers: list[int] = field(default_factory=list)
    sliding_window: int | None = None

    @property
    def kept_fraction(self) -> float:
        """Mean kept tokens per compressed layer (every layer when none was) over the prefill length."""
        if not self.layer_tokens or not self.prefill_tokens:
            return 1.0
        tokens = [self.layer_tokens[i] for i in self.compressed_layers] or self.layer_tokens
        return sum(tokens) / len(tokens) / self.prefill_tokens

    @property
    def bytes_ratio(self) -> float:
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kept_fraction"] = self.kept_fraction
        d["bytes_ratio"] = self.bytes_ratio
        return d
