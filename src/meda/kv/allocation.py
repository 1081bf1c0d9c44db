"""How much cache each layer (and each head) keeps.

Layer budgets are fractions ``alpha [L]`` of the prefill with mean exactly ``rho``:

- :func:`entropy_budgets` (MEDA): ``alpha_l = softmax(E / tau)_l * L * rho``;
- :func:`pyramid_budgets` (PyramidKV): linearly decreasing from the first to the last layer;
- :func:`density_budgets` (VL-Cache): ``alpha_l = d_l / mean(d) * rho``, ``d`` the post-vision attention
  density of each layer (:func:`meda.kv.sparsity.post_vision_density`);
- :func:`uniform_budgets`: ``alpha_l = rho``.

:data:`ALLOCATORS` maps each recipe ``allocator`` name to one of them (one function per allocator).

All three go through one clamp: ``alpha_l = clamp(s * raw_l, alpha_min, 1)`` with the scale ``s``
solved exactly so that ``mean(alpha) == rho``; what is clipped at either bound is thereby given to (or
taken from) the unclipped layers in proportion to their raw share. ``s == 1`` when nothing clips. (The
authors' code clamps without renormalising, so its mean drifts from ``rho``.)

:func:`fractions_to_counts` turns fractions into integer token counts per layer and batch row;
:func:`head_budgets` splits one layer's count over its KV heads (AdaKV).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_ALPHA_MIN = 0.01


@dataclass(frozen=True)
class LayerBudgets:
    """Kept fraction per layer.

    Attributes:
        fractions: ``float64 [L]`` in ``[alpha_min, 1]``, mean ``rho`` (to float64 rounding).
        raw: ``float64 [L]`` the allocator's fractions before clamping (mean ``rho``).
        scale: the solved ``s`` in ``clamp(s * raw, alpha_min, 1)`` (1 when nothing clips).
        alpha_min: the lower bound used.
    """

    fractions: Tensor
    raw: Tensor
    scale: float
    alpha_min: float

    @property
    def clipped(self) -> float:
        """Budget the clamp moved between layers: ``mean_l max(raw_l - fractions_l, 0)``."""
        return float((self.raw - self.fractions).clamp_min(0.0).mean())

    @property
    def clipped_layers(self) -> int:
        """Layers held at a bound (``alpha_min`` or 1) that their scaled raw fraction lies beyond."""
        scaled = self.scale * self.raw
        return int(((scaled < self.alpha_min) | (scaled > 1.0)).sum())


def _check_rho(rho: float, alpha_min: float | None) -> float:
    """Validate ``rho`` in (0, 1] and return the lower bound (default ``min(DEFAULT_ALPHA_MIN, rho)``)."""
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"rho (mean kept fraction) must be a number in (0, 1]; got {rho!r}")
    if alpha_min is None:
        return min(DEFAULT_ALPHA_MIN, float(rho))
    if not 0.0 <= alpha_min <= rho:
        raise ValueError(
            f"alpha_min must lie in [0, rho] = [0, {rho}] so the mean can be rho; got {alpha_min}. "
            "Lower alpha_min or raise the budget."
        )
    return float(alpha_min)


def _clamp_to_mean(raw: Tensor, rho: float, alpha_min: float) -> LayerBudgets:
    """``clamp(s * raw, alpha_min, 1)`` with ``s >= 0`` solved so the mean is ``rho`` (float64 ``raw``).

    ``f(s) = mean(clamp(s * raw, lo, 1))`` is continuous, non-decreasing and piecewise linear with
    breakpoints ``lo / raw_l`` and ``1 / raw_l``: evaluate it there and interpolate on the segment
    that crosses ``rho``.
    """
    if ((raw >= alpha_min) & (raw <= 1.0)).all():
        scale = 1.0
    else:
        positive = raw.clamp_min(torch.finfo(torch.float64).tiny)
        breaks = torch.cat((alpha_min / positive, 1.0 / positive)).sort().values  # [2L]
        values = (breaks[:, None] * positive).clamp(alpha_min, 1.0).mean(dim=1)  # f at each breakpoint
        above = int(torch.searchsorted(values, torch.tensor([rho], dtype=values.dtype)).clamp(1, len(breaks) - 1))
        s0, s1, f0, f1 = (float(x) for x in (breaks[above - 1], breaks[above], values[above - 1], values[above]))
        # f0 < rho <= f1, except rho == alpha_min == f0 == f1 (every layer at the lower bound).
        scale = s0 + (rho - f0) * (s1 - s0) / (f1 - f0) if f1 > f0 else s0
    fractions = (scale * raw).clamp(alpha_min, 1.0)
    return LayerBudgets(fractions=fractions, raw=raw, scale=scale, alpha_min=alpha_min)


def entropy_budgets(entropy: Tensor, rho: float, *, tau: float = 1.0, alpha_min: float | None = None) -> LayerBudgets:
    """MEDA layer budgets from per-layer cross-modal entropy.

    Args:
        entropy: ``[L]`` one entropy per layer (e.g. the batch mean of
            :func:`meda.kv.entropy.cross_modal_entropy`).
        rho: mean kept fraction in (0, 1].
        tau: softmax temperature (1 = paper; larger = closer to uniform).
        alpha_min: lower bound per layer (default ``min(0.01, rho)``); must be <= rho.
    """
    alpha_min = _check_rho(rho, alpha_min)
    if entropy.dim() != 1 or entropy.numel() == 0 or not torch.isfinite(entropy).all():
        raise ValueError(f"entropy must be a non-empty finite 1-D tensor [layers]; got {tuple(entropy.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    weights = torch.softmax(entropy.detach().double().cpu() / tau, dim=0)
    return _clamp_to_mean(weights * (entropy.numel() * rho), rho, alpha_min)


def pyramid_budgets(num_layers: int, rho: float, *, beta: float = 20.0, alpha_min: float | None = None) -> LayerBudgets:
    """PyramidKV layer budgets: linear from ``2 rho - rho / beta`` (first layer) to ``rho / beta`` (last).

    Args:
        num_layers: L >= 1.
        rho: mean kept fraction in (0, 1].
        beta: PyramidKV's steepness (>= 1; 1 = uniform, 20 = the PyramidKV default).
        alpha_min: lower bound per layer (default ``min(0.01, rho)``).
    """
    alpha_min = _check_rho(rho, alpha_min)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got {num_layers}")
    if not beta >= 1:
        raise ValueError(f"beta must be >= 1 (1 = uniform); got {beta}")
    slope = torch.linspace(1.0, -1.0, num_layers, dtype=torch.float64) if num_layers > 1 else torch.zeros(1)
    return _clamp_to_mean(rho + (rho - rho / beta) * slope.double(), rho, alpha_min)


def density_budgets(density: Tensor, rho: float, *, alpha_min: float | None = None) -> LayerBudgets:
    """VL-Cache layer budgets: in proportion to each layer's post-vision attention density.

    Args:
        density: ``[L]`` positive densities (share of dense attention entries, in (0, 1]).
        rho: mean kept fraction in (0, 1]; alpha_min: lower bound per layer (default ``min(0.01, rho)``).
    """
    alpha_min = _check_rho(rho, alpha_min)
    if density.dim() != 1 or density.numel() == 0 or not (torch.isfinite(density).all() and (density > 0).all()):
        raise ValueError(f"density must be a non-empty positive finite 1-D tensor [layers]; got {density}")
    d = density.detach().double().cpu()
    return _clamp_to_mean(d / d.mean() * rho, rho, alpha_min)


def uniform_budgets(num_layers: int, rho: float) -> LayerBudgets:
    """The same fraction ``rho`` in every layer."""
    _check_rho(rho, 0.0)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got {num_layers}")
    return _clamp_to_mean(torch.full((num_layers,), float(rho), dtype=torch.float64), rho, 0.0)


def fractions_to_counts(alpha: Tensor, n_tokens: Tensor | int) -> Tensor:
    """Integer kept tokens per layer and batch row, by largest-remainder rounding.

    ``counts[l, b]`` is ``floor`` or ``ceil`` of ``alpha_l * n_b`` (so ``|count - alpha n| < 1``) and in
    ``[1, n_b]``; per row, ``sum_l counts == round(sum_l alpha_l * n_b)`` (= ``round(rho L n)``) unless
    that total is below ``L`` (every layer keeps at least one token).

    Args:
        alpha: ``[L]`` fractions in [0, 1].
        n_tokens: ``LongTensor [B]`` valid tokens per row (>= 1), or an int.

    Returns:
        ``LongTensor [L, B]`` (``B = 1`` for an int).
    """
    alpha = alpha.detach().double()
    if alpha.dim() != 1 or not ((alpha >= 0) & (alpha <= 1)).all():
        raise ValueError("alpha must be a 1-D tensor of fractions in [0, 1]")
    n = torch.as_tensor(n_tokens, device=alpha.device).reshape(-1)
    if n.is_floating_point() or (n < 1).any():
        raise ValueError(f"n_tokens must be integer counts >= 1; got {n_tokens!r}")
    n = n.double()
    exact = alpha[:, None] * n  # [L, B]
    base = exact.floor().clamp_min(1.0)
    remainder = exact - base  # < 0 for layers raised to one token: never rounded up
    extra = (torch.round(exact.sum(dim=0)) - base.sum(dim=0)).clamp_min(0.0)  # [B]
    rank = remainder.argsort(dim=0, descending=True, stable=True).argsort(dim=0)
    counts = base + ((rank < extra) & (remainder > 0)).double()
    return counts.long()


def head_budgets(scores: Tensor, keep: Tensor | int, valid: Tensor, *, floor_fraction: float = 0.2) -> Tensor:
    """AdaKV split of one layer's budget over its KV heads.

    Every head first gets ``floor(floor_fraction * keep)`` tokens (its own best ones); the remaining
    ``Hkv * (keep - floor)`` go to the heads owning the globally top-scored remaining keys (flattened over
    heads). ``keep`` is first capped at the row's valid tokens, so ``sum_h counts == Hkv * min(keep, n)``
    and every head count is ``<= n``.

    Args:
        scores: ``[B, Hkv, N]``; valid: ``BoolTensor [B, N]``.
        keep: ``LongTensor [B]`` mean tokens per head (a layer's count), or an int.
        floor_fraction: share of the budget spread uniformly, in [0, 1].

    Returns:
        ``LongTensor [B, Hkv]``.
    """
    if scores.dim() != 3 or valid.dtype != torch.bool or valid.shape != (scores.shape[0], scores.shape[2]):
        raise ValueError(
            f"scores must be [batch, kv_heads, tokens] and valid bool [batch, tokens]; got "
            f"{tuple(scores.shape)} and {valid.dtype} {tuple(valid.shape)}"
        )
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1]; got {floor_fraction}")
    batch, heads, n_tokens = scores.shape
    keep = torch.as_tensor(keep, device=scores.device).long().reshape(-1).expand(batch)
    if (keep < 0).any():
        raise ValueError("keep must be >= 0")
    n_valid = valid.sum(dim=1)
    keep = torch.minimum(keep, n_valid)
    floor = (keep.double() * floor_fraction).floor().long()  # [B]
    ranked = scores.float().masked_fill(~valid[:, None], float("-inf")).sort(dim=-1, descending=True).values
    rank = torch.arange(n_tokens, device=scores.device)
    candidate = (rank >= floor[:, None, None]) & (rank < n_valid[:, None, None])  # [B, Hkv, N]
    finite_min = torch.finfo(torch.float32).min
    pool = torch.where(candidate, ranked.clamp_min(finite_min), float("-inf")).flatten(1)  # [B, Hkv*N]
    remaining = heads * (keep - floor)  # [B]
    width = int(remaining.max()) if batch else 0
    picked = pool.topk(width, dim=1).indices // n_tokens  # head of each pick, [B, width]
    taken = (torch.arange(width, device=scores.device) < remaining[:, None]).long()
    counts = floor[:, None].expand(batch, heads).clone()
    return counts.scatter_add_(1, picked, taken)


# allocator(statistic [L] or None, num_layers, rho, tau, alpha_min) -> LayerBudgets
ALLOCATORS: dict[str, Callable[[Tensor | None, int, float, float, float], LayerBudgets]] = {
    "uniform": lambda stat, layers, rho, tau, alpha_min: uniform_budgets(layers, rho),
    "pyramid": lambda stat, layers, rho, tau, alpha_min: pyramid_budgets(layers, rho, alpha_min=alpha_min),
    "entropy": lambda stat, layers, rho, tau, alpha_min: entropy_budgets(stat, rho, tau=tau, alpha_min=alpha_min),
    "density": lambda stat, layers, rho, tau, alpha_min: density_budgets(stat, rho, alpha_min=alpha_min),
}
