"""Compression methods as recipes: one allocator x scorer x merger design.

Every method name in :data:`METHODS` maps to a :class:`Recipe`; ``compress(model,
method=..., **overrides)`` starts from that recipe and replaces the fields you pass.
A method is therefore a row in a table, not a code path of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Literal

Allocator = Literal["uniform", "pyramid", "entropy", "density"]
Scorer = Literal["recency", "cumulative", "window"]
Merge = Literal["none", "average", "pivot", "weighted"]
MergeTargets = Literal["all", "scored"]


@dataclass(frozen=True)
class Recipe:
    """How one method compresses a prefilled cache.

    Attributes:
        allocator: per-layer budgets. ``uniform`` (same fraction in every layer),
            ``pyramid`` (PyramidKV: linearly more in lower layers), ``entropy`` (MEDA:
            softmax of cross-modal attention entropy), ``density`` (VL-Cache: in proportion to the
            density of post-vision attention).
        scorer: per-key importance. ``recency`` (later is better; StreamingLLM),
            ``cumulative`` (attention received from every prompt query; H2O, MEDA paper),
            ``window`` (attention from the last ``window`` queries, max-pooled; SnapKV).
        head_budgets: split each layer's budget unevenly over KV heads (AdaKV).
        text_priority: prefer text tokens over vision tokens (MEDA, LOOK-M).
        sink_tokens: first valid tokens always kept (attention sinks).
        recent_window: last valid tokens always kept; clipped to the layer budget
            (the report counts every clip).
        merge: what happens to evicted pairs: dropped (``none``) or merged into the most
            similar kept pair of the same head (``average``, ``pivot``, ``weighted``).
        merge_targets: which kept pairs may receive merged ones: ``all`` (every kept pair; the
            MEDA / LOOK-M papers, the default) or ``scored`` (not the ``sink_tokens`` and
            ``recent_window`` pairs, only those kept for their score; on SmolLM2 the recent
            window absorbing evicted pairs is what breaks generation, see docs/kv.md).
        merge_keys: merge keys as well as values (True: the papers). False merges values only and
            keeps each kept pair's own key, so what the pair is found by does not move.
        merge_threshold: key cosine similarity below which an evicted pair is dropped instead of
            merged (None: every evicted pair is merged, the papers).
        merge_cap: largest share of a merged pair that may come from the pairs it absorbed (None: the
            mode's own share, e.g. ``n / (1 + n)`` for ``average``; 0.5: a slot keeps at least half of itself
            however many pairs it absorbs).
        text_only_allocator: the allocator used instead of ``allocator`` when the prompt holds no vision
            tokens (token groups from the context and the question; see :mod:`meda.kv.groups`); None: the
            same allocator there too. ``meda`` sets ``"uniform"``: cross-modal entropy needs two modalities,
            and on SmolLM2's text tasks its context-vs-question proxy lost pass keys that uniform budgets
            keep (docs/results.md).
        layer_floor: smallest per-layer kept fraction as a share of the budget (0: only
            ``alpha_min``; 0.5: no layer keeps less than half the mean budget).
        window: observation window (queries) of the ``window`` scorer; also the length
            of the "question" group for text-only entropy.
        pool_kernel: max-pool width of the ``window`` scorer.
        tau: softmax temperature of the ``entropy`` allocator (1.0 = paper).
        alpha_min: smallest per-layer kept fraction of the ``entropy``/``pyramid`` allocators.
        head_floor: AdaKV's share of a layer budget spread evenly over heads.
        entropy_queries: evaluate the entropy on at most this many evenly spaced queries
            (None = all queries, chunked; the paper's definition).
        score_queries: sum the ``cumulative`` scores over at most this many evenly spaced
            queries (None = all prompt queries, the paper's / H2O's score). Both are O(N^2)
            over all queries; a few thousand queries make them O(N) for long prompts.
    """

    allocator: Allocator = "uniform"
    scorer: Scorer = "window"
    head_budgets: bool = False
    text_priority: bool = False
    sink_tokens: int = 0
    recent_window: int = 0
    merge: Merge = "none"
    merge_targets: MergeTargets = "all"
    merge_keys: bool = True
    merge_threshold: float | None = None
    merge_cap: float | None = None
    text_only_allocator: Allocator | None = None
    layer_floor: float = 0.0
    window: int = 32
    pool_kernel: int = 7
    tau: float = 1.0
    alpha_min: float = 0.01
    head_floor: float = 0.2
    entropy_queries: int | None = None
    score_queries: int | None = None

    @property
    def needs_entropy(self) -> bool:
        return self.allocator == "entropy"

    def allocator_for(self, groups_source: str) -> Allocator:
        """The allocator for a prompt whose token groups came from ``groups_source`` ("vision", "text", "caller")."""
        if groups_source == "text" and self.text_only_allocator is not None:
            return self.text_only_allocator
        return self.allocator

    def measures_entropy(self, groups_source: str) -> bool:
        """Whether a prompt of ``groups_source`` needs the cross-modal entropy (its allocator reads it)."""
        return self.allocator_for(groups_source) == "entropy"

    def floor(self, rho: float) -> float:
        """The per-layer lower bound at mean budget ``rho``: ``max(alpha_min, layer_floor * rho)``, at most rho."""
        return min(max(self.alpha_min, self.layer_floor * rho), rho)


METHODS: dict[str, Recipe | None] = {
    "full": None,
    "streamingllm": Recipe(scorer="recency", sink_tokens=4),
    "h2o": Recipe(scorer="cumulative", recent_window=32),
    "snapkv": Recipe(scorer="window", recent_window=32),
    "pyramidkv": Recipe(allocator="pyramid", scorer="window", recent_window=32),
    "lookm": Recipe(scorer="cumulative", text_priority=True, recent_window=32, merge="pivot"),
    "adakv": Recipe(scorer="window", head_budgets=True, recent_window=32),
    "vlcache": Recipe(allocator="density", scorer="window", recent_window=32),
    "meda-paper": Recipe(
        allocator="entropy", scorer="cumulative", text_priority=True, recent_window=32, merge="average"
    ),
    # the recommended MEDA (docs/results.md): budgets from a tempered entropy with a floor of half the
    # budget, text first, evicted pairs dropped (no merge helped here), and SnapKV's window score: on
    # SmolLM2's text tasks it is closer to the full cache than the paper's cumulative score, on the VLM
    # about as close, and it needs no all-query statistics (docs/results.md, "Choosing the scorer");
    # uniform budgets on prompts without images (12 SmolLM2 pass keys at 1k: the entropy proxy kept 2,
    # uniform budgets 5; docs/results.md, "Text-only prompts")
    "meda": Recipe(
        allocator="entropy",
        scorer="window",
        text_priority=True,
        recent_window=32,
        tau=4.0,
        layer_floor=0.5,
        merge="none",
        text_only_allocator="uniform",
    ),
}


def resolve_recipe(method: str, **overrides: object) -> Recipe | None:
    """The recipe for ``method`` with ``overrides`` applied; None for ``full``.

    Raises:
        ValueError: unknown method or unknown/invalid override.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    base = METHODS[method]
    if base is None:
        if overrides:
            raise ValueError(f"method 'full' takes no options; got {sorted(overrides)}")
        return None
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(names)}")
    for name, value in overrides.items():
        _check_type(name, value)
    recipe = dataclasses.replace(base, **overrides)
    _validate(recipe)
    return recipe


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(Recipe)


