"""Data-parallel training under ``torchrun``: process group, devices, gathering and rank-0 duties.

``torchrun --nproc-per-node N -m meda ctr train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init` joins them into one process group (gloo on
CPU, NCCL on CUDA). Without those variables everything here is a no-op for one process, so the
same code path trains in one process and in many.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def world() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that logs and writes files."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> None:
    """Join the torchrun process group (gloo for CPU, NCCL for CUDA); no-op in one process."""
    if not launched() or dist.is_initialized():
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def local_device(device: torch.device) -> torch.device:
    """``cuda`` -> this process's GPU (``cuda:LOCAL_RANK``) under torchrun; other devices unchanged."""
    if device.type == "cuda" and device.index is None and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def finish() -> None:
    """Wait until every rank is done (no-op in one process); the ranks then end with :func:`leave`."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """End a torchrun rank whose work is done and whose output is written: flush and ``os._exit(0)``.

    A gloo process group left to the interpreter's exit has aborted a rank after a finished run in CI
    ("terminate called without an active exception", exit code -6), and so did destroying it after a
    barrier: the group's C++ threads are still joinable when their destructors run. After :func:`finish`'s
    barrier nothing is left to do, so the rank leaves without running them. No-op in one process.
    """
    if not launched():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. encodes and caches the data), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``local`` ``[counts[rank], ...]`` concatenated in rank order, on every rank.

    Rows are padded to the largest count for the collective and cut back afterwards.
    """
    if world() == 1:
        return local
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def sum_floats(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over ranks (float64; exact for counts below 2**53)."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_tensors(tensors: list[torch.Tensor]) -> None:
    """Each tensor summed over ranks, in place (e.g. histogram counts: exact in int64)."""
    if world() > 1:
        for t in tensors:
            dist.all_reduce(t)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank before evaluating."""
    if world() > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def same_on_every_rank(module: torch.nn.Module) -> bool:
    """Whether every parameter equals rank 0's (a checksum per tensor, compared across ranks)."""
    if world() == 1:
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    ref = sums.clone()
    dist.broadcast(ref, 0)
    ok = torch.tensor([int(torch.equal(sums, ref))], device=sums.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def data_parallel(model: torch.nn.Module, device: torch.device, sparse_tables: list[torch.nn.Parameter]) -> DDP:
    """``model`` wrapped in DDP (gradients all-reduced and averaged over ranks at each backward).

    DDP all-reduces a gradient as sparse only for a parameter it first meets in an ``nn.Embedding`` with
    ``sparse=True``; the concatenated tables live in :class:`~meda.ctr.embedding.FeatureEmbedding`, so each
    table of ``sparse_tables`` is first shown to DDP through such an ``nn.Embedding`` sharing the parameter
    (:class:`SparseTables`). The 2-process ``--sparse-grad`` test fails loudly if DDP stops honouring it.
    """
    ids = [device.index] if device.type == "cuda" else None
    return DDP(SparseTables(model, sparse_tables) if sparse_tables else model, device_ids=ids)


class SparseTables(torch.nn.Module):
    """``model`` behind one ``nn.Embedding(sparse=True)`` per table sharing its parameter (registered
    first, so DDP expects those parameters' gradients sparse); ``forward`` is the model's."""

    def __init__(self, model: torch.nn.Module, tables: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.markers = torch.nn.ModuleList()
        for table in tables:
            marker = torch.nn.Embedding(1, table.shape[1], sparse=True)
            marker.weight = table  # the same Parameter object, not a copy
            self.markers.append(marker)
        self.model = model

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.model(*args, **kwargs)
