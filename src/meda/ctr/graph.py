"""The whole training step (forward, loss, backward, optimiser step) as one CUDA graph.

A CTR step at batch 4096 is a few hundred small kernels; eager PyTorch spends more time launching them
than the GPU spends running them. ``--graph on`` records the step once per pass and replays it
(PyTorch's "whole network capture" recipe):

- **static inputs**: the first full batch of a pass is cloned into static tensors; every later batch
  of that shape is copied into them (``copy_``) and the graph is replayed. A batch of another shape
  (the short last batch of an epoch) runs eagerly; nothing is padded.
- **warm-up**: the first :data:`WARM_UP` steps of every pass run eagerly on a side stream (they are
  real training steps), so that the optimiser state and the gradients exist before the capture.
- **gradients** are zeroed inside the graph (``zero_grad(set_to_none=False)``): the captured step
  writes into the same ``.grad`` tensors every replay. Before each pass every gradient is dropped
  (``set_to_none=True``), so parameters outside the pass's forward (meda-continual's other
  embedding groups) get no update, as in the eager loop.
- **re-capture per pass**: whatever changes between passes is seen by the next graph: MEDA's redraw
  of the tables (in place), the optimiser reset after it (Adam's state of a wholly redrawn table is
  dropped and made afresh by the warm-up), a learning rate decayed on a plateau (a float the
  captured kernel holds), another embedding group.
- **optimisers**: only those of :data:`meda.ctr.optim.CAPTURABLE` (Adam with ``capturable=True``, fused; SGD);
  AdamAR / AdagradAR are refused (their row decay picks the touched rows with ``nonzero()``, a host sync with a
  data-dependent shape), and so is Adagrad (no fused CUDA kernel in torch; its unfused step calls ``.item()``).

Refused with an error naming the fix (:func:`check_graph`): CPU devices, sparse gradients,
the torchrec backend, torch.compile, data parallelism (DDP). The loss stays on the device
(the caller sums it there); :meth:`GraphedStep.report` counts graphed and eager steps for
``metrics.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from meda.ctr.optim import CAPTURABLE
from meda.cuda_graphs import capture

GRAPH_MODES = ("off", "on")
WARM_UP = 3  # eager steps of each pass before the capture (PyTorch's recipe uses 3 without DDP)
Batch = dict[str, torch.Tensor]


class GraphConfig(Protocol):
    """The :class:`~meda.ctr.train.TrainConfig` fields :func:`check_graph` reads."""

    graph: str
    device: str
    optimizer: str
    sparse_grad: bool
    embedding_backend: str
    compile: str


def check_graph(config: GraphConfig, device: torch.device, world: int = 1) -> None:
    """Refuse what ``--graph on`` cannot capture, naming the fix (raises ValueError); ``--graph off`` passes.
    (The value itself is one of :data:`GRAPH_MODES`: :class:`~meda.ctr.train.TrainConfig` checks it.)"""
    if config.graph == "off":
        return
    refusals = [
        (config.optimizer.lower() not in CAPTURABLE,
         f"--optimizer {config.optimizer} cannot be captured (its step syncs with the host: AdamAR/AdagradAR "
         "find the touched rows with nonzero(), Adagrad reads its step count with .item()): use --optimizer "
         f"{' / '.join(CAPTURABLE)}, or --graph off"),
        (config.sparse_grad, "sparse gradients change shape every step: drop --sparse-grad, or use --graph off"),
        (config.embedding_backend != "native",
         "the torchrec backend's fused kernels are not captured here: use --embedding-backend native, "
         "or --graph off"),
        (config.compile != "off",
         "torch.compile and --graph on both replace the eager step (reduce-overhead is CUDA graphs of the "
         "forward only): use one, --compile off or --graph off"),
        (world > 1, "data-parallel training (DDP) all-reduces outside the captured step: run one process, "
                    "or use --graph off under torchrun"),
        (device.type != "cuda", f"CUDA graphs need a CUDA device, not {device.type}: use --device cuda, "
                                "or --graph off"),
    ]  # fmt: skip
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"--graph on: {reason}")


class GraphedStep:
    """A training step replayed from a CUDA graph; call it like the eager step.

    Args:
        step: the eager step: takes a batch (``label`` ``[B]`` and the feature tensors), runs forward,
            loss, backward and the optimiser step with ``zero_grad(set_to_none=False)`` first, and returns
            the loss (a 0-d device tensor). It must launch the same kernels for every batch of one shape.
        drop_grads: sets every gradient to None (the optimiser's ``zero_grad(set_to_none=True)``).
        device: the CUDA device the model trains on (streams and captures are made there).
    """

    def __init__(
        self, step: Callable[[Batch], torch.Tensor], drop_grads: Callable[[], None], device: torch.device
    ) -> None:
        self.step, self.drop_grads, self.device = step, drop_grads, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch = {}  # the graph's inputs
        self.loss: torch.Tensor | None = None  # the graph's output
        self.warmed = 0  # eager warm-up steps done in this pass
        self.side = torch.cuda.Stream(device)  # where the warm-up steps run
        self.counts = {"captures": 0, "graphed_steps": 0, "warm_up_steps": 0, "other_shape_steps": 0}

    def reset(self) -> None:
        """Start a pass: forget the graph (its memory is freed) and drop every gradient."""
        self.graph, self.static, self.loss, self.warmed = None, {}, None, 0
        self.drop_grads()

    def __call__(self, batch: Batch) -> torch.Tensor:
        """One training step on ``batch``; returns its loss (a 0-d tensor on the device, not synchronised).

        The returned tensor of a replayed step is the graph's output: the next replay overwrites it, so
        use it (e.g. add it to a sum on the device) before the next call.
        """
        with torch.cuda.device(self.device):
            return self._step(batch)

    def _step(self, batch: Batch) -> torch.Tensor:
        if self.graph is not None:
            if not self._fits(batch):
                self.counts["other_shape_steps"] += 1
                return self._eager(batch)
            for key, value in batch.items():
                self.static[key].copy_(value, non_blocking=True)
            self.graph.replay()
            self.counts["graphed_steps"] += 1
            return self.loss  # type: ignore[return-value]
        if self.warmed < WARM_UP:
            self.warmed += 1
            self.counts["warm_up_steps"] += 1
            main = torch.cuda.current_stream()
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                loss = self._eager(batch)
            main.wait_stream(self.side)
            return loss
        self.static = {key: value.clone() for key, value in batch.items()}
        self.graph = torch.cuda.CUDAGraph()
        with capture(self.graph):
            self.loss = self.step(self.static)
        self.counts["captures"] += 1
        self.graph.replay()  # the capture recorded the step without running it
        self.counts["graphed_steps"] += 1
        return self.loss

    def _fits(self, batch: Batch) -> bool:
        if batch.keys() != self.static.keys():
            return False
        return all(v.shape == self.static[k].shape and v.dtype == self.static[k].dtype for k, v in batch.items())

    def _eager(self, batch: Batch) -> torch.Tensor:
        with warnings.catch_warnings():  # Adam(capturable=True) warns once when it steps outside a capture
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            return self.step(batch)

    def report(self) -> dict[str, Any]:
        """What ``metrics.json`` ``graph`` says: captures and steps by kind, in this process."""
        return {"enabled": True, "warm_up_per_pass": WARM_UP, **self.counts,
                "eager_steps": self.counts["warm_up_steps"] + self.counts["other_shape_steps"]}  # fmt: skip
