"""CUDA graph capture that Python's garbage collector cannot break.

A CUDA graph object that becomes garbage in a reference cycle is freed whenever the collector next runs;
if that happens while another graph is being captured, its destructor (``cudaGraphExecDestroy``) is an
operation the capturing stream does not permit, and the capture fails with
``cudaErrorStreamCaptureInvalidated`` ("operation failed due to a previous error during capture"). Seen on
an H100 (2026-12-07): the CTR graphed-step test failed when run after other GPU tests and passed alone.
``torch.cuda.graph`` no longer collects before a capture (``torch.compiler.config.force_cudagraph_gc``, off by
default, because a full collection is slow); :func:`capture` keeps the collector from running automatically
during the capture instead, which costs nothing: cycles that become garbage meanwhile are freed afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def capture(graph: torch.cuda.CUDAGraph) -> Iterator[None]:
    """``with capture(graph): ...`` records the block into ``graph`` like ``torch.cuda.graph(graph)``, with
    automatic garbage collection off for its length (restored afterwards, also on error)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            yield
    finally:
        if was_enabled:
            gc.enable()
