"""The one CTR training loop: runs any mode's plan, evaluates, checkpoints and resumes.

A run is a list of passes (:mod:`meda.ctr.modes`). Before a pass the loop activates
the pass's embedding group, evaluates progressively (meda-continual) and re-initialises
the embeddings (meda); after the last pass of an epoch it evaluates on the validation and
test splits, applies early stopping and writes a checkpoint. With ``checkpoint_every``
it also checkpoints every N steps, with the model, optimiser, RNG state and position in
the data, so that a killed run resumed with ``resume=True`` ends with the same metrics.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from meda.ctr import distributed
from meda.ctr.batches import split_by_day, split_into_chunks
from meda.ctr.checkpoint import CHECKPOINT_NAME, ResumeError, load_checkpoint, save_checkpoint
from meda.ctr.continual import SERVING, EmbeddingGroups, serve
from meda.ctr.embedding import EmbeddingInit
from meda.ctr.features import EncodedData, FeatureMap
from meda.ctr.graph import GRAPH_MODES, GraphedStep, check_graph
from meda.ctr.metrics import AUC_BINS, AUC_LOGIT_RANGE, BinnedMetrics, classification_metrics
from meda.ctr.models import CTRModel, build_model, model_options
from meda.ctr.modes import Mode, Pass
from meda.ctr.optim import build_optimizer, check_sparse_grad, optimizer_options, reset_state
from meda.ctr.schedule import decay_on_plateau
from meda.ctr.sources import RESIDENT, BatchSource, as_source, rank_range
from meda.ctr.stream import StreamedSplit
from meda.report import write_json

MONITORS = ("valid_auc", "valid_logloss", "valid_gauc")
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # reduce-overhead: CUDA graphs
EMBEDDING_BACKENDS = ("native", "torchrec")
EVAL_AUC = ("auto", "exact", "binned")  # auto: exact up to EXACT_AUC_MAX_ROWS evaluated rows per split, else binned
EXACT_AUC_MAX_ROWS = 20_000_000  # exact AUC keeps 12 bytes a row (label + float64 logit): 240 MB here


class DatasetLike(Protocol):
    """What training reads from :func:`meda.ctr.data.load_dataset`'s result."""

    feature_map: FeatureMap
    train: EncodedData | BatchSource
    valid: EncodedData | BatchSource
    test: EncodedData | BatchSource
    report: dict[str, Any]


