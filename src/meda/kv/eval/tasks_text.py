"""Synthetic long-context text tasks (RULER-like): passkey, multi-key needle, variable tracking.

Each task builds a prompt of about ``size`` tokens from a seed: filler sentences with one or more
"needles" at seeded depths, and a question at the end whose answer is a number. Nothing is downloaded.
Lengths are estimated from characters (:data:`CHARS_PER_TOKEN`, measured on SmolLM2's tokenizer with
this filler: 90 characters = 25 tokens); the harness records the real prompt length of every sample.

Scoring is exact match on the first number the model writes (:func:`first_number_match`): small
instruct models answer "The pass key is 71432." as often as "71432".
"""

from __future__ import annotations

import itertools
import random
import re

from meda.kv.eval.tasks import Sample, TaskSpec, register

CHARS_PER_TOKEN = 3.6
TEXT_SIZES = (1024, 2048, 4096, 8192)
_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_WORDS = (
    "apple", "river", "candle", "forest", "marble", "pepper", "silver", "tunnel", "violet", "window",
    "anchor", "basket", "copper", "desert", "feather", "garden", "harbor", "island", "jacket", "kettle",
    "lemon", "meadow", "needle", "orange", "pillow", "quartz", "rocket", "saddle", "throne", "walnut",
)  # fmt: skip
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER = re.compile(r"\d+")


def first_number_match(prediction: str, sample: Sample) -> float:
    """1.0 when the first run of digits in ``prediction`` equals ``sample.answer``, else 0.0."""
    found = _NUMBER.search(prediction)
    return float(found is not None and found.group() == sample.answer.strip())


def _filler(tokens: int) -> list[str]:
    """Filler sentences totalling about ``tokens`` tokens (at least one sentence)."""
    out: list[str] = []
    chars = 0
    while chars < tokens * CHARS_PER_TOKEN or not out:
        sentence = _FILLER[len(out) % len(_FILLER)]
        out.append(sentence)
        chars += len(sentence) + 1
    return out


def _haystack(rng: random.Random, size: int, needles: list[str], overhead: int) -> tuple[str, list[float]]:
    """Filler of about ``size - overhead`` tokens with ``needles`` inserted at seeded depths (returned)."""
    sentences = _filler(max(size - overhead, 16))
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    order = list(needles)
    rng.shuffle(order)
    for offset, (depth, needle) in enumerate(zip(depths, order, strict=True)):
        sentences.insert(round(depth * (len(sentences) - offset)) + offset, needle)
    return " ".join(sentences), depths


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(3))


def make_passkey(seed: int, size: int) -> Sample:
    """One pass key (a 5-digit number) hidden in about ``size`` tokens of filler."""
    rng = random.Random(f"passkey-{seed}-{size}")
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body, depths = _haystack(rng, size, [needle], overhead=70)
    text = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        f"Find it and memorize it.\n\n{body}\n\nWhat is the pass key? Answer with the number only."
    )
    return Sample(text=text, answer=key, meta={"size": size, "depth": round(depths[0], 3)})


def make_multikey(seed: int, size: int, keys: int = 4) -> Sample:
    """``keys`` magic numbers for different words; the question asks for one of them."""
    rng = random.Random(f"multikey-{seed}-{size}")
    words = rng.sample(_WORDS, keys)
    numbers = [_number(rng) for _ in words]
    needles = [f"The special magic number for {w} is: {n}." for w, n in zip(words, numbers, strict=True)]
    body, _ = _haystack(rng, size, needles, overhead=60 + 15 * keys)
    asked = rng.randrange(keys)
    text = (
        "Some special magic numbers are hidden inside the following text. Memorize them.\n\n"
        f"{body}\n\nWhat is the special magic number for {words[asked]}? Answer with the number only."
    )
    return Sample(text=text, answer=numbers[asked], meta={"size": size, "keys": keys, "asked": words[asked]})


def make_vartrack(seed: int, size: int, hops: int = 2, chains: int = 2) -> Sample:
    """``chains`` chains of ``hops`` variable copies (``VAR B = VAR A.``) from a number; ask for the
    value of the last variable of one chain."""
    rng = random.Random(f"vartrack-{seed}-{size}")
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        if (name := _name(rng)) not in names:
            names.append(name)
    statements, finals, values = [], [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        values.append(_number(rng))
        statements.append(f"VAR {chain[0]} = {values[-1]}.")
        statements += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
        finals.append(chain[-1])
    body = _ordered_haystack(rng, size, statements, overhead=80 + 8 * len(statements), chains=chains)
    asked = rng.randrange(chains)
    text = (
        "Memorize and track the chain(s) of variable assignments hidden in the following text.\n\n"
        f"{body}\n\nWhat is the numeric value of VAR {finals[asked]}? Answer with the number only."
    )
    return Sample(text=text, answer=values[asked], meta={"size": size, "hops": hops, "chains": chains})


def _ordered_haystack(rng: random.Random, size: int, statements: list[str], overhead: int, chains: int) -> str:
    """Like :func:`_haystack` but each chain's statements keep their order (interleaved between chains)."""
    sentences = _filler(max(size - overhead, 16))
    per_chain = len(statements) // chains
    slots = sorted(rng.sample(range(1, len(sentences)), len(statements)))
    # deal the sorted slots so chain c's i-th statement comes before its (i+1)-th
    placed = sorted(
        zip(slots, [statements[c * per_chain + i] for i in range(per_chain) for c in range(chains)], strict=True)
    )
    for offset, (slot, statement) in enumerate(placed):
        sentences.insert(slot + offset, statement)
    return " ".join(sentences)


for _spec in (
    TaskSpec(
        "passkey", "text", make_passkey, TEXT_SIZES, 12, first_number_match,
        "a 5-digit pass key hidden in filler text (RULER niah_single)",
    ),
    TaskSpec(
        "multikey", "text", make_multikey, TEXT_SIZES, 12, first_number_match,
        "4 word->number needles in filler; recall the number of one word (RULER niah_multikey)",
    ),
    TaskSpec(
        "vartrack", "text", make_vartrack, TEXT_SIZES, 12, first_number_match,
        "2 chains of 2 variable copies in filler; give the value of a chain's last variable (RULER vt)",
    ),
):  # fmt: skip
    register(_spec)
