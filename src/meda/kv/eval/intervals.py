"""How far a cell's accuracy can be trusted: the 95% Wilson score interval of a share of right answers.

With the 5-25 samples per cell that the tables in docs/results.md hold, one sample moves a cell by 4-20
points; the interval says which differences a grid can and cannot show (Wilson rather than the normal
approximation, which gives intervals of zero width at accuracy 0 or 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` right answers in ``trials``.

    Raises:
        ValueError: ``trials`` below 1, or ``successes`` outside ``0..trials``.
    """
    if trials < 1:
        raise ValueError(f"an interval needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in 0..{trials}, got {successes}")
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(scores: Sequence[float]) -> list[float] | None:
    """``[low, high]`` of the 95% Wilson interval when every score is 0 or 1 (exact match); ``None`` for
    graded scores (ROUGE-L of open answers), where a binomial interval does not apply, and for no scores."""
    if not scores or any(s not in (0.0, 1.0) for s in scores):
        return None
    return list(wilson_interval(int(sum(scores)), len(scores)))