@dataclass
class TrainConfig:
    """Every setting of a training run (written to ``metrics.json`` as ``config``).

    The defaults follow DESIGN.md's reproduction of one-epoch overfitting: Adam at 1e-3,
    batch 2048, embeddings N(0, 1e-4^2), dim 16, MLP 256-128.
    """

    model: str = "dnn"
    mode: str = "multi-epoch"
    epochs: int = 4
    batch_size: int = 2048
    optimizer: str = "adam"
    lr: float = 1e-3
    embedding_l2: float = 0.0
    net_l2: float = 0.0
    embedding_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    batch_norm: bool = False
    init: str = "normal"
    init_std: float = 1e-4
    meda_min_cardinality: int = 0
    meda_reset_optimizer: bool = True
    serving: str = "last"
    chunks: int = 4
    monitor: str = "valid_auc"
    patience: int | None = None
    seed: int = 0
    checkpoint_every: int = 0
    eval_batch_size: int = 16384
    device: str = "cpu"
    precision: str = "fp32"  # bf16: autocast the forward pass to bfloat16 (loss and optimiser stay fp32)
    compile: str = "off"  # torch.compile mode of the model's forward, see COMPILE_MODES
    graph: str = "off"  # on: the whole training step replayed as one CUDA graph (meda.ctr.graph)
    resident: str = "auto"  # keep in-memory splits as tensors on the device (see meda.ctr.sources)
    embedding_backend: str = "native"  # or "torchrec": tables in an EmbeddingBagCollection (meda.ctr.torchrec_backend)
    sparse_grad: bool = False  # sparse table gradients + a sparse optimiser for the tables (meda.ctr.optim)
    eval_auc: str = "auto"  # exact (every logit kept), binned (histograms, constant memory) or auto, see EVAL_AUC
    eval_auc_bins: int = AUC_BINS  # binned AUC: logit bins per class (16 bytes each on the device, both classes)
    model_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # embedding group, e.g. ar_alpha (adamar)
    lr_plateau_factor: float | None = None  # multiply the LR by this after an epoch without improvement (BARS: 0.1)

    def __post_init__(self) -> None:
        Mode(self.mode)  # validates the name
        build_model_options(self)  # validates the model name and options
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.serving not in SERVING:
            raise ValueError(f"unknown serving policy {self.serving!r}; choose one of {', '.join(SERVING)}")
        if self.monitor not in MONITORS:
            raise ValueError(f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None to train every epoch), got {self.patience}")
        if self.chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 = only at the end of each epoch)")
        self.hidden_units = tuple(self.hidden_units)
        optimizer_options(self.optimizer, self.optimizer_options)  # validates the options
        if self.lr_plateau_factor is not None and not 0 < self.lr_plateau_factor < 1:
            raise ValueError(f"lr_plateau_factor must be in (0, 1) (or None), got {self.lr_plateau_factor}")
        resolve_device(self.device)  # validates the name
        choices = {"precision": PRECISIONS, "compile": COMPILE_MODES, "resident": RESIDENT,
                   "embedding_backend": EMBEDDING_BACKENDS, "eval_auc": EVAL_AUC, "graph": GRAPH_MODES}  # fmt: skip
        for name, allowed in choices.items():
            if (value := getattr(self, name)) not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not 2 <= self.eval_auc_bins <= 2**24:
            raise ValueError(f"eval_auc_bins must be in [2, 2**24] (2**24 bins: 256 MiB), got {self.eval_auc_bins}")
        if self.eval_auc == "binned" and Mode(self.mode).chunked:
            raise ValueError(
                "--eval-auc binned cannot evaluate meda-continual: serving (best, ensemble) and progressive "
                "validation need every row's logits; use --eval-auc exact or auto"
            )
        if self.sparse_grad:
            check_sparse_grad(self.optimizer, self.embedding_l2)
            if self.embedding_backend != "native":
                raise ValueError(
                    "--sparse-grad acts on the native tables; torchrec's EmbeddingBagCollection keeps its own "
                    "gradients: use --embedding-backend native, or drop --sparse-grad"
                )
            if self.compile != "off":  # inductor cannot trace sparse gradients (measured: NotImplementedError)
                raise ValueError("--sparse-grad cannot be compiled (torch.compile does not take sparse gradients): "
                                 "use --compile off, or drop --sparse-grad")  # fmt: skip
        check_graph(self, resolve_device(self.device))


def build_model_options(config: TrainConfig) -> dict[str, Any]:
    """The options :func:`build_model` gets: the shared ones the model has, then ``model_options``."""
    accepted = model_options(config.model)
    shared = {
        "embedding_dim": config.embedding_dim,
        "hidden_units": config.hidden_units,
        "dropout": config.dropout,
        "batch_norm": config.batch_norm,
        "embedding_init": EmbeddingInit(config.init, config.init_std),  # type: ignore[arg-type]
    }
    unknown = sorted(set(config.model_options) - set(accepted))
    if unknown:
        raise TypeError(f"model {config.model!r} has no option(s) {unknown}; its options are {sorted(accepted)}")
    return {**{k: v for k, v in shared.items() if k in accepted}, **config.model_options}


@dataclass
class Progress:
    """Where a run is and what it has measured; saved in every checkpoint."""

    pass_index: int = 0
    step: int = 0  # batches done in the current pass
    global_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    epoch_started: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)  # the current epoch's record so far
    history: list[dict[str, Any]] = field(default_factory=list)
    best_group: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0  # time in training steps this epoch (device synchronised)
    train_rows: int = 0  # rows trained on this epoch, every rank
    timing: list[dict[str, Any]] = field(default_factory=list)  # per epoch: seconds, rows, samples/s


