"""Where a VLM miscounts on mm-count: its full-cache answer against the truth, per size and per error.

Answers every held-out mm-count sample (seeds ``--seed`` .. ``--seed + --samples - 1`` at each size) with the
full cache, greedy, as ``meda kv eval`` does, and prints accuracy per size, right answers per true count, a
table of (answer - truth) and the probability the model gives the true count (the softmax of the answer's
first token over the vocabulary, recorded per sample with the counts 1-9 as ``probs``): a smoother measure than
exact match, so that two runs' counting can be compared on fewer samples, and a way to tell a confident
miscount from a near miss.

    python benchmarks/vlm_count_errors.py --sizes 8,16,32,64 --samples 12 --json docs/results/vlm_count_errors_cpu.json
    python benchmarks/vlm_count_errors.py --model runs/vlm/checkpoint --device cuda     # a training run's weights
    python benchmarks/vlm_count_errors.py --sizes 16 --samples 24 --half-match 1   # every other image a hard negative
    python benchmarks/vlm_count_errors.py --summarise docs/results/vlm_count_errors_*_run_*.json   # no model run

``--summarise`` re-reads answer files written by ``--json`` and prints, per file and size, the accuracy and the
mean signed error (answer - truth; an answer that is not a number counts as 0 there and is counted apart): a
drift from over- to under-counting as the images grow is the sign that matches are diluted among more tokens.
It also regenerates each sample (no model) and counts its *half matches*, the other images that share the
target's colour or its kind but not both, for the right and the wrong answers apart: an over-count that comes
from half matches shows as more of them behind the wrong answers than behind the right ones of the same size.

``--half-match S`` draws that share of the other images among the items with the target's colour or its kind
(not both): hard negatives. The evaluation task (0) draws them uniformly, about 17% of them such items.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from meda.kv.eval.fidelity import full_cache_reference
from meda.kv.eval.harness import resolve_tasks
from meda.kv.eval.tasks_mm import make_count
from meda.kv.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="meda-vlm-mini", help="alias or checkpoint folder (default: the shipped VLM)")
    p.add_argument("--sizes", default="8,16,32,64", help="comma list of image counts")
    p.add_argument("--samples", type=int, default=12, help="samples per size")
    p.add_argument("--seed", type=int, default=0, help="first held-out seed (sample i uses seed + i)")
    p.add_argument("--half-match", type=float, default=0.0, help="share of hard negatives among the other images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write every answer here")
    p.add_argument("--summarise", type=Path, nargs="+", metavar="JSON", help="summarise earlier --json files only")
    args = p.parse_args()
    if args.summarise:
        for path in args.summarise:
            payload = json.loads(path.read_text())
            rows, half_match = payload["rows"], payload.get("half_match", 0.0)  # files before --half-match: 0
            print(f"{path.name}: {summary(rows)}\n  {by_truth(rows)}\n  {by_half_matches(rows, half_match)}")
            if line := by_probability(rows):
                print(f"  {line}")
        return

    model, processor = load_model(args.model, device=args.device)
    task = resolve_tasks(["mm-count"])[0]
    digits = digit_token_ids(getattr(processor, "tokenizer", processor))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for seed in range(args.seed, args.seed + args.samples):
            sample = make_count(seed, size, args.half_match)
            answer, reference = full_cache_reference(model, processor, sample, task.max_new_tokens, args.device)
            first = reference.log_probs[0].exp()  # the answer's first token: the count's digit
            rows.append(
                {
                    "size": size,
                    "seed": seed,
                    "truth": sample.answer,
                    "answer": answer,
                    "correct": bool(task.score(answer, sample)),
                    "probs": {d: round(float(first[i]), 4) for d, i in digits.items()},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(summary(rows))
    print(by_truth(rows))
    print(by_probability(rows))
    offsets = Counter(_offset(r) for r in rows)
    print("answer - truth:", ", ".join(f"{k}: {v}" for k, v in sorted(offsets.items(), key=lambda kv: str(kv[0]))))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model, "half_match": args.half_match, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


def summary(rows: list[dict]) -> str:
    """One line: per size, accuracy, mean signed error (answer - truth) and the samples behind them."""
    parts = []
    for size in sorted({r["size"] for r in rows}):
        of_size = [r for r in rows if r["size"] == size]
        offsets = [_offset(r) for r in of_size]
        numeric = [o for o in offsets if isinstance(o, int)]
        accuracy = sum(r["correct"] for r in of_size) / len(of_size)
        bad = f", {len(offsets) - len(numeric)} not a number" if len(numeric) < len(offsets) else ""
        mean = sum(numeric) / len(of_size)
        parts.append(f"{size} images: accuracy {accuracy:.2f}, mean error {mean:+.2f} ({len(of_size)} samples{bad})")
    return "; ".join(parts)


def by_truth(rows: list[dict]) -> str:
    """One line: right answers out of samples per true count, all sizes together (a model whose internal count
    saturates gets the low counts right and under-counts the high ones)."""
    tally: dict[int, list[int]] = {}
    for r in rows:
        right_total = tally.setdefault(int(r["truth"]), [0, 0])
        right_total[0] += bool(r["correct"])
        right_total[1] += 1
    return "right by true count: " + ", ".join(f"{k}: {r}/{n}" for k, (r, n) in sorted(tally.items()))


def digit_token_ids(tokenizer) -> dict[str, int]:
    """Token id of each count ``"1"``..``"9"`` as the answer's first token (one token each).

    Raises:
        ValueError: a tokenizer that splits a digit into several tokens or merges it with a space.
    """
    ids = {}
    for digit in "123456789":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer encodes {digit!r} as {len(encoded)} tokens; a count needs one")
        ids[digit] = encoded[0]
    return ids


def by_probability(rows: list[dict]) -> str:
    """One line: per size, the mean probability the model gives the true count (its first answer token) and
    the mean mass on the counts one away from it; files written before ``probs`` was recorded give ''."""
    if not all("probs" in r for r in rows):
        return ""
    parts = []
    for size in sorted({r["size"] for r in rows}):
        of_size = [r for r in rows if r["size"] == size]
        truth = [r["probs"].get(r["truth"], 0.0) for r in of_size]
        near = [sum(r["probs"].get(str(int(r["truth"]) + d), 0.0) for d in (-1, 1)) for r in of_size]
        parts.append(f"{size}: {sum(truth) / len(truth):.2f} (one away {sum(near) / len(near):.2f})")
    return "probability of the true count: " + "; ".join(parts)


def half_matches(seed: int, size: int, half_match: float = 0.0) -> int:
    """Images of the mm-count sample (``seed``, ``size``) that show the target's colour or its kind, not both."""
    sample = make_count(seed, size, half_match)
    colour, kind = sample.meta["render"][sample.meta["items"].index(sample.meta["target"])][0]
    return sum(1 for item, *_ in sample.meta["render"] if item and ((item[0] == colour) != (item[1] == kind)))


def by_half_matches(rows: list[dict], half_match: float = 0.0) -> str:
    """One line: per size, the half matches behind each right and each wrong answer (sorted)."""
    parts = []
    for size in sorted({r["size"] for r in rows}):
        tally: dict[bool, list[int]] = {True: [], False: []}
        for r in rows:
            if r["size"] == size:
                tally[bool(r["correct"])].append(half_matches(r["seed"], size, half_match))
        parts.append(f"{size}: right {sorted(tally[True])} wrong {sorted(tally[False])}")
    return "half matches per sample: " + "; ".join(parts)


def _offset(row: dict) -> int | str:
    try:
        return int(row["answer"].split()[0]) - int(row["truth"])
    except (ValueError, IndexError):
        return "not a number"


if __name__ == "__main__":
    main()
