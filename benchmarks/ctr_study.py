"""MEDA against the other multi-epoch remedies, per synthetic preset, over several seeds.

For each preset (zipf, criteo, low-cardinality, days), model (DNN, DeepFM) and seed it trains
every method of :data:`METHODS` once, writes each run's ``metrics.json`` under ``--out``
(a run already there is skipped: the study resumes), then writes
``docs/results/ctr_study.json`` and the tables of ``docs/ctr-results.md``.

    nice -n 10 .venv/bin/python benchmarks/ctr_study.py --rows 100000 --seeds 0,1,2

``one-epoch`` is read from epoch 1 of the ``multi-epoch`` run (same seed, same first pass:
the two modes' first epochs are identical by construction), so it costs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from meda.ctr import synthetic
from meda.ctr.data import load_dataset
from meda.ctr.train import TrainConfig, train

AR = {"ar_alpha": 0.1, "ar_decay": 100.0}  # chosen on zipf validation AUC (seed 0), see docs/ctr-results.md
AR_FLAGS = "--optimizer adamar " + " ".join(f"--optimizer-option {k}={v}" for k, v in AR.items())
# method -> (TrainConfig fields, extra `meda ctr train` flags that give the same run)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "multi-epoch": ({"mode": "multi-epoch"}, "--mode multi-epoch"),
    "bars": ({"mode": "multi-epoch", "embedding_l2": 1e-5, "lr_plateau_factor": 0.1, "patience": 2},
             "--mode multi-epoch --schedule bars"),
    "meda": ({"mode": "meda"}, "--mode meda"),
    "meda-continual": ({"mode": "meda-continual"}, "--mode meda-continual --chunks 4"),
    "adamar": ({"mode": "multi-epoch", "optimizer": "adamar", "optimizer_options": AR},
               f"--mode multi-epoch {AR_FLAGS}"),
    "meda+adamar": ({"mode": "meda", "optimizer": "adamar", "optimizer_options": AR},
                    f"--mode meda {AR_FLAGS}"),
}  # fmt: skip
# what the defaults do (DNN): per variant its preset, data options (load_dataset), config fields and CLI flags
ABLATIONS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "zipf: defaults": ("zipf", {}, {}, ""),
    "zipf: min-count 5": ("zipf", {"min_count": 5}, {}, "--min-count 5"),
    "zipf: init-std 1.0": ("zipf", {}, {"init_std": 1.0}, "--init-std 1.0"),
    "zipf: adagrad lr 0.01": ("zipf", {}, {"optimizer": "adagrad", "lr": 0.01}, "--optimizer adagrad --lr 0.01"),
    "criteo: defaults (numeric log)": ("criteo", {}, {}, ""),
    "criteo: numeric log-bucket": ("criteo", {"numeric": "log-bucket"}, {}, "--numeric log-bucket"),
}
FORMATS = {"criteo": "criteo"}  # preset -> file format (others: parquet)
SMALL = {"embedding_dim": 16, "hidden_units": (256, 128), "batch_size": 2048, "lr": 1e-3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ctr_study", help="Run folders (resumable).")
    ap.add_argument("--rows", type=int, default=100_000, help="Rows generated per preset.")
    ap.add_argument("--seeds", default="0,1,2", help="Seeds of split, init and shuffling.")
    ap.add_argument("--presets", default="zipf,criteo,low-cardinality,days")
    ap.add_argument("--models", default="dnn,deepfm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=3, help="Epochs (bars: at most 2x this; continual: k=2).")
    ap.add_argument("--ablation-seeds", default="0", help="Seeds of the defaults ablation ('' = skip).")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="Ablation variants (comma list).")
    ap.add_argument("--report-only", action="store_true", help="Train nothing: tabulate the runs already there.")
    ap.add_argument("--json", default="docs/results/ctr_study.json")
    ap.add_argument("--doc", default="docs/ctr-results.md")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs: list[dict[str, Any]] = []
    for seed in seeds:  # seed outermost: one complete seed first, so partial results cover every cell
        for preset in args.presets.split(","):
            data = _data_file(out, preset, args.rows)
            dataset = None
            for model in args.models.split(","):
                for method in args.methods.split(","):
                    fields, flags = METHODS[method]
                    epochs = {"bars": 2 * args.epochs, "meda-continual": 2}.get(method, args.epochs)
                    run_dir = out / preset / model / method / f"seed{seed}"
                    if not (run_dir / "metrics.json").exists():
                        if args.report_only:
                            continue
                        dataset = dataset or _dataset(data, preset, seed)
                        cfg = TrainConfig(model=model, epochs=epochs, seed=seed, **SMALL, **fields)
                        started = time.time()
                        train(dataset, cfg, run_dir)
                        print(f"{preset} {model} {method} seed {seed}: {time.time() - started:.1f}s", flush=True)
                    cmd = _command(data, preset, model, epochs, seed, flags)
                    runs.append(_summary(run_dir, preset, model, method, seed, cmd))
    for seed in [int(s) for s in args.ablation_seeds.split(",") if s]:
        for name in [a for a in args.ablations.split(",") if a]:
            preset, data_opts, fields, flags = ABLATIONS[name]
            data, dataset = _data_file(out, preset, args.rows), None
            for mode in ("multi-epoch", "meda"):
                run_dir = out / "ablation" / name.replace(": ", "_").replace(" ", "_") / mode / f"seed{seed}"
                if not data_opts and not fields:  # the defaults are the main study's runs
                    run_dir = out / preset / "dnn" / mode / f"seed{seed}"
                if not (run_dir / "metrics.json").exists():
                    if args.report_only:
                        continue
                    dataset = dataset or _dataset(data, preset, seed, **data_opts)
                    cfg = TrainConfig(model="dnn", mode=mode, epochs=args.epochs, seed=seed, **{**SMALL, **fields})
                    train(dataset, cfg, run_dir)
                    print(f"ablation {name} {mode} seed {seed}", flush=True)
                cmd = _command(data, preset, "dnn", args.epochs, seed, f"--mode {mode} {flags}".strip())
                runs.append(_summary(run_dir, preset, "dnn", mode, seed, cmd, ablation=name))
    payload = {"rows": args.rows, "epochs": args.epochs, "settings": SMALL, "adamar": AR, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    _write_tables(payload, Path(args.doc))
    print(f"wrote {args.json} and the tables of {args.doc}")


def _data_file(out: Path, preset: str, rows: int) -> Path:
    fmt = FORMATS.get(preset, "parquet")
    path = out / "data" / f"{preset}_{rows}.{'tsv' if fmt == 'criteo' else 'parquet'}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic.write(synthetic.generate(preset, rows, seed=0), path, fmt, synthetic.schema_for(preset, fmt))
    return path


def _dataset(path: Path, preset: str, seed: int, **options: Any) -> Any:
    fmt = FORMATS.get(preset, "parquet")
    return load_dataset(path, fmt, seed=seed, **options)


def _command(data: Path, preset: str, model: str, epochs: int, seed: int, flags: str) -> str:
    fmt = FORMATS.get(preset, "parquet")
    return (f"meda ctr train --data {data} --format {fmt} --model {model} {flags} --epochs {epochs} "
            f"--seed {seed} --out RUN")  # fmt: skip


def _summary(run_dir: Path, preset: str, model: str, method: str, seed: int, cmd: str, **extra: Any) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    epochs = m["epochs"]
    return {
        "preset": preset, "model": model, "method": method, "seed": seed, **extra,
        "epoch1_test_auc": epochs[0]["test_auc"], "last_test_auc": epochs[-1]["test_auc"],
        "best_epoch": m["best"]["epoch"], "best_test_auc": m["best"]["test_auc"],
        "best_test_logloss": m["best"]["test_logloss"], "epochs_run": len(epochs),
        "test_auc_per_epoch": [e["test_auc"] for e in epochs],
        "seconds": round(sum(e["seconds"] for e in epochs), 1), "command": cmd,
    }  # fmt: skip


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def _write_tables(payload: dict[str, Any], doc: Path) -> None:
    """Replace the generated part of ``doc`` (between the two markers) with one table per preset."""
    runs = [r for r in payload["runs"] if "ablation" not in r]
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in runs):
        models = list(dict.fromkeys(r["model"] for r in runs if r["preset"] == preset))
        lines += [f"### {preset}", "", "| method | " + " | ".join(
            f"{m} best-valid epoch | {m} last epoch" for m in models) + " | epochs (best) |",
            "|---|" + "---|---|" * len(models) + "---|"]  # fmt: skip
        rows = [("one-epoch", "multi-epoch", "epoch1_test_auc", "epoch1_test_auc")]
        rows += [(m, m, "best_test_auc", "last_test_auc") for m in METHODS]
        for label, method, best_key, last_key in rows:
            cells, best_epochs = [], []
            for model in models:
                sel = [r for r in runs if (r["preset"], r["model"], r["method"]) == (preset, model, method)]
                cells += [_stat([r[best_key] for r in sel]), _stat([r[last_key] for r in sel])]
                best_epochs += [r["best_epoch"] if label != "one-epoch" else 1 for r in sel]
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {sorted(best_epochs)} |")
        lines += ["", "Commands (seed 0; `--seed 1`, `--seed 2` for the others):", ""]
        for model in models:
            for r in runs:
                if (r["preset"], r["model"], r["seed"]) == (preset, model, 0):
                    lines.append(f"- {r['method']}: `{r['command']}`")
        lines.append("")
    ablation = [r for r in payload["runs"] if "ablation" in r]
    if ablation:
        lines += ["### what the defaults do (DNN)", "",
                  "| variant | multi-epoch epoch 1 | multi-epoch last | meda best-valid | meda last | flags |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, (_, _, _, flags) in ABLATIONS.items():
            multi = [r for r in ablation if r["ablation"] == name and r["method"] == "multi-epoch"]
            meda = [r for r in ablation if r["ablation"] == name and r["method"] == "meda"]
            if multi or meda:
                lines.append(
                    f"| {name} | {_stat([r['epoch1_test_auc'] for r in multi])} | "
                    f"{_stat([r['last_test_auc'] for r in multi])} | {_stat([r['best_test_auc'] for r in meda])} | "
                    f"{_stat([r['last_test_auc'] for r in meda])} | `{flags or '(none)'}` |"
                )
        lines.append("")
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    text = doc.read_text() if doc.exists() else f"# CTR results\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n" + "\n".join(lines) + f"\n{end}{tail}")


if __name__ == "__main__":
    main()