class Trainer:
    """Trains one model in one mode on a dataset.

    Args:
        dataset: feature map and the train/valid/test splits.
        config: the run's settings.
        out_dir: where ``metrics.json`` and ``checkpoint.pt`` go (None: nothing is written).
        log: called with one line per epoch (None: silent).
    """

    def __init__(
        self,
        dataset: DatasetLike,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        torch.set_flush_denormal(True)  # std-1e-4 embeddings are ~6x slower on CPU otherwise
        self.rank, self.world = distributed.rank(), distributed.world()
        self.dataset, self.config = dataset, config
        self.log = (log or (lambda _: None)) if self.rank == 0 else (lambda _: None)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.mode = Mode(config.mode)
        _check_parallel(config, self.mode, self.world)
        _check_rows(dataset)
        self.device = distributed.local_device(resolve_device(config.device))
        check_graph(config, self.device, self.world)
        self.sources = {name: as_source(getattr(dataset, name), self.device, config.resident)
                        for name in ("valid", "test", *(() if self.mode.chunked else ("train",)))}  # fmt: skip
        self.chunks = [as_source(c, self.device, config.resident) for c in self._chunks()] if self.mode.chunked else []
        self._grouped = any(_has_groups(self.sources[s]) for s in ("valid", "test"))  # group AUC (gauc) is asked for
        if config.eval_auc == "binned" and self._grouped:
            raise ValueError(
                "--eval-auc binned cannot compute the group AUC (gauc) of a data set with a group column: it needs "
                "every row's logit and group; use --eval-auc exact or auto (exact), or drop the group column"
            )
        self.plan = self.mode.plan(config.epochs, len(self.chunks))
        torch.manual_seed(config.seed)  # the same seed on every rank: identical initial tables and network
        self.model: CTRModel = build_model(config.model, dataset.feature_map, **build_model_options(config))
        if config.embedding_backend == "torchrec":
            from meda.ctr.torchrec_backend import use_torchrec

            use_torchrec(self.model)
        for layer in self.model.embedding_layers().values():  # before the groups copy the layers
            layer.sparse = config.sparse_grad
        self.groups = EmbeddingGroups(self.model, self.mode.groups(config.epochs), config.seed)
        self.model.to(self.device)
        self.groups.to(self.device)
        self.forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] = self.model
        if self.world > 1:  # gradients all-reduced over ranks (DDP; sparse tables all-reduced sparse)
            sparse = [m.table for m in self.model.embedding_layers().values() if m.sparse and m.table is not None]
            self.forward = distributed.data_parallel(self.model, self.device, sparse)
        if config.compile != "off":
            self.forward = torch.compile(self.forward, mode=None if config.compile == "default" else config.compile)
        self._loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # losses not yet in progress
        self._loss_steps = 0
        self._in_sync = True
        tables = [layer.table for g in range(len(self.groups)) for layer in self.groups.layers(g)
                  if config.sparse_grad and layer.table is not None]  # fmt: skip
        self.optimizer = build_optimizer(
            config.optimizer,
            [p for p in self.groups.parameters() if all(p is not t for t in tables)],
            self.model.network_parameters(),
            config.lr,
            config.embedding_l2,
            config.net_l2,
            config.optimizer_options,
            sparse_params=tables,
            capturable=config.graph == "on",
        )
        self.progress = Progress()
        # the step the loop calls: eager, or replayed from a CUDA graph (re-captured every pass)
        self.graph = GraphedStep(self._step, lambda: self.optimizer.zero_grad(set_to_none=True), self.device) \
            if config.graph == "on" else None  # fmt: skip
        self.train_step: Callable[[dict[str, torch.Tensor]], torch.Tensor] = self.graph or self._step

    # ----------------------------------------------------------------- running
    def fit(self, resume: bool = False, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run (or, with ``resume``, continue) the plan; returns the ``metrics.json`` payload.

        ``on_step(global_step)`` is called after every optimiser step (and after any
        checkpoint of that step); an exception it raises stops the run like a kill would.
        """
        if resume:
            self._load()
        p = self.progress
        for pass_ in self.plan[p.pass_index :]:
            if p.stopped_early:
                break
            self.groups.activate(pass_.group)
            if p.step == 0:
                self._start_pass(pass_)
            self._train_pass(pass_, on_step)
            p.pass_index, p.step = p.pass_index + 1, 0
            if pass_.closes_epoch:
                self._close_epoch()
            self._save()
        self._in_sync = distributed.same_on_every_rank(self.model)
        payload = self.payload()
        if self.out_dir is not None and self.rank == 0:
            write_json(self.out_dir / "metrics.json", payload)
        return payload

    def _start_pass(self, pass_: Pass) -> None:
        p = self.progress
        if pass_.opens_epoch:
            p.record, p.loss_sum, p.loss_count, p.epoch_started = {"epoch": pass_.epoch}, 0.0, 0, time.time()
            p.train_seconds, p.train_rows = 0.0, 0
            if pass_.chunk is not None:
                chunk = self.chunks[pass_.chunk]
                p.record.update(chunk=pass_.chunk, rows=len(chunk))
                if pass_.chunk > 0:  # progressive validation: the next chunk, before training on it
                    m = self._served_metrics(chunk)
                    p.record.update(progressive_auc=m["auc"], progressive_logloss=m["logloss"])
        if pass_.reinit:
            self._reinitialise(pass_.epoch)

    def _reinitialise(self, epoch: int) -> None:
        """MEDA: redraw the active group's embedding tables with a fresh per-epoch seed."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * epoch)
        redrawn = []
        for layer in self.groups.layers(self.groups.active):
            names = layer.table_names(self.config.meda_min_cardinality)
            redrawn += layer.reinitialise(names, generator=gen)
        if self.config.meda_reset_optimizer:
            reset_state(self.optimizer, redrawn)

    def _train_pass(self, pass_: Pass, on_step: Callable[[int], None] | None) -> None:
        """One pass; per step nothing waits for the device (the loss is summed on it, read at sync points)."""
        p, cfg = self.progress, self.config
        source = self.sources["train"] if pass_.chunk is None else self.chunks[pass_.chunk]
        batches: Iterator[dict[str, torch.Tensor]] = source.train_batches(
            cfg.batch_size, seed=cfg.seed * 1_000_003 + pass_.index, rank=self.rank, world=self.world
        )
        bar = tqdm(
            islice(batches, p.step, None),
            total=source.num_train_batches(cfg.batch_size, self.world),
            initial=p.step,
            desc=f"{cfg.mode} epoch {pass_.epoch}" + (f" group {pass_.group}" * (len(self.groups) > 1)),
            leave=False,
            disable=not _show_progress() or self.rank != 0,
        )
        self.model.train()
        if self.graph is not None:  # a new graph for this pass (tables redrawn, LR decayed, another group)
            self.graph.reset()
        started, rows = time.perf_counter(), 0
        for batch in bar:
            loss = self.train_step(batch)
            p.step, p.global_step = p.step + 1, p.global_step + 1
            self._loss_total += loss
            self._loss_steps, rows = self._loss_steps + 1, rows + batch["label"].shape[0]
            if cfg.checkpoint_every and p.global_step % cfg.checkpoint_every == 0:
                self._save()
            if on_step is not None:
                on_step(p.global_step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        p.train_seconds += time.perf_counter() - started
        p.train_rows += int(distributed.sum_floats([rows], self.device)[0])

    def _step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimiser step on ``batch``; returns the detached loss (0-d, on the device, not synchronised).

        Under ``--graph on`` the gradients are zeroed in place (the captured step reuses them)."""
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        with self._autocast():
            logits = self.forward(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"])
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _autocast(self) -> torch.autocast:
        # a CUDA graph cannot hold autocast's cache of cast weights (it is filled once, outside the replays)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16",
                              cache_enabled=self.config.graph == "off")  # fmt: skip

    def _sync_loss(self) -> None:
        """Move the device-side loss sum into :attr:`progress` (one host sync)."""
        if self._loss_steps:
            p = self.progress
            p.loss_sum, p.loss_count = p.loss_sum + float(self._loss_total), p.loss_count + self._loss_steps
            self._loss_total.zero_()
            self._loss_steps = 0

    def _close_epoch(self) -> None:
        p = self.progress
        if len(self.groups) == 1:  # each split on its own, exact or binned (see _auc_method)
            for split in ("valid", "test"):
                p.record.update({f"{split}_{k}": v for k, v in self._metrics(self.sources[split]).items()})
        else:
            self._close_epoch_groups()
        self._finish_epoch()

    def _close_epoch_groups(self) -> None:
        """Metrics of meda-continual's served logits (exact: serving needs every row's logit per group)."""
        p, cfg = self.progress, self.config
        valid, test = self.sources["valid"], self.sources["test"]
        valid_groups = self.groups.logits_per_group(lambda: self.predict(valid))
        test_groups = self.groups.logits_per_group(lambda: self.predict(test))
        group_auc = [classification_metrics(valid.label, lg)["auc"] for lg in valid_groups]
        p.best_group = int(np.nanargmax(group_auc)) if not all(map(math.isnan, group_auc)) else 0
        record = p.record
        for split, data, per_group in (("valid", valid, valid_groups), ("test", test, test_groups)):
            m = classification_metrics(data.label, serve(per_group, cfg.serving, p.best_group), data.group)
            record.update({f"{split}_{k}": v for k, v in m.items()})
        record["group_valid_auc"] = group_auc
        record["serving"] = {policy: self._serving_metrics(policy, valid_groups, test_groups)
                             for policy in SERVING}  # fmt: skip

    def _finish_epoch(self) -> None:
        p, cfg = self.progress, self.config
        record = p.record
        self._sync_loss()
        loss_sum, loss_count = distributed.sum_floats([p.loss_sum, p.loss_count], self.device)
        record["train_loss"] = loss_sum / max(loss_count, 1)
        record["seconds"] = round(time.time() - p.epoch_started, 2)
        rate = round(p.train_rows / p.train_seconds) if p.train_seconds > 0 else None
        p.timing.append({"epoch": record["epoch"], "train_seconds": round(p.train_seconds, 3),
                         "train_rows": p.train_rows, "samples_per_s": rate})  # fmt: skip
        p.history.append(record)
        p.record = {}
        self.log(_epoch_line(cfg.mode, record))
        self._early_stopping()

    def _early_stopping(self) -> None:
        p, cfg = self.progress, self.config
        if self.mode.chunked:
            return
        improved = self._best() is p.history[-1]
        p.bad_epochs = 0 if improved else p.bad_epochs + 1
        if not improved and cfg.lr_plateau_factor is not None:  # BARS: LR / 10 on a plateau
            p.history[-1]["lr_after"] = decay_on_plateau(self.optimizer, cfg.lr_plateau_factor)
        if cfg.patience is not None and p.bad_epochs >= cfg.patience:
            p.stopped_early = True
            self.log(f"{cfg.mode}: early stop, no {cfg.monitor} improvement for {cfg.patience} epoch(s)")

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _evaluate(self, source: BatchSource, consume: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """``consume(labels, logits)`` (``[rows]`` each, on the device) for every evaluation batch of this
        rank's row range, the model (active embedding group) in eval mode; nothing waits for the device."""
        was_training = self.model.training
        self.model.eval()
        distributed.broadcast_buffers(self.model)  # rank 0's batch-norm statistics
        for b in source.eval_batches(self.config.eval_batch_size, self.rank, self.world):
            with self._autocast():
                logits = self.model(b).float()
            consume(b["label"], logits)
        self.model.train(was_training)

    def predict(self, data: EncodedData | BatchSource) -> np.ndarray:
        """Click logits ``[rows]`` of the model (active embedding group) on ``data``.

        Logits stay on the device until the split is done (one copy to the host); under
        torchrun each rank predicts its row range and every rank gets all of them.
        """
        source = as_source(data, self.device, self.config.resident)
        out: list[torch.Tensor] = []
        self._evaluate(source, lambda _, logits: out.append(logits))
        local = torch.cat(out) if out else torch.zeros(0, device=self.device)
        counts = [hi - lo for lo, hi in (rank_range(len(source), r, self.world) for r in range(self.world))]
        return distributed.gather_rows(local, counts).double().cpu().numpy()

    def _auc_method(self, source: BatchSource) -> str:
        """``exact`` or ``binned`` for one split: ``auto`` is exact up to EXACT_AUC_MAX_ROWS rows, and
        always for group AUC and meda-continual (both need every row's logit)."""
        method = self.config.eval_auc
        if method != "auto":
            return method
        exact = len(source) <= EXACT_AUC_MAX_ROWS or self._grouped or self.mode.chunked
        return "exact" if exact else "binned"

    def _metrics(self, source: BatchSource) -> dict[str, float]:
        """``{"auc", "logloss"}`` (+ ``"gauc"`` with groups) of the model on one split; binned adds
        ``"auc_bound"``, the bound on its distance to the exact AUC (:class:`BinnedMetrics`)."""
        if self._auc_method(source) == "exact":
            return classification_metrics(source.label, self.predict(source), source.group)
        binned = BinnedMetrics(self.config.eval_auc_bins, device=self.device)  # two histograms and a loss sum
        self._evaluate(source, binned.update)
        distributed.sum_tensors([binned.counts, binned.loss])  # every rank's rows
        return binned.compute()

    def _served_metrics(self, data: BatchSource) -> dict[str, float]:
        per_group = self.groups.logits_per_group(lambda: self.predict(data))
        served = serve(per_group, self.config.serving, self.progress.best_group)
        return classification_metrics(data.label, served)

    def _serving_metrics(
        self, policy: str, valid_groups: list[np.ndarray], test_groups: list[np.ndarray]
    ) -> dict[str, float]:
        """Validation AUC and test AUC/logloss when serving with ``policy`` (meda-continual)."""
        best = self.progress.best_group
        valid = classification_metrics(self.sources["valid"].label, serve(valid_groups, policy, best))
        test = classification_metrics(self.sources["test"].label, serve(test_groups, policy, best))
        return {"valid_auc": valid["auc"], "test_auc": test["auc"], "test_logloss": test["logloss"]}

    def _monitor(self) -> str:
        """The monitored metric; an AUC that is undefined in every epoch (one-class validation
        split) falls back to ``valid_logloss``."""
        key = self.config.monitor
        if key.endswith("auc") and not any(_defined(r.get(key)) for r in self.progress.history):
            return "valid_logloss"
        return key

    def _best(self) -> dict[str, Any]:
        key = self._monitor()
        sign = -1.0 if key.endswith("logloss") else 1.0
        scored = [r for r in self.progress.history if _defined(r.get(key))]
        return max(scored, key=lambda r: sign * r[key]) if scored else self.progress.history[-1]

    def payload(self) -> dict[str, Any]:
        """The ``metrics.json`` content: per-epoch records, the best epoch, config and data report.

        Strict JSON: an undefined metric (AUC of a one-class split) is ``None`` (``null``), never NaN.
        """
        history = self.progress.history
        return _strict({
            "epochs": history,
            "best": dict(self._best()) if history else {},
            "best_by": self._monitor() if history else self.config.monitor,
            "stopped_early": self.progress.stopped_early,
            "timing": self.progress.timing,
            "graph": self.graph.report() if self.graph is not None else {"enabled": False},
            "distributed": {"world_size": self.world, "replicas_identical": self._in_sync},
            "evaluation": self._evaluation_note(),
            "config": asdict(self.config),
            "data": self.dataset.report,
        })

    def _evaluation_note(self) -> dict[str, Any]:
        """How each split's AUC was computed (metrics.json ``evaluation``)."""
        methods = {split: self._auc_method(self.sources[split]) for split in ("valid", "test")}
        note: dict[str, Any] = {"auc": methods, "eval_auc": self.config.eval_auc,
                                "exact_auc_max_rows": EXACT_AUC_MAX_ROWS}  # fmt: skip
        if "binned" in methods.values():
            bins = self.config.eval_auc_bins
            memory = f"constant: int64 logit histograms per class ({16 * bins / 2**20:g} MiB); AUC within *_auc_bound"
            note.update(auc_bins=bins, auc_logit_range=list(AUC_LOGIT_RANGE), memory=memory)
        return note

    # ------------------------------------------------------------- checkpoints
    def _chunks(self) -> list[EncodedData | BatchSource]:
        train = self.dataset.train
        if not isinstance(train, EncodedData):  # a streamed split: one chunk per shard, in name order
            return train.chunks()
        return split_by_day(train) if train.day is not None else split_into_chunks(train, self.config.chunks)

    def _save(self) -> None:
        self._sync_loss()
        if self.out_dir is None or self.rank != 0:  # ranks hold identical state: rank 0 writes it
            return
        save_checkpoint(
            self.out_dir / CHECKPOINT_NAME,
            {
                "config": asdict(self.config),
                "train_rows": len(self.dataset.train),
                "model": self.model.state_dict(),
                "groups": self.groups.state_dict(),
                "active_group": self.groups.active,
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "progress": asdict(self.progress),
            },
        )

    def _load(self) -> None:
        if self.out_dir is None:
            raise ResumeError("resume needs an output folder holding the checkpoint")
        state = load_checkpoint(self.out_dir / CHECKPOINT_NAME)
        ignore = {"checkpoint_every", "resident"}  # neither changes the results
        older = {"sparse_grad": False, "eval_auc": "auto", "eval_auc_bins": AUC_BINS, "graph": "off"}  # before these
        saved = {**older, **{k: v for k, v in state["config"].items() if k not in ignore}}
        now = {k: v for k, v in asdict(self.config).items() if k not in ignore}
        diff = sorted(k for k in now if _plain(now[k]) != _plain(saved.get(k)))
        if diff or state["train_rows"] != len(self.dataset.train):
            what = f"settings {diff}" if diff else "the training data"
            raise ResumeError(
                f"cannot resume from {self.out_dir}: {what} differ from the checkpointed run; "
                "use the same settings and data, or a new --out folder"
            )
        try:
            self.groups.load_state_dict(state["groups"])
            self.groups.activate(state["active_group"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:  # e.g. one table per field, written before the tables were joined
            raise ResumeError(
                f"cannot resume from {self.out_dir}: the checkpoint's parameters do not match this model's "
                f"({str(err).splitlines()[0]}); it was written by another meda version; use a new --out folder"
            ) from err
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.progress = Progress(**state["progress"])


def train(
    dataset: DatasetLike,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.model`` in ``config.mode`` on ``dataset``; returns the ``metrics.json`` payload
    (also written to ``out_dir/metrics.json`` when ``out_dir`` is given)."""
    return Trainer(dataset, config, out_dir, log).fit(resume=resume, on_step=on_step)


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available) as a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def _check_parallel(config: TrainConfig, mode: Mode, world: int) -> None:
    if world == 1:
        return
    if mode.chunked:
        raise ValueError(
            "meda-continual swaps embedding groups inside the model, which data-parallel training (DDP) cannot "
            "follow; run it in one process, or use --mode meda / multi-epoch under torchrun"
        )
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch: make it a multiple of the "
                         f"{world} processes")  # fmt: skip


def _check_rows(dataset: DatasetLike) -> None:
    """A split with no rows would train on nothing or report NaN metrics: stop with the reason."""
    for name in ("train", "valid", "test"):
        if len(getattr(dataset, name)) == 0:
            skipped = dataset.report.get("skipped_rows") or {}
            raise ValueError(
                f"the {name} split has no usable rows (rows read: {dataset.report.get('rows_read', '?')}, "
                f"skipped: {skipped or 'none'}); check --format and the schema, or give more rows"
            )


def _has_groups(source: BatchSource) -> bool:
    """Whether a split has a group column, without reading a streamed split's column."""
    return "group" in source.arrays if isinstance(source, StreamedSplit) else source.group is not None


def _defined(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def _strict(value: Any) -> Any:
    """``value`` with every NaN float replaced by None (JSON ``null``)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _epoch_line(mode: str, r: dict[str, Any]) -> str:
    extra = f" progressive AUC {r['progressive_auc']:.4f}" if "progressive_auc" in r else ""
    return (
        f"{mode} epoch {r['epoch']}: valid AUC {r['valid_auc']:.4f} logloss {r['valid_logloss']:.4f}, "
        f"test AUC {r['test_auc']:.4f} logloss {r['test_logloss']:.4f}{extra} ({r['seconds']:.1f}s)"
    )
