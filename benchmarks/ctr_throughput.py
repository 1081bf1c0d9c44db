"""Training throughput of the CTR model zoo: samples/s of one epoch and its test AUC, per model and
batch size, side by side in one run (criteo preset, ``meda ctr train --mode one-epoch`` defaults:
dim 16, MLP 256-128, Adam 1e-3).

The data are generated once, written as Parquet and encoded through the normal path (cached);
the timed part is the training steps of the epoch (``timing`` in metrics.json: device
synchronised at the end of the pass), evaluation excluded. Variants (``--variants``) add bf16
autocast, torch.compile, the whole step as one CUDA graph (``graph``: ``--graph on``) and host-side
batches (``resident=off``, the path before batches were kept on the device) for the models in
``--variant-models``. A short warm-up run comes first.

    python benchmarks/ctr_throughput.py --device cuda --out runs/ctr_throughput --work /tmp/ctr_data  # H200: ~3-4 min
    python benchmarks/ctr_throughput.py --device cpu --rows 20000 --models dnn --batch-sizes 1024 \\
        --variants host --out /tmp/tp                                                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from meda.ctr import synthetic
from meda.ctr.data import load_dataset
from meda.ctr.models import MODELS
from meda.ctr.train import TrainConfig, train

VARIANTS = {
    "eager": {},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": "default"},
    "bf16+compile": {"precision": "bf16", "compile": "default"},
    "host": {"resident": "off"},
    "graph": {"graph": "on"},  # the whole step as one CUDA graph (CUDA only)
}


def dataset(rows: int, work: Path, seed: int, fmt: str):
    """The criteo preset with ``rows`` rows, generated once into ``work`` as Parquet or Criteo TSV (the file
    ``ctr_peers.py --work WORK`` reads) and encoded (cached in ``$MEDA_CACHE_DIR`` or meda's default cache)."""
    path = work / f"criteo_{rows}.{'tsv' if fmt == 'criteo' else 'parquet'}"
    if not path.exists():
        schema = synthetic.schema_for("criteo", fmt)
        synthetic.write(synthetic.generate("criteo", rows, seed=seed), path, fmt, schema)
    return load_dataset(path, fmt)


def measure(ds, model: str, batch: int, variant: str, device: str, seed: int) -> dict:
    cfg = TrainConfig(model=model, mode="one-epoch", batch_size=batch, device=device, seed=seed, **VARIANTS[variant])
    started = time.perf_counter()
    m = train(ds, cfg)
    t, e = m["timing"][0], m["epochs"][0]
    return {"model": model, "batch_size": batch, "variant": variant, "samples_per_s": t["samples_per_s"],
            "train_seconds": t["train_seconds"], "train_rows": t["train_rows"], "test_auc": e["test_auc"],
            "test_logloss": e["test_logloss"], "wall_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"device: {device}", "", "| model | batch | variant | samples/s | train s | test AUC |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['variant']} | {r['samples_per_s']:,} | "
                     f"{r['train_seconds']:.2f} | {r['test_auc']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=2_000_000, help="generated rows (8:1:1 split)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch-sizes", default="4096,16384")
    ap.add_argument("--variants", default="bf16,compile,host", help=f"extra variants from {sorted(VARIANTS)}")
    ap.add_argument("--variant-models", default="dnn,deepfm")
    ap.add_argument("--variant-batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="parquet", choices=("parquet", "criteo"), help="file the data are written to")
    ap.add_argument("--out", type=Path, required=True, help="folder: throughput.json, throughput.md")
    ap.add_argument("--work", type=Path, default=None, help="folder of the generated data and cache (default: --out)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = args.work or args.out
    work.mkdir(parents=True, exist_ok=True)
    ds = dataset(args.rows, work, args.seed, args.format)
    print(f"data ready in {time.perf_counter() - started:.1f} s: {ds.report['split_sizes']}", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    plan = [(m, b, "eager") for m in args.models.split(",") for b in batches]
    extra = [v for v in args.variants.split(",") if v]
    plan += [(m, args.variant_batch, v) for v in extra for m in args.variant_models.split(",")]
    measure(ds, "dnn", batches[0], "eager", args.device, args.seed)  # warm-up: allocator, kernels, threads
    rows: list[dict] = []
    for model, batch, variant in plan:
        rows.append(measure(ds, model, batch, variant, args.device, args.seed))
        r = rows[-1]
        print(f"{model:9s} batch {batch:6d} {variant:12s} {r['samples_per_s']:>10,} samples/s "
              f"test AUC {r['test_auc']:.4f} ({r['wall_seconds']:.1f} s)", flush=True)  # fmt: skip
        payload = {"device": args.device, "rows": args.rows, "split_sizes": ds.report["split_sizes"], "results": rows}
        (args.out / "throughput.json").write_text(json.dumps(payload, indent=1))
        (args.out / "throughput.md").write_text(markdown(rows, args.device))
    print(markdown(rows, args.device))
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
