"""Training modes as plans: each mode turns ``epochs`` into an ordered list of passes.

One training loop (:mod:`meda.ctr.train`) runs any plan, so the modes differ only here:

- ``one-epoch``: a single pass over the training split (``epochs`` is ignored).
- ``multi-epoch``: ``epochs`` plain passes; embeddings keep learning across epochs.
- ``meda``: like multi-epoch, but every epoch after the first starts by re-initialising
  the embedding tables (the MLP / interaction layers and their optimiser state are kept).
- ``meda-continual``: ordered chunks (days); ``epochs`` = k independently initialised
  embedding groups sharing one network; each chunk is trained k times, once through
  each group, after a progressive evaluation on it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("one-epoch", "multi-epoch", "meda", "meda-continual")


@dataclass(frozen=True)
class Pass:
    """One pass over (part of) the training split.

    Attributes:
        index: position in the plan (seeds the shuffle; checkpoints record it).
        epoch: the reported epoch (the chunk number, 1-based, for meda-continual).
        chunk: index of the training chunk, or None for the whole training split.
        group: embedding group that trains in this pass.
        reinit: re-initialise the embedding tables before the pass.
        opens_epoch: first pass of its epoch (progressive evaluation happens before it).
        closes_epoch: last pass of its epoch (validation/test evaluation happens after it).
    """

    index: int
    epoch: int
    chunk: int | None = None
    group: int = 0
    reinit: bool = False
    opens_epoch: bool = True
    closes_epoch: bool = True


@dataclass(frozen=True)
class Mode:
    """A training mode: its name, how many embedding groups it keeps and its plan."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"unknown mode {self.name!r}; choose one of {', '.join(MODES)}")

    @property
    def chunked(self) -> bool:
        """Whether the training split is consumed as ordered chunks (days)."""
        return self.name == "meda-continual"

    def groups(self, epochs: int) -> int:
        """Number of embedding groups (k) the mode keeps."""
        return epochs if self.chunked else 1

    def plan(self, epochs: int, n_chunks: int = 1) -> list[Pass]:
        """The passes of a run of ``epochs`` epochs (over ``n_chunks`` chunks for meda-continual)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if self.name == "one-epoch":
            return [Pass(0, 1)]
        if not self.chunked:
            return [Pass(e, e + 1, reinit=self.name == "meda" and e > 0) for e in range(epochs)]
        if n_chunks < 1:
            raise ValueError("meda-continual needs at least one training chunk")
        return [
            Pass(c * epochs + g, c + 1, chunk=c, group=g, opens_epoch=g == 0, closes_epoch=g == epochs - 1)
            for c in range(n_chunks)
            for g in range(epochs)
        ]
