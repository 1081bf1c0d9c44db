"""meda.cuda_graphs.capture: a capture survives garbage collection of another graph during it."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from meda.cuda_graphs import capture


def _captured_graph() -> torch.cuda.CUDAGraph:
    x = torch.ones(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.mul_(2)
    return graph


def _churn() -> None:
    """Allocate enough container objects for the collector to run on its own (if it is enabled)."""
    keep = [[] for _ in range(20_000)]
    del keep


def _capture_with_garbage_graph(context) -> torch.Tensor:
    """Capture a step during which a captured graph, held only by a reference cycle, becomes garbage."""
    old = _captured_graph()
    y = torch.zeros(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with context(graph):
        cycle: list = [old]
        cycle.append(cycle)
        del old, cycle  # now only the collector can free the old graph
        _churn()
        y.add_(1)
    graph.replay()
    gc.collect()
    return y


@pytest.mark.parametrize("enabled_before", [True, False])
def test_collector_is_off_inside_and_restored_after(monkeypatch, enabled_before: bool) -> None:
    """On any device (torch.cuda.graph replaced by a no-op): off in the block, as before after it, even when
    the block raises."""
    seen: list[bool] = []
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    (gc.enable if enabled_before else gc.disable)()
    try:
        with pytest.raises(RuntimeError, match="body failed"), capture(None):  # type: ignore[arg-type]
            seen.append(gc.isenabled())
            raise RuntimeError("body failed")
        assert seen == [False]
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
def test_capture_survives_a_graph_freed_by_the_collector() -> None:
    torch.cuda.synchronize()
    assert _capture_with_garbage_graph(capture).tolist() == [1.0] * 8


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
def test_plain_torch_capture_breaks_on_the_same_garbage() -> None:
    """The failure :func:`capture` exists for: if this starts passing, torch fixed it and the guard can go."""
    with pytest.raises(RuntimeError, match="capture"):
        _capture_with_garbage_graph(torch.cuda.graph)
    torch.cuda.synchronize()
