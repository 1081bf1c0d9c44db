"""How well meda-vlm-mini's vision side tells items apart, without the language model.

For ``--images`` rendered images (random items and placements, seed ``--seed``), the share whose colour
half / kind half of the projected image tokens (averaged) is nearest to the right target word embedding
(:func:`meda.kv.vlm.train.vision_accuracy`'s rule; and the colour-and-kind third of weights trained with
``--align-conjunction``), overall and per kind.

    python benchmarks/vlm_vision_accuracy.py                                  # the shipped weights
    python benchmarks/vlm_vision_accuracy.py --weights runs/vlm/meda-vlm-mini # a training run's weights
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

import torch

from meda.kv.eval.tasks_mm import ITEMS, random_placement, render
from meda.kv.vlm.data import ITEM_NAMES
from meda.kv.vlm.train import image_tokens_of, item_targets, target_parts
from meda.kv.vlm.weights import SHIPPED_DIR, assemble, read_meta

PART_NAMES = ("colour", "kind", "both")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=SHIPPED_DIR, help="folder with vision/lora safetensors")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    model, processor = assemble(args.weights)
    conjunction = bool(read_meta(args.weights).get("align_conjunction", False))
    rng = random.Random(args.seed)
    items = [rng.choice(ITEMS) for _ in range(args.images)]
    pixels = processor.image_processor([render(i, random_placement(rng)) for i in items], return_tensors="pt")
    with torch.no_grad():
        tokens = image_tokens_of(model, pixels["pixel_values"], torch.device("cpu"), autocast=False)
    classes = torch.tensor([ITEM_NAMES.index(i.describe()) for i in items])
    right = [
        torch.cdist(half.mean(1), candidates).argmin(1) == label[classes]
        for half, candidates, label in target_parts(tokens, item_targets(model, processor.tokenizer, conjunction))
    ]
    shares = "  ".join(f"{name} {ok.float().mean():.3f}" for name, ok in zip(PART_NAMES, right, strict=False))
    every = torch.stack(right).all(0).float().mean()
    print(f"{shares}  all parts {every:.3f}  ({args.weights})")
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, right[1].tolist(), strict=True):
        per_kind[item.kind].append(ok)
    print("kind right, per kind: " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in per_kind.items()))


if __name__ == "__main__":
    main()
