"""Streaming at scale on CPU: peak RSS and rows/s of the encoding passes and of one training epoch,
at several numbers of rows, to show that memory does not grow with the rows.

Shards are hard links to one generated source file under distinct names (the row-hash split and
the shuffle treat them as different shards; rows repeat every source file, which is fine for
memory and speed, not for AUC). Each measurement runs in its own process, whose peak RSS
(``ru_maxrss``) is reported. Results are written after every measurement::

    meda ctr generate --preset criteo --rows 1000000 --out runs/scale/src0.parquet --format parquet
    nice -n 10 python benchmarks/ctr_stream_scale.py --source runs/scale/src0.parquet \\
        --encode-shards 10,20 --train-shards 2,4 --out runs/scale/result
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENCODE = """
import json, resource, sys, time
from meda.ctr.data import load_dataset
t = time.perf_counter()
ds = load_dataset(sys.argv[1], "parquet", cache_dir=sys.argv[2], shuffle_rows=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t, "rows_read": ds.report["rows_read"],
                  "split_sizes": ds.report["split_sizes"], "cache_hit": ds.report["cache"]["hit"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRAIN = """
import json, resource, sys
from meda.ctr.data import load_dataset
from meda.ctr.train import TrainConfig, train
ds = load_dataset(sys.argv[1], "parquet", cache_dir=sys.argv[2], shuffle_rows=int(sys.argv[3]))
cfg = TrainConfig(model=sys.argv[4], mode="one-epoch", batch_size=int(sys.argv[5]), embedding_dim=10,
                  eval_auc=sys.argv[6])
m = train(ds, cfg)
print(json.dumps({"train_rows": m["timing"][0]["train_rows"], "train_seconds": m["timing"][0]["train_seconds"],
                  "samples_per_s": m["timing"][0]["samples_per_s"], "test_auc": m["epochs"][0]["test_auc"],
                  "epoch_seconds": m["epochs"][0]["seconds"], "valid_rows": len(ds.valid), "test_rows": len(ds.test),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def shard_dir(source: Path, n: int, root: Path) -> Path:
    """A folder of ``n`` hard links to ``source`` (and its schema sidecar), named part-00000.parquet ..."""
    folder = root / f"shards_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = source.with_name(source.name + ".schema.json")
    (folder / "schema.json").write_bytes(sidecar.read_bytes())
    for i in range(n):
        link = folder / f"part-{i:05d}.parquet"
        if not link.exists():
            os.link(source, link)
    return folder


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="one generated parquet file (with its sidecar)")
    ap.add_argument("--encode-shards", default="10,20", help="shard counts for the encoding passes")
    ap.add_argument("--train-shards", default="2,4", help="shard counts for one training epoch")
    ap.add_argument("--model", default="dnn")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--shuffle-rows", type=int, default=500_000)
    ap.add_argument("--eval-auc", default="auto", choices=("auto", "exact", "binned"), help="as meda ctr train's")
    ap.add_argument("--out", type=Path, required=True, help="folder: result.json, result.md, shards, caches")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"source": str(args.source), "encode": [], "train": [], "started": time.strftime("%H:%M:%S")}

    def save() -> None:
        (args.out / "result.json").write_text(json.dumps(results, indent=1))
        lines = ["| pass | shards | rows | seconds | rows/s | peak RSS MB |", "|---|---|---|---|---|---|"]
        for r in results["encode"]:
            rate = r["rows_read"] / r["seconds"]
            lines.append(f"| encode (2 passes) | {r['shards']} | {r['rows_read']:,} | {r['seconds']:.0f} | "
                         f"{rate:,.0f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
        for r in results["train"]:
            label = f"train 1 epoch ({args.model}, batch {args.batch_size}, AUC {r.get('eval_auc', 'auto')})"
            lines.append(f"| {label} | {r['shards']} | "
                         f"{r['train_rows']:,} | {r['train_seconds']:.0f} | {r['samples_per_s']:,} | "
                         f"{r['peak_rss_mb']:.0f} |")  # fmt: skip
        (args.out / "result.md").write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)

    for n in (int(x) for x in args.encode_shards.split(",")):
        folder = shard_dir(args.source, n, args.out)
        r = run(ENCODE, str(folder), str(args.out / f"cache_{n}"), str(args.shuffle_rows))
        results["encode"].append({"shards": n, **r})
        save()
    for n in (int(x) for x in args.train_shards.split(",")):
        folder = shard_dir(args.source, n, args.out)
        cache = str(args.out / f"cache_{n}")
        run(ENCODE, str(folder), cache, str(args.shuffle_rows))  # encoded (or cached) first: training alone is timed
        r = run(TRAIN, str(folder), cache, str(args.shuffle_rows), args.model, str(args.batch_size), args.eval_auc)
        results["train"].append({"shards": n, "eval_auc": args.eval_auc, **r})
        save()


if __name__ == "__main__":
    main()
