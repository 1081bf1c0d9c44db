"""What the mm-count training batches ask: the share of each count (1-6) among the answers, per size.

Draws ``--samples`` training samples of mm-count at each size with the follow-up turns that
``python -m meda.kv.vlm.train`` gives them (``--questions`` turns per sample) and prints, per size, the share of
the count answers equal to 1, ..., 6 and the count answers per sample. No model runs; a few seconds on a CPU.

    python benchmarks/vlm_count_targets.py                      # the options of runs 4-12 (default follow-ups)
    python benchmarks/vlm_count_targets.py --count-balance      # planted items, one turn per count

A model that cannot yet tell 4 matches from 5 among 64 images leans on how often each answer came up at that
size in training; without ``--count-balance`` 64-image samples ask mostly for 2 (an item of 128 drawn at random
shows up twice among 64 images far more often than 4-6 times).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from meda.kv.eval.tasks_mm import COUNT_RANGE, make_count
from meda.kv.vlm.data import TRAIN_SEED_START, follow_ups

VALUES = [str(v) for v in range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)]


def count_answers(size: int, samples: int, questions: int, half_match: float, balance: bool) -> Counter[str]:
    """How often each count is a training target over ``samples`` mm-count samples of ``size`` images."""
    answers: Counter[str] = Counter()
    for j in range(samples):
        seed = TRAIN_SEED_START + j
        sample = make_count(seed, size, half_match=half_match, plant=balance)
        turns = follow_ups("mm-count", sample, random.Random(seed), questions - 1, balance=balance)
        answers.update([sample.answer, *(a for _, a in turns)])
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8,16,32,64", help="comma list of image counts")
    p.add_argument("--samples", type=int, default=300, help="training samples drawn per size")
    p.add_argument("--questions", type=int, default=8, help="question-answer turns per sample (train.py's default)")
    p.add_argument("--half-match", type=float, default=0.25, help="--count-half-match of the runs compared")
    p.add_argument("--count-balance", action="store_true", help="train.py's --count-balance")
    args = p.parse_args()
    print(f"| images | {' | '.join(f'answer {v}' for v in VALUES)} | count answers per sample |")
    print(f"|---|{'---|' * len(VALUES)}---|")
    for size in (int(s) for s in args.sizes.split(",")):
        answers = count_answers(size, args.samples, args.questions, args.half_match, args.count_balance)
        total = sum(answers.values())
        shares = " | ".join(f"{answers[v] / total:.2f}" for v in VALUES)
        print(f"| {size} | {shares} | {total / args.samples:.1f} |")


if __name__ == "__main__":
    main()
