"""``meda ctr ...``: generate synthetic CTR data and train CTR models."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Train click-through-rate models for several epochs with MEDA (embedding "
        "re-initialisation every epoch) and compare with one-epoch and plain multi-epoch training.\n\n"
        "Typical flow: `meda ctr generate --preset zipf --rows 200000 --out data.parquet`, then "
        "`meda ctr train --data data.parquet --format parquet --model dnn --mode meda --epochs 4 "
        "--out runs/x`."
    ),
)



@app.command()
def generate(
    preset: str = typer.Option("zipf", help="zipf, low-cardinality, criteo or days."),
    rows: int = typer.Option(500_000, help="Number of impressions to generate."),
    out: Path = typer.Option(..., help="Output file (.tsv/.txt for criteo, .csv, .parquet)."),
    format: str | None = typer.Option(
        None, "--format", help="criteo (TSV; criteo preset only), csv or parquet; default: --out's suffix."
    ),
    seed: int = typer.Option(0, help="Random seed (same seed and options -> same file)."),
    cardinality: int | None = typer.Option(None, help="Values per ID field (criteo preset: cap per field)."),
    zipf: float | None = typer.Option(None, help="Zipf exponent of the ID fields (0 = uniform)."),
    noise: float | None = typer.Option(None, help="Std of the Gaussian noise added to the click logit."),
    days: int | None = typer.Option(None, help="Number of days (adds a day column; 0 = none)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write a synthetic CTR data set that shows one-epoch overfitting (or, as a control, does not).

    \b
    Presets:
      zipf             two Zipf ID fields of 100k values + 3 small fields (the epoch-2 drop)
      low-cardinality  the same with 500 values per ID field (no drop expected)
      criteo           13 count + 26 categorical fields, real Criteo TSV (--format criteo)
      days             the zipf preset over 10 days with drifting popularity (continual mode)

    csv and parquet files get a <out>.schema.json next to them, which `meda ctr train` reads.
    """
    import time

    from meda.ctr import synthetic
    from meda.report import print_json, print_table

    fmt = format or _format_from_suffix(out)
    knobs = {"cardinality": cardinality, "zipf": zipf, "noise": noise, "days": days}
    started = time.perf_counter()
    try:
        schema = synthetic.schema_for(preset, fmt, **knobs)
        table = synthetic.generate(preset, rows, seed=seed, **knobs)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    written = synthetic.write(table, out, fmt, schema)
    label = table["label"].to_numpy()
    summary = {
        "preset": preset,
        "rows": rows,
        "format": fmt,
        "files": [str(p) for p in written],
        "click_rate": float(label.mean()),
        "distinct_values": {
            c: len(table[c].unique()) for c in table.column_names if c in {f.name for f in schema.fields}
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    if json_out:
        print_json(summary)
        return
    print_table(f"{preset}: {rows} rows", ["column", "distinct values"], list(summary["distinct_values"].items()))
    print(f"click rate {summary['click_rate']:.3f}; wrote {', '.join(summary['files'])} in {summary['seconds']} s")


def _format_from_suffix(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in {".tsv", ".txt"}:
        return "criteo"
    if suffix in {".csv", ".parquet"}:
        return suffix[1:]
    raise typer.BadParameter(f"cannot tell the format of {out}; pass --format criteo, csv or parquet")


@app.command()
def train(
    data: str = typer.Option(
        ...,
        help="Training data: a file (split 8:1:1 at random, seeded), or a directory / quoted glob of shards "
        "(streamed in bounded memory; see --split-by).",
    ),
    format: str = typer.Option(..., "--format", help="criteo (TSV), avazu (CSV), csv or parquet."),
    out: Path = typer.Option(..., help="Output folder: metrics.json, checkpoint.pt, per-mode subfolders."),
    model: str = typer.Option("dnn", help="lr, fm, dnn, widedeep, deepfm, dcn, dcnv2, autoint or pnn."),
    mode: str = typer.Option(
        "meda", help="one-epoch, multi-epoch, meda, meda-continual, or a comma list to compare several."
    ),
    epochs: int = typer.Option(4, help="Epochs (meda-continual: k embedding groups = passes per chunk)."),
    valid: str | None = typer.Option(
        None, help="Separate validation file, directory or glob (--data is then train only)."
    ),
    test: str | None = typer.Option(None, help="Separate test file, directory or glob."),
    split_by: str = typer.Option("row", help="Shards: row (seeded hash of each row) or shard (whole shards)."),
    bad_shards: str = typer.Option("stop", help="Shards: stop at an unreadable shard, or skip it (reported)."),
    shuffle_rows: int = typer.Option(500_000, help="Shards: rows in the shuffle buffer (memory bound of training)."),
    schema: Path | None = typer.Option(None, help="csv/parquet schema JSON (default <data>.schema.json)."),
    min_count: int = typer.Option(1, help="Ids seen fewer times in train become OOV. >=5 hides the problem."),
    numeric: str = typer.Option("log", help="Numeric transform: log, standardise, raw, bucket, log-bucket."),
    batch_size: int = typer.Option(2048, help="Training batch size."),
    optimizer: str = typer.Option(
        "adam", help="adam, adagrad, sgd, or adamar / adagradar (adaptive per-row decay of the embeddings)."
    ),
    optimizer_option: list[str] = typer.Option(
        [], help="Embedding-group option KEY=VALUE (repeatable): adamar/adagradar take ar_alpha, ar_decay."
    ),
    schedule: str = typer.Option(
        "none", help="none, or bars: embedding L2 1e-5, LR / 10 on a plateau, early stop with patience 2."
    ),
    lr_plateau_factor: float | None = typer.Option(
        None, help="Multiply the LR by this after an epoch without improvement (bars: 0.1)."
    ),
    lr: float = typer.Option(1e-3, help="Learning rate (Adam 1e-3 is where one-epoch overfitting shows)."),
    embedding_dim: int = typer.Option(16, help="Embedding size per field."),
    hidden_units: str = typer.Option("256,128", help="MLP widths, comma-separated."),
    dropout: float = typer.Option(0.0, help="MLP dropout."),
    batch_norm: bool = typer.Option(False, help="Batch norm in the MLP."),
    model_option: list[str] = typer.Option(
        [], help="Model-specific option KEY=VALUE (repeatable), e.g. cross_layers=2, structure=stacked."
    ),
    embedding_l2: float | None = typer.Option(None, help="L2 (weight decay) on embeddings (default 0; bars: 1e-5)."),
    net_l2: float = typer.Option(0.0, help="L2 (weight decay) on the network."),
    init: str = typer.Option("normal", help="Embedding init: normal (std --init-std) or uniform (+-std)."),
    init_std: float = typer.Option(1e-4, help="Embedding init scale (FuxiCTR: 1e-4; 1.0 hides the drop)."),
    meda_min_cardinality: int = typer.Option(0, help="meda: re-initialise only fields with more ids."),
    meda_reset_optimizer: bool = typer.Option(
        True, help="meda: also reset the embeddings' optimiser state at each re-initialisation."
    ),
    serving: str = typer.Option("last", help="meda-continual serving: last, best (on valid) or ensemble."),
    chunks: int = typer.Option(4, help="meda-continual without a day column: number of ordered chunks."),
    monitor: str = typer.Option("valid_auc", help="Metric for the best epoch / early stopping."),
    patience: int | None = typer.Option(None, help="Stop after this many epochs without improvement."),
    seed: int = typer.Option(0, help="Seed of the split, init, shuffling and re-initialisations."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (CUDA when available)."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (autocast the forward pass; loss and updates fp32)."),
    compile: str = typer.Option(
        "off", help="torch.compile: off, default, reduce-overhead (CUDA graphs) or max-autotune."
    ),
    graph: str = typer.Option(
        "off",
        help="on: the whole training step (forward, loss, backward, optimiser) replayed as one CUDA graph, "
        "re-captured every epoch; the short last batch runs eagerly. CUDA only; adam, adagrad or sgd; refused "
        "with --sparse-grad, --compile, the torchrec backend and torchrun. metrics.json 'graph' counts the steps.",
    ),
    resident: str = typer.Option("auto", help="Keep in-memory splits on the device: auto (if it fits), on, off."),
    embedding_backend: str = typer.Option(
        "native", help="native tables, or torchrec (EmbeddingBagCollection; needs torchrec 1.8, see docs/ctr.md)."
    ),
    sparse_grad: bool = typer.Option(
        False,
        help="Sparse gradients for the embedding tables (only looked-up rows): adam -> SparseAdam for the tables, "
        "adagrad/sgd take them as is; the network keeps its optimiser. Refused with adamar/adagradar, "
        "--embedding-l2 / --schedule bars, --compile and the torchrec backend. SparseAdam is not Adam: docs/ctr.md.",
    ),
    eval_auc: str = typer.Option(
        "auto",
        help="Validation/test AUC: exact (keeps 12 bytes per evaluated row), binned (per-class histograms of "
        "2**16 logit bins on [-16, 16]: constant memory, error within the reported *_auc_bound, typically "
        "below 1e-4; refused for group AUC and meda-continual), or auto (exact up to 20M rows per split, "
        "else binned). metrics.json 'evaluation' says which was used.",
    ),
    eval_auc_bins: int = typer.Option(
        65536, help="Binned AUC: logit bins per class (16 bytes each); more bins, smaller error bound."
    ),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (0: epoch ends only)."),
    resume: bool = typer.Option(False, help="Continue the run checkpointed in --out (same settings)."),
    plot: bool = typer.Option(False, help="Write out/test_auc.png (test AUC per epoch, one line per mode)."),
    cache_dir: Path | None = typer.Option(None, help="Cache of encoded data (reused when inputs match)."),
    use_cache: bool = typer.Option(True, "--cache/--no-cache", help="Read/write the encoded-data cache."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of tables."),
) -> None:
    """Train a CTR model and write OUT/metrics.json (valid/test AUC and logloss per epoch).

    \b
    Example (synthetic data from `meda ctr generate`, or your own Criteo TSV / CSV / Parquet):
      meda ctr train --data day_0.txt --format criteo --model deepfm --mode meda --epochs 3 --out runs/criteo

    \b
    Modes:
      one-epoch       one pass over the data: the usual industrial baseline.
      multi-epoch     plain passes; with sparse high-cardinality ids and Adam 1e-3 the
                      test AUC typically FALLS at epoch 2 (one-epoch overfitting).
      meda            multi-epoch, but the embedding tables are re-initialised at the start
                      of every epoch after the first (fresh seed) while the MLP keeps
                      learning: the MLP sees each sample through a new embedding space.
      meda-continual  ordered chunks (days, or --chunks slices): k = --epochs embedding
                      groups share one MLP, each chunk is trained once per group after a
                      progressive evaluation on it; --serving picks last, best or ensemble.

    \b
    Defaults that decide whether you see the problem: --min-count 1 (rare ids kept),
    --init-std 1e-4, --optimizer adam --lr 1e-3, --batch-size 2048, bucketed numerics
    (--numeric log-bucket) help MEDA. Several modes (--mode one-epoch,multi-epoch,meda)
    go to OUT/<mode>/metrics.json with OUT/summary.json and, with --plot, OUT/test_auc.png.

    \b
    Scale: --data DIR (or 'DIR/*.parquet') streams shards: vocabularies from one pass,
    encoded shards cached, a bounded shuffle buffer (--shuffle-rows). Data-parallel:
    torchrun --nproc-per-node N -m meda ctr train ... (gloo on CPU, NCCL on GPU; the
    --batch-size is the global batch; rank 0 writes metrics.json and checkpoints).
    Large tables: --sparse-grad (sparse table gradients, all-reduced sparse under DDP).
    Large evaluation splits: --eval-auc binned (constant memory, histograms all-reduced).
    GPU speed: --device cuda --graph on (the whole step as one CUDA graph).

    \b
    Remedies to compare MEDA with: --schedule bars (FuxiCTR's BARS protocol: embedding
    L2, LR / 10 on a plateau, early stopping, patience 2) and --optimizer adamar
    --optimizer-option ar_alpha=0.01 (Li & Lyu's per-row adaptive decay; combine with
    --mode meda for MEDA + AdamAR).
    """
    from meda.ctr import distributed
    from meda.ctr.checkpoint import ResumeError
    from meda.ctr.data import load_dataset
    from meda.ctr.experiment import parse_modes, run_modes
    from meda.ctr.readers import FORMATS
    from meda.ctr.schedule import apply_schedule
    from meda.ctr.shards import is_sharded
    from meda.ctr.train import TrainConfig
    from meda.report import console

    if format not in FORMATS:  # before any data is read, and named as the option it is
        raise typer.BadParameter(f"unknown format {format!r}; use one of {', '.join(FORMATS)}", param_hint="--format")
    try:
        modes = parse_modes(mode)
        units = tuple(int(u) for u in hidden_units.split(",") if u.strip())
        options = dict(_key_value(o) for o in model_option)
        scheduled = apply_schedule(
            schedule, {"embedding_l2": embedding_l2, "lr_plateau_factor": lr_plateau_factor, "patience": patience}
        )
        config = TrainConfig(
            **scheduled, optimizer_options=dict(_key_value(o) for o in optimizer_option),
            model=model, mode=modes[0], epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
            net_l2=net_l2, embedding_dim=embedding_dim, hidden_units=units,
            dropout=dropout, batch_norm=batch_norm, init=init, init_std=init_std,
            meda_min_cardinality=meda_min_cardinality, meda_reset_optimizer=meda_reset_optimizer,
            serving=serving, chunks=chunks, monitor=monitor, seed=seed,
            checkpoint_every=checkpoint_every, model_options=options, device=device, precision=precision,
            compile=compile, graph=graph, resident=resident, embedding_backend=embedding_backend,
            sparse_grad=sparse_grad, eval_auc=eval_auc, eval_auc_bins=eval_auc_bins,
        )  # fmt: skip
        distributed.init(device)
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err)) from err
    log = None if json_out else (lambda line: console.print(line, highlight=False))
    sharded = {"split_by": split_by, "bad_shards": bad_shards, "shuffle_rows": shuffle_rows, "log": log}
    try:
        with (
            distributed.main_first(),  # rank 0 encodes and caches; the other ranks then read the cache
            console.status(f"reading and encoding {data} (cached after the first run) ...", spinner="dots"),
        ):
            dataset = load_dataset(
                data, format, schema=schema, valid=valid, test=test, cache_dir=cache_dir, use_cache=use_cache,
                min_count=min_count, seed=seed, numeric=numeric, **(sharded if is_sharded(data) else {}),
            )  # fmt: skip
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--data") from err
    try:
        results = run_modes(dataset, modes, config, out, plot=plot, resume=resume, log=log)
    except ResumeError as err:
        raise typer.BadParameter(str(err), param_hint="--resume") from err
    distributed.finish()
    if distributed.is_main():
        _print_results(results, modes, model, monitor, dataset.report, out, json_out)
    distributed.leave()


def _print_results(results: dict, modes: list[str], model: str, monitor: str, report: dict, out, json_out: bool):
    """What ``meda ctr train`` prints once training is done (rank 0 only under torchrun)."""
    from meda.ctr.experiment import epoch_table, summary_table
    from meda.report import console, print_json, print_table

    if json_out:
        print_json(results if len(modes) > 1 else results[modes[0]])
        return
    if len(modes) == 1:
        payload = results[modes[0]]
        print_table(f"{model}, {modes[0]}: metrics per epoch", *epoch_table(payload))
        console.print(f"best epoch (by {monitor}): {payload['best']['epoch']}")
    else:
        print_table(f"{model}: test AUC per epoch", *summary_table(results))
    skipped = report.get("skipped_rows") or {}
    if skipped:
        console.print(f"skipped rows: {skipped}")
    console.print(f"wrote {out}")


def _key_value(text: str) -> tuple[str, object]:
    """``"cross_layers=2"`` -> ``("cross_layers", 2)``; values are read as JSON when they parse."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"model option {text!r} is not KEY=VALUE, e.g. --model-option cross_layers=2")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
