"""Where a CTR training step's time goes on the GPU: eager step, graphed loop step, and the graph replay alone.

At the sizes of ``ctr_peers.py`` (dim 10, MLP 400-400-400, batch 4096, Adam 1e-3) on its Criteo TSV, per model:

- ``eager``: the eager loop step (resident batch gather, forward, loss, backward, fused Adam, loss summed on device);
- ``graph``: the same loop step under ``--graph on`` (gather, copies into the static inputs, replay, loss sum);
- ``replay``: ``CUDAGraph.replay()`` alone, back to back: the GPU time of the captured step, the floor of ``graph``.

Each is timed over ``--steps`` consecutive batches of one epoch after the warm-up (and the capture), the device
synchronised before and after; ms per step and the samples/s it implies are printed and written as JSON.

    PYTHONPATH=src python3 benchmarks/ctr_graph_step.py --work /tmp/w --rows 2000000 --json $OUT/graph_step.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from meda.ctr.data import load_dataset
from meda.ctr.graph import WARM_UP
from meda.ctr.train import TrainConfig, Trainer

SIZES = {"embedding_dim": 10, "hidden_units": (400, 400, 400), "lr": 1e-3, "batch_size": 4096}


def _ms_per_step(run: Callable[[], object], steps: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / steps


def _time(trainer: Trainer, steps: int) -> dict[str, float]:
    """ms per loop step of ``trainer`` (and per replay alone when it is graphed), after its warm-up."""
    trainer.model.train()
    if trainer.graph is not None:
        trainer.graph.reset()
    batches = trainer.sources["train"].train_batches(SIZES["batch_size"], seed=0)
    total = torch.zeros((), dtype=torch.float64, device="cuda")  # the loss sum, as the training loop keeps it

    def loop_step() -> None:
        total.add_(trainer.train_step(next(batches)))

    for _ in range(WARM_UP + 1):  # eager warm-up, then (graph) the capture
        loop_step()
    if trainer.graph is None:
        return {"eager": _ms_per_step(loop_step, steps)}
    return {"graph": _ms_per_step(loop_step, steps), "replay": _ms_per_step(trainer.graph.graph.replay, steps)}


def measure(ds, model: str, steps: int) -> dict:
    """ms per step of the eager loop step, the graphed loop step and the replay alone, for one model."""
    options = {"cross_layers": 3} if model == "dcnv2" else {}
    out: dict = {"model": model, "steps": steps}
    for graph in ("off", "on"):
        cfg = TrainConfig(model=model, mode="one-epoch", device="cuda", graph=graph, model_options=options, **SIZES)
        out |= _time(Trainer(ds, cfg), steps)
    for key in ("eager", "graph", "replay"):
        out[f"{key}_samples_per_s"] = round(SIZES["batch_size"] / out[key] * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder holding ctr_peers.py's criteo_ROWS.tsv")
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--models", default="dnn,deepfm,dcnv2")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant (within one epoch)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ds = load_dataset(args.work / f"criteo_{args.rows}.tsv", "criteo", seed=0)
    if len(ds.train) < (args.steps + WARM_UP + 1) * SIZES["batch_size"]:
        raise SystemExit(f"--steps {args.steps} needs more training rows than {len(ds.train)}")
    rows = []
    for model in args.models.split(","):
        rows.append(measure(ds, model, args.steps))
        r = rows[-1]
        print(f"{model:7s} eager {r['eager']:.3f} ms ({r['eager_samples_per_s']:,}/s)  graph {r['graph']:.3f} ms "
              f"({r['graph_samples_per_s']:,}/s)  replay alone {r['replay']:.3f} ms ({r['replay_samples_per_s']:,}/s)",
              flush=True)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"sizes": {**SIZES, "hidden_units": list(SIZES["hidden_units"])},
                                             "rows": args.rows, "results": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
