"""Where training and evaluation batches come from: one interface over in-memory and streamed splits.

The training loop reads every split through a :class:`BatchSource`:

- ``train_batches(batch_size, seed, rank, world)``: one shuffled epoch. ``batch_size`` is the
  *global* batch; under data parallelism rank ``r`` of ``world`` gets its ``1/world`` part of
  every global batch, so every rank takes the same number of steps.
- ``eval_batches(batch_size, rank, world)``: the rank's contiguous row range
  (:func:`rank_range`) in row order; concatenating every rank's logits in rank order gives the
  split's logits in row order.
- ``label`` / ``group``: the split's labels ``[rows]`` (and group ids) for metrics.

:class:`InMemorySource` serves an :class:`~meda.ctr.features.EncodedData` either from host
arrays (a batch is cut by numpy indexing and copied to the device) or *resident*: every array
is a tensor on the training device once, the epoch's row order is copied there once, and a batch
is a device-side ``index_select``; no host work or host-to-device copy per step. Both cut
exactly the same batches as :func:`meda.ctr.batches.iterate_batches` (tested), so metrics do not
depend on the path. Streamed splits (:mod:`meda.ctr.stream`) implement the same interface.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from meda.ctr.batches import row_orders, to_tensors
from meda.ctr.features import EncodedData

Batch = dict[str, torch.Tensor]
RESIDENT = ("auto", "on", "off")
RESIDENT_FRACTION = 0.5  # "auto" keeps a split on the GPU when it takes at most this share of free memory


class BatchSource(Protocol):
    """A split the training loop can train on and evaluate."""

    def __len__(self) -> int: ...

    def on(self, device: torch.device) -> BatchSource:
        """The same split delivering batches on ``device``."""
        ...

    @property
    def label(self) -> np.ndarray: ...

    @property
    def group(self) -> np.ndarray | None: ...

    def num_train_batches(self, batch_size: int, world: int = 1) -> int: ...

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[Batch]: ...

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]: ...


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world`` evaluates (near-equal, in order)."""
    return n * rank // world, n * (rank + 1) // world


def global_batch_count(n: int, batch_size: int, world: int) -> int:
    """Global batches of an epoch of ``n`` rows; a last batch with fewer rows than ranks is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= world)


class InMemorySource:
    """An :class:`EncodedData` split served from host arrays or resident on ``device``.

    Args:
        data: the encoded split (in memory or memory-mapped).
        device: the training device.
        resident: keep the split as tensors on ``device`` (on CPU they share the arrays' memory).
    """

    def __init__(self, data: EncodedData, device: torch.device, resident: bool) -> None:
        self.data, self.device, self.resident = data, device, resident
        self.tensors: Batch = {}
        if resident:
            with warnings.catch_warnings():  # memory-mapped cache arrays are read-only; nothing writes them
                warnings.simplefilter("ignore", UserWarning)
                host = to_tensors(data, slice(None)) if device.type != "cpu" else _shared_tensors(data)
            self.tensors = {k: v.to(device) for k, v in host.items()}

    def __len__(self) -> int:
        return len(self.data)

    def on(self, device: torch.device) -> InMemorySource:
        return self if device == self.device else InMemorySource(self.data, device, self.resident)

    @property
    def label(self) -> np.ndarray:
        return self.data.label

    @property
    def group(self) -> np.ndarray | None:
        return self.data.group

    def num_train_batches(self, batch_size: int, world: int = 1) -> int:
        return global_batch_count(len(self), batch_size, world)

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Shuffled batches; rank ``rank`` gets rows ``[b·r/W, b·(r+1)/W)`` of each global batch of ``b`` rows."""
        _, rows = next(row_orders(self.data, shuffle=True, seed=seed))
        order = torch.from_numpy(rows).to(self.device) if self.resident else rows
        for g in range(self.num_train_batches(batch_size, world)):
            start = g * batch_size
            size = min(batch_size, len(rows) - start)
            lo, hi = rank_range(size, rank, world)
            yield self._take(order[start + lo : start + hi])

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        start, stop = rank_range(len(self), rank, world)
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            yield {k: v[s:e] for k, v in self.tensors.items()} if self.resident else self._take(np.arange(s, e))

    def _take(self, index: np.ndarray | torch.Tensor) -> Batch:
        if self.resident:
            return {k: v.index_select(0, index) for k, v in self.tensors.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in to_tensors(self.data, index).items()}


def as_source(data: EncodedData | BatchSource, device: torch.device, resident: str = "auto") -> BatchSource:
    """A :class:`BatchSource` for ``data`` on ``device``; sources (e.g. streamed splits) are moved there.

    ``resident``: "on" keeps an in-memory split on the device, "off" never, "auto" on CPU always
    (zero-copy) and on CUDA when it takes at most half of the free device memory.
    """
    if resident not in RESIDENT:
        raise ValueError(f"unknown resident setting {resident!r}; use one of {', '.join(RESIDENT)}")
    if not isinstance(data, EncodedData):
        return data.on(device)
    keep = resident == "on" or (resident == "auto" and _fits(data, device))
    return InMemorySource(data, device, keep)


def split_bytes(data: EncodedData) -> int:
    """Bytes the split takes as training tensors (int64 ids, float32 values)."""
    n = len(data)
    per_row = 8 * data.categorical.shape[1] + 4 * data.numeric.shape[1] + 8 * math.prod(data.sequence.shape[1:]) + 4
    return n * (per_row + 8 * (data.group is not None))


def _fits(data: EncodedData, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes(data) <= RESIDENT_FRACTION * free


def _shared_tensors(data: EncodedData) -> Batch:
    """The split's arrays as CPU tensors that share memory with them where dtypes already match."""
    arrays = {"categorical": (data.categorical, np.int64), "numeric": (data.numeric, np.float32),
              "sequence": (data.sequence, np.int64), "label": (data.label, np.float32)}  # fmt: skip
    if data.group is not None:
        arrays["group"] = (data.group, np.int64)
    return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=t)) for k, (a, t) in arrays.items()}
