"""The 95% accuracy intervals that ``meda kv eval`` records and prints."""

import math

import pytest

from meda.kv.eval.intervals import accuracy_interval, wilson_interval
from meda.kv.eval.merge import merge_payloads
from meda.kv.eval.output import markdown_table


def wilson_by_bisection(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval by its definition, found by bisection: the shares p whose score statistic
    |k/n - p| / sqrt(p(1-p)/n) is at most z (a slow reference for the closed form)."""

    def inside(p: float) -> bool:
        return abs(successes / trials - p) <= z * math.sqrt(p * (1 - p) / trials) + 1e-15

    def edge(lo: float, hi: float) -> float:  # lo inside, hi outside (or the reverse)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) == inside(lo) else (lo, mid)
        return (lo + hi) / 2

    share = successes / trials
    low = 0.0 if successes == 0 else edge(share, 0.0)
    high = 1.0 if successes == trials else edge(share, 1.0)
    return low, high


@pytest.mark.parametrize(("successes", "trials"), [(0, 1), (1, 1), (0, 10), (5, 10), (21, 25), (6, 6), (5, 6), (1, 12)])
def test_wilson_interval_matches_its_definition(successes: int, trials: int) -> None:
    low, high = wilson_interval(successes, trials)
    ref_low, ref_high = wilson_by_bisection(successes, trials)
    assert math.isclose(low, ref_low, abs_tol=1e-9) and math.isclose(high, ref_high, abs_tol=1e-9)
    assert low <= successes / trials <= high


def test_wilson_interval_known_values_and_bad_input() -> None:
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)  # the textbook "rule of three"-like bound
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must lie in 0\.\.3"):
        wilson_interval(4, 3)


def test_accuracy_interval_only_for_exact_match_scores() -> None:
    assert accuracy_interval([1.0, 0.0, 1.0, 1.0]) == pytest.approx(list(wilson_interval(3, 4)))
    assert accuracy_interval([1.0, 0.4]) is None  # ROUGE-L of open answers: not a binomial share
    assert accuracy_interval([]) is None


def shard(seed: int, scores: list[float]) -> dict:
    run = {
        "task": "t", "method": "full", "budget": 1.0, "accuracy": sum(scores) / len(scores), "samples": len(scores),
        "accuracy_interval": accuracy_interval(scores), "fidelity": {"reference": True},
        "accuracy_by_size": {"8": sum(scores) / len(scores)}, "kept_fraction": 1.0, "prompt_tokens": 10.0,
        "seconds": 1.0,
    }  # fmt: skip
    return {"model": "m", "runs": [run], "config": {"seed": seed, "samples": len(scores)}}


def test_merged_cells_recompute_the_interval_from_all_samples() -> None:
    (merged,) = merge_payloads([shard(0, [1.0, 1.0]), shard(2, [0.0, 1.0, 1.0])])["runs"]
    assert merged["accuracy_interval"] == pytest.approx(list(wilson_interval(4, 5)))
    older = shard(5, [1.0])
    del older["runs"][0]["accuracy_interval"]  # written before intervals were recorded
    (mixed,) = merge_payloads([shard(0, [1.0, 1.0]), older])["runs"]
    assert mixed["accuracy_interval"] is None and mixed["samples"] == 3


def test_table_shows_the_full_cache_interval_and_what_one_sample_weighs() -> None:
    scores = [1.0] * 21 + [0.0] * 4
    runs = [shard(0, scores)["runs"][0], {**shard(0, scores)["runs"][0], "method": "meda", "budget": 0.2,
                                           "fidelity": {"token_agreement": 1.0, "kl": 0.0}}]  # fmt: skip
    table = markdown_table({"model": "m", "runs": runs})
    assert "| full (budget 1.0) | 0.840 [0.65, 0.94] |" in table
    assert "With 25 samples one answer is 0.040 of a cell; 95% intervals (Wilson): all right [0.87, 1.00]" in table
    graded = [{**r, "accuracy_interval": None} for r in runs]
    assert "[0.65" not in markdown_table({"model": "m", "runs": graded})
    assert "Wilson" not in markdown_table({"model": "m", "runs": graded})
