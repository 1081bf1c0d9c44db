"""Numeric field transforms, fitted on the training split only.

Dense transforms keep a numeric field numeric (one float per row); bucket
transforms turn it into a categorical field (one index per row, embedded like
any ID). Missing values (NaN) become 0.0 for dense transforms and their own
bucket (index 2) for bucket transforms.

=============  =======  ==========================================================
name           output   value
=============  =======  ==========================================================
``log``        dense    ``sign(x) * log1p(|x|)`` (plain signed log1p; the default)
``standardise`` dense   ``(x - mean) / std`` with train mean/std
``raw``        dense    ``x``
``bucket``     index    quantile bucket of ``x``, edges at train quantiles
``log-bucket`` index    Criteo winner / FuxiCTR: ``floor(log(x)^2)`` for ``x > 2``, else
                        ``floor(x)``; one bucket per distinct value seen in train
=============  =======  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from meda.ctr.features import OOV_INDEX

MISSING_BUCKET = 2  # index of "missing" in bucketised fields (0 = padding, 1 = OOV)
_FIRST_BUCKET = 3
NUMERIC_TRANSFORMS = ("log", "standardise", "raw", "bucket", "log-bucket")


class NumericTransform(Protocol):
    """Fitted transform of one numeric column (float64 ``[rows]``, NaN = missing)."""

    categorical: bool  # output is an index (embedded) rather than a dense float

    @property
    def size(self) -> int:
        """Embedding rows of a bucketised field (0 for dense output)."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[rows]`` (dense) or int64 ``[rows]`` indices (bucketised)."""

    def to_state(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SignedLog:
    """``sign(x) * log1p(|x|)``; missing -> 0."""

    categorical: bool = False
    size: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        return {"type": "log"}


@dataclass(frozen=True)
class Raw:
    """``x`` unchanged; missing -> 0."""

    categorical: bool = False
    size: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num(x).astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        return {"type": "raw"}


@dataclass(frozen=True)
class Standardise:
    """``(x - mean) / std`` with the train mean and std; missing -> 0 (the mean)."""

    mean: float
    std: float
    categorical: bool = False
    size: int = 0

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardise:
        seen = x[~np.isnan(x)]
        if seen.size == 0:
            return cls(0.0, 1.0)
        std = float(seen.std())
        return cls(float(seen.mean()), std if std > 0 else 1.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - self.mean) / self.std).astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        return {"type": "standardise", "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class QuantileBuckets:
    """Buckets between train quantiles: index ``3 + searchsorted(edges, x, 'right')``; missing -> 2.

    Attributes:
        edges: sorted distinct inner edges, float64 ``[n_edges]`` (at most ``n_buckets - 1``).
    """

    edges: np.ndarray
    categorical: bool = True

    @classmethod
    def fit(cls, x: np.ndarray, n_buckets: int) -> QuantileBuckets:
        if n_buckets < 2:
            raise ValueError(f"n_buckets must be >= 2, got {n_buckets}")
        seen = x[~np.isnan(x)]
        if seen.size == 0:
            return cls(np.zeros(0))
        return cls(np.unique(np.quantile(seen, np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])))

    @property
    def size(self) -> int:
        return _FIRST_BUCKET + len(self.edges) + 1

    def apply(self, x: np.ndarray) -> np.ndarray:
        idx = _FIRST_BUCKET + np.searchsorted(self.edges, np.nan_to_num(x), side="right")
        return np.where(np.isnan(x), MISSING_BUCKET, idx).astype(np.int64)

    def to_state(self) -> dict[str, Any]:
        return {"type": "bucket", "edges": self.edges.tolist()}


@dataclass(frozen=True)
class LogBuckets:
    """Criteo winner's integer buckets ``floor(log(x)^2)`` (x > 2) or ``floor(x)``, one index per
    value seen in train (``values[i]`` -> ``3 + i``); unseen values -> OOV (1), missing -> 2.

    Attributes:
        values: sorted bucket values seen in train, int64 ``[n]``.
    """

    values: np.ndarray
    categorical: bool = True

    @staticmethod
    def bucket_of(x: np.ndarray) -> np.ndarray:
        """float64 ``[rows]`` (no NaN) -> int64 bucket values ``[rows]``."""
        big = x > 2
        out = np.floor(x).astype(np.int64)
        out[big] = np.floor(np.log(x[big]) ** 2).astype(np.int64)
        return out

    @classmethod
    def fit(cls, x: np.ndarray) -> LogBuckets:
        return cls(np.unique(cls.bucket_of(x[~np.isnan(x)])))

    @property
    def size(self) -> int:
        return _FIRST_BUCKET + len(self.values)

    def apply(self, x: np.ndarray) -> np.ndarray:
        missing = np.isnan(x)
        b = self.bucket_of(np.where(missing, 0.0, x))
        pos = np.minimum(np.searchsorted(self.values, b), max(len(self.values) - 1, 0))
        known = self.values[pos] == b if len(self.values) else np.zeros(len(b), dtype=bool)
        idx = np.where(known, _FIRST_BUCKET + pos, OOV_INDEX)
        return np.where(missing, MISSING_BUCKET, idx).astype(np.int64)

    def to_state(self) -> dict[str, Any]:
        return {"type": "log-bucket", "values": self.values.tolist()}


def fit_numeric(name: str, x: np.ndarray, *, n_buckets: int = 32) -> NumericTransform:
    """Fit the transform ``name`` (one of :data:`NUMERIC_TRANSFORMS`) on train values ``x`` ``[rows]``."""
    if name == "log":
        return SignedLog()
    if name == "raw":
        return Raw()
    if name == "standardise":
        return Standardise.fit(x)
    if name == "bucket":
        return QuantileBuckets.fit(x, n_buckets)
    if name == "log-bucket":
        return LogBuckets.fit(x)
    raise ValueError(f"unknown numeric transform {name!r}; use one of {NUMERIC_TRANSFORMS}")