def _check_type(name: str, value: object) -> None:
    """A clear error for an option of the wrong kind (``tau="abc"``, ``window=2.5``, ``merge_keys=3``); which
    choice a ``Literal`` option takes is :func:`_validate`'s job."""
    hint = _field_types()[name]
    kinds = set(typing.get_args(hint)) if typing.get_origin(hint) in (types.UnionType, typing.Union) else {hint}
    if any(typing.get_origin(k) is Literal for k in kinds):
        return
    ok = (
        (value is None and type(None) in kinds)
        or (isinstance(value, bool) and bool in kinds)
        or (not isinstance(value, bool) and isinstance(value, int) and (int in kinds or float in kinds))
        or (isinstance(value, float) and float in kinds)
    )
    if not ok:
        words = {float: "a number", int: "an integer", bool: "true or false", type(None): "none"}
        wanted = " or ".join(sorted(words.get(k, str(k)) for k in kinds))
        raise ValueError(f"option {name} must be {wanted}, got {value!r}")


def _validate(r: Recipe) -> None:
    choices = {"allocator": Allocator, "scorer": Scorer, "merge": Merge, "merge_targets": MergeTargets}
    for name, lit in choices.items():
        allowed = lit.__args__
        if getattr(r, name) not in allowed:
            raise ValueError(f"{name}={getattr(r, name)!r} is not one of {allowed}")
    if r.text_only_allocator is not None and r.text_only_allocator not in Allocator.__args__:
        raise ValueError(f"text_only_allocator={r.text_only_allocator!r} is not None or one of {Allocator.__args__}")
    for name in ("sink_tokens", "recent_window", "window", "pool_kernel"):
        if int(getattr(r, name)) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(r, name)}")
    if r.window < 1:
        raise ValueError(f"window must be >= 1, got {r.window}")
    if not r.tau > 0:
        raise ValueError(f"tau must be > 0, got {r.tau}")
    if not 0 < r.alpha_min <= 1:
        raise ValueError(f"alpha_min must be in (0, 1], got {r.alpha_min}")
    if not 0 <= r.layer_floor <= 1:
        raise ValueError(f"layer_floor must be in [0, 1] (a share of the budget), got {r.layer_floor}")
    if r.merge_threshold is not None and not -1 <= r.merge_threshold <= 1:
        raise ValueError(f"merge_threshold must be None or a cosine similarity in [-1, 1], got {r.merge_threshold}")
    if r.merge_cap is not None and not 0 <= r.merge_cap <= 1:
        raise ValueError(f"merge_cap must be None or a share in [0, 1], got {r.merge_cap}")
    for name in ("entropy_queries", "score_queries"):
        value = getattr(r, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    if not 0 <= r.head_floor <= 1:
        raise ValueError(f"head_floor must be in [0, 1], got {r.head_floor}")
