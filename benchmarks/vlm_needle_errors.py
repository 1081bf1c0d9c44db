"""Where a VLM misses the needle: its full-cache mm-needle answers, by where the needle is and what it answered.

Answers held-out mm-needle samples (seeds ``--seed`` .. ``--seed + --samples - 1`` at each size) with the full
cache, greedy, as ``meda kv eval`` does, and sorts every wrong answer by what the image it names shows:

* ``colour`` / ``kind``: an image with the target's colour or its kind, not both (a half match: retrieval
  confused by one attribute);
* ``other``: an image that shares nothing with the target (the answer is not read from a matching image);
* ``not an image``: no number, or a number that names no image.

Accuracy is also given by where the needle is (quarters of the prompt), since a long prompt may be read well
only near its end, and where the image a wrong answer names stands against the needle (a model that finds the
needle but reads a neighbouring image's label names an image a few places off).

``--shuffle-labels`` numbers the images in a random order (``Image 41: ... Image 7: ...``; the answer is the
needle's label): a model that copies the label before the needle still answers right, one that works the
number out from the needle's place in the prompt answers that place (counted as ``gives its place``).
``--summarise`` re-prints the summary from earlier ``--json`` files.

    python benchmarks/vlm_needle_errors.py --model CKPT --sizes 16,64 --samples 12 --json OUT.json
    python benchmarks/vlm_needle_errors.py --model CKPT --sizes 64 --shuffle-labels --json OUT.json
    python benchmarks/vlm_needle_errors.py --summarise docs/results/vlm_needle_errors_*.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from meda.kv.eval.fidelity import full_cache_answer
from meda.kv.eval.harness import resolve_tasks
from meda.kv.eval.tasks_mm import make_needle
from meda.kv.vlm.data import shuffle_labels


def _named(answer: str) -> int | None:
    """The image number an answer names (its first word), or None."""
    try:
        return int(answer.split()[0].strip(".,"))
    except (ValueError, IndexError):
        return None


def kind_of_error(answer: str, truth: int, items: list[str | None], target: str) -> str:
    """What the answered image shows against ``target`` (``"red star"``); ``"right"`` for the truth."""
    named = _named(answer)
    if named is None:
        return "not an image"
    if named == truth:
        return "right"
    if not 1 <= named <= len(items) or items[named - 1] is None:
        return "not an image"
    shown = items[named - 1].replace(" digit", "").split(" ")
    wanted = target.replace(" digit", "").split(" ")
    if shown[0] == wanted[0]:
        return "colour"
    if shown[-1] == wanted[-1]:
        return "kind"
    return "other"


def summary(rows: list[dict]) -> str:
    """Per size: accuracy, accuracy per quarter of the needle's position, and the wrong answers by kind."""
    lines = []
    for size in sorted({r["size"] for r in rows}):
        of_size = [r for r in rows if r["size"] == size]
        accuracy = sum(r["error"] == "right" for r in of_size) / len(of_size)
        quarters = []
        for q in range(4):
            inside = [r for r in of_size if q * size / 4 < r["position"] <= (q + 1) * size / 4]
            right = sum(r["error"] == "right" for r in inside)
            quarters.append(f"{right}/{len(inside)}")
        wrong = Counter(r["error"] for r in of_size if r["error"] != "right")
        offsets = Counter(
            r["answered_place"] - r["position"]
            for r in of_size
            if r["error"] not in ("right", "not an image")
        )
        near = f"; place of the named image minus the needle's: {dict(sorted(offsets.items()))}" if offsets else ""
        if any(r["shuffled"] for r in of_size):
            near += f"; gives its place instead of its label: {sum(r['gives_place'] for r in of_size)}"
        lines.append(
            f"{size} images: accuracy {accuracy:.2f} ({len(of_size)} samples); right by needle quarter "
            f"{' '.join(quarters)}; wrong answers: {dict(wrong) or 'none'}{near}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="meda-vlm-mini", help="alias or checkpoint folder (default: the shipped VLM)")
    p.add_argument("--sizes", default="16,64", help="comma list of image counts")
    p.add_argument("--samples", type=int, default=12, help="samples per size")
    p.add_argument("--seed", type=int, default=0, help="first held-out seed (sample i uses seed + i)")
    p.add_argument("--shuffle-labels", action="store_true", help="number the images in a random order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write every answer here")
    p.add_argument("--summarise", type=Path, nargs="+", metavar="JSON", help="summarise earlier --json files only")
    args = p.parse_args()
    if args.summarise:
        for path in args.summarise:
            print(f"{path.name}:\n{summary(json.loads(path.read_text())['rows'])}")
        return

    from meda.kv.models import load_model

    model, processor = load_model(args.model, device=args.device)
    task = resolve_tasks(["mm-needle"])[0]
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for seed in range(args.seed, args.seed + args.samples):
            sample = make_needle(seed, size)
            position, items = sample.meta["position"], sample.meta["items"]
            labels = list(range(1, size + 1))
            if args.shuffle_labels:  # the numbering the training option --shuffle-labels draws, seeded per sample
                sample = shuffle_labels(sample, random.Random(f"shuffle/{seed}/{size}"))
                labels = sample.meta["labels"]
            answer = full_cache_answer(model, processor, sample, task.max_new_tokens, args.device)
            by_label = [items[labels.index(n)] for n in range(1, size + 1)]  # what the image labelled n shows
            truth, named = int(sample.answer), _named(answer)
            rows.append(
                {
                    "size": size,
                    "seed": seed,
                    "position": position,
                    "truth": truth,
                    "answer": answer,
                    "error": kind_of_error(answer, truth, by_label, sample.meta["target"]),
                    # where the image whose label the answer names stands (None: it names none)
                    "answered_place": labels.index(named) + 1 if named in labels else None,
                    "shuffled": args.shuffle_labels,
                    "gives_place": args.shuffle_labels and truth != position and named == position,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(summary(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model, "shuffle_labels": args.shuffle_labels, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
