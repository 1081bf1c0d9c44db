"""Merge the ``results.json`` of evaluation shards: one grid run as several processes over disjoint seeds.

A grid of methods x budgets on long prompts is launch-bound on a GPU, so it runs faster as several
processes side by side, each over its own seeds (``--seed 0 --samples 3``, ``--seed 3 --samples 3``, ...)
or its own tasks. :func:`merge_payloads` folds their payloads into the one that a single run over all
those samples would have written:

* every cell mean (accuracy, greedy prefix, kept fraction, prompt tokens) is a mean over samples, so
  shards are weighted by their samples (per size: by the samples of that size);
* token agreement and KL are means over compared positions, so shards are weighted by their positions;
* seconds add up;
* the accuracy's 95% interval is recomputed from the merged right answers where every shard's scores were
  0/1 (shards written before intervals were recorded, or with graded scores, leave it ``None``).

Shards must come from the same model, and two shards holding the same (task, method, budget) cell must
cover disjoint seeds (read from each payload's ``config`` and the cell's sample count): a sample counted
twice is refused, not averaged in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from meda.kv.eval.intervals import wilson_interval

Key = tuple[str, str, Any]


def _samples_per_size(run: dict[str, Any]) -> float:
    """Samples of one size in a cell: a run gives every size the same number of samples."""
    return run["samples"] / max(1, len(run.get("accuracy_by_size") or {}))


def _seeds(payload: dict[str, Any], run: dict[str, Any]) -> range:
    """Seeds a shard's cell covers: ``config.seed`` onwards, one per sample of each size."""
    seed = payload["config"]["seed"]
    return range(seed, seed + int(_samples_per_size(run)))


def _weighted(parts: Sequence[dict[str, Any]], value, weight) -> float | None:
    """Mean of ``value(run)`` over shards weighted by ``weight(run)``; shards with no value or weight skipped."""
    pairs = [(value(r), weight(r)) for r in parts]
    pairs = [(v, w) for v, w in pairs if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _merge_cell(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell from the same cell of several shards (see the module docstring for the weights)."""
    first = parts[0]
    by_samples = functools.partial(_weighted, parts, weight=lambda r: r["samples"])
    by_positions = functools.partial(_weighted, parts, weight=lambda r: r["fidelity"].get("positions", 0))
    sizes = sorted({size for r in parts for size in r.get("accuracy_by_size") or {}}, key=int)
    if first["fidelity"].get("reference"):
        fidelity = dict(first["fidelity"])
    else:
        fidelity = {
            "token_agreement": by_positions(lambda r: r["fidelity"]["token_agreement"]),
            "kl": by_positions(lambda r: r["fidelity"]["kl"]),
            "greedy_prefix": by_samples(lambda r: r["fidelity"]["greedy_prefix"]),
            "positions": sum(r["fidelity"].get("positions", 0) for r in parts),
        }
    accuracy = by_samples(lambda r: r["accuracy"])
    samples = sum(r["samples"] for r in parts)
    exact = accuracy is not None and all(r.get("accuracy_interval") for r in parts)
    return {
        "task": first["task"],
        "method": first["method"],
        "budget": first["budget"],
        "accuracy": accuracy,
        "accuracy_interval": list(wilson_interval(round(accuracy * samples), samples)) if exact else None,
        "samples": samples,
        "fidelity": fidelity,
        "accuracy_by_size": {
            size: _weighted(parts, lambda r, size=size: (r.get("accuracy_by_size") or {}).get(size), _samples_per_size)
            for size in sizes
        },
        "kept_fraction": by_samples(lambda r: r["kept_fraction"]),
        "prompt_tokens": by_samples(lambda r: r["prompt_tokens"]),
        "seconds": sum(r["seconds"] for r in parts),
    }


def merge_payloads(payloads: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``results.json`` payload of all shards together.

    Args:
        payloads: ``results.json`` payloads of ``meda kv eval`` runs (each with its ``config``).
        names: what to call each payload in errors (default ``shard 0``, ``shard 1``, ...).

    Raises:
        ValueError: no payloads, different models, a payload without ``config`` (its seeds are unknown),
            two shards that share a seed in the same cell, or shards of both question modes.
    """
    if not payloads:
        raise ValueError("nothing to merge: pass at least one folder holding a results.json")
    names = list(names or [f"shard {i}" for i in range(len(payloads))])
    models = {p["model"] for p in payloads}
    if len(models) > 1:
        raise ValueError(f"the shards evaluate different models ({', '.join(sorted(models))}); merge one at a time")
    for payload, name in zip(payloads, names, strict=True):
        if "config" not in payload:
            raise ValueError(
                f"{name}: results.json has no 'config', so its seeds are unknown; it was written by an older "
                "meda while still running. Re-run that shard, or add the config of the command that made it."
            )
    cells: dict[Key, list[tuple[str, dict[str, Any], range]]] = {}
    for payload, name in zip(payloads, names, strict=True):
        for run in payload["runs"]:
            key = (run["task"], run["method"], run["budget"])
            seeds = _seeds(payload, run)
            for other, _, taken in cells.get(key, []):
                if overlap := set(seeds) & set(taken):
                    raise ValueError(
                        f"{name} and {other} both hold seeds {min(overlap)}..{max(overlap)} of {key[0]} / {key[1]} / "
                        f"budget {key[2]}: give each shard its own --seed range"
                    )
            cells.setdefault(key, []).append((name, run, seeds))
    configs = [p["config"] for p in payloads]
    modes = {bool(c.get("question_after_compression")) for c in configs}
    if len(modes) > 1:
        raise ValueError(
            "some shards fed the question after compression and others did not: their figures measure different "
            "things; merge each kind on its own"
        )
    union = lambda field: list(dict.fromkeys(x for c in configs for x in (c.get(field) or [])))  # noqa: E731
    return {
        "model": models.pop(),
        "runs": [_merge_cell([run for _, run, _ in parts]) for parts in cells.values()],
        "seconds": max(p.get("seconds", 0.0) for p in payloads),  # shards run side by side: the longest one
        "config": {
            "tasks": union("tasks"),
            "methods": union("methods"),
            "budgets": union("budgets"),
            "sizes": union("sizes") or None,
            "device": ",".join(dict.fromkeys(str(c.get("device")) for c in configs)),
            "question_after_compression": modes.pop(),
            "shards": [
                {"name": n, "seed": c["seed"], "samples": c["samples"]} for n, c in zip(names, configs, strict=True)
            ],
        },
    }
