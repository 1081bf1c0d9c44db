"""Synthetic CTR data that reproduces one-epoch overfitting.

Each ID field draws its values from a Zipf law over ``cardinality`` values, so a few
IDs are frequent and most are rare. Every value has a bias and a latent vector;
a row's click logit is::

    logit = b0 + sum_f bias_f[x_f] + sum_{f<g} <v_f[x_f], v_g[x_g]> + numeric terms + N(0, noise^2)

and the label is Bernoulli(sigmoid(logit)). The split into train/valid/test is
done later, at random, so test IDs are also seen in training (as in Criteo/Avazu).
With an optional day column the popular IDs drift from day to day, for the
continual mode. Everything is vectorised numpy and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from meda.ctr.schema import CRITEO_CATEGORICAL, CRITEO_NUMERIC, FieldSpec, Schema, criteo_schema, sidecar_path

FORMATS = ("criteo", "csv", "parquet")


@dataclass(frozen=True)
class IdField:
    """A synthetic categorical field.

    Attributes:
        name: column name.
        cardinality: number of distinct values it can take.
        zipf: Zipf exponent of the value frequencies (0 = uniform).
        scalable: whether ``--cardinality`` / ``--zipf`` apply to it (the high-cardinality ID fields).
    """

    name: str
    cardinality: int
    zipf: float
    scalable: bool = True


@dataclass(frozen=True)
class Preset:
    """A synthetic data set recipe.

    Attributes:
        name: preset name used on the command line.
        description: one line for ``--help`` and reports.
        fields: categorical fields.
        n_numeric: count-like numeric fields (Criteo ``I1..``), log-normal with missing values.
        latent_dim: dimension of the true latent vectors.
        interaction: standard deviation of the pairwise-interaction part of the logit.
        bias: standard deviation of the per-value bias part of the logit.
        noise: standard deviation of the Gaussian logit noise (label noise).
        ctr: approximate mean click rate (sets the global bias).
        days: number of days (0 = no day column).
        drift: fraction of the ID space by which popularity ranks shift each day.
        criteo_layout: the fields are exactly Criteo's, so the Criteo TSV format applies.
    """

    name: str
    description: str
    fields: tuple[IdField, ...]
    n_numeric: int = 0
    latent_dim: int = 8
    interaction: float = 1.0
    bias: float = 1.0
    noise: float = 0.5
    ctr: float = 0.25
    days: int = 0
    drift: float = 0.0
    criteo_layout: bool = False


_SMALL_FIELDS = (IdField("ad_type", 12, 0.5, False), IdField("position", 6, 1.0, False),
                 IdField("category", 120, 1.0, False))  # fmt: skip

# Criteo Kaggle cardinalities of C1..C26 (scaled down by --cardinality, the cap).
_CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "zipf",
            "two Zipf ID fields of 100k values + three small fields: shows the epoch-2 AUC drop (500k rows)",
            (IdField("user_id", 100_000, 1.05), IdField("item_id", 100_000, 1.05), *_SMALL_FIELDS),
        ),
        Preset(
            "low-cardinality",
            "the zipf preset with ~500 values per ID field: no one-epoch overfitting expected",
            (IdField("user_id", 500, 1.05), IdField("item_id", 500, 1.05), *_SMALL_FIELDS),
        ),
        Preset(
            "criteo",
            "Criteo layout: 13 count features + 26 categorical fields with Criteo-like cardinalities",
            tuple(
                IdField(name, card, 1.3, True)
                for name, card in zip(CRITEO_CATEGORICAL, _CRITEO_CARDINALITIES, strict=True)
            ),
            n_numeric=13,
            criteo_layout=True,
        ),
        Preset(
            "days",
            "the zipf preset over 10 days with drifting ID popularity, for the continual mode",
            (IdField("user_id", 100_000, 1.05), IdField("item_id", 100_000, 1.05), *_SMALL_FIELDS),
            days=10,
            drift=0.02,
        ),
    )
}


def resolve_preset(
    preset: str | Preset,
    *,
    cardinality: int | None = None,
    zipf: float | None = None,
    noise: float | None = None,
    days: int | None = None,
) -> Preset:
    """Look up a preset and apply the command-line knobs.

    ``cardinality`` sets the size of the scalable ID fields (for the criteo preset: caps every
    field), ``zipf`` their exponent, ``noise`` the logit noise, ``days`` the day count.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    fields = []
    for f in preset.fields:
        if f.scalable and cardinality is not None:
            card = min(f.cardinality, cardinality) if preset.criteo_layout else cardinality
            f = replace(f, cardinality=max(1, card))
        if f.scalable and zipf is not None:
            f = replace(f, zipf=zipf)
        fields.append(f)
    changes: dict[str, object] = {"fields": tuple(fields)}
    if noise is not None:
        changes["noise"] = noise
    if days is not None:
        changes["days"] = days
    return replace(preset, **changes)


def generate(preset: str | Preset, rows: int, *, seed: int = 0, **knobs: float | int | None) -> pa.Table:
    """Generate ``rows`` synthetic impressions as an Arrow table.

    Columns: ``label`` (int8 0/1), ``day`` (int64, if the preset has days), the numeric
    fields (int64 with nulls for missing), then the categorical fields (int64 IDs, or
    8-character hex strings for the Criteo layout). ``knobs`` go to :func:`resolve_preset`.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    p = resolve_preset(preset, **knobs)
    rng = np.random.default_rng(seed)
    day = np.sort(rng.integers(0, p.days, size=rows)) if p.days > 0 else None

    n_pairs = max(1, len(p.fields) * (len(p.fields) - 1) // 2)
    latent_std = np.sqrt(p.interaction / np.sqrt(n_pairs * p.latent_dim))
    bias_std = p.bias / np.sqrt(len(p.fields))
    vec_sum = np.zeros((rows, p.latent_dim), dtype=np.float32)
    sq_sum = np.zeros(rows, dtype=np.float32)
    logit = np.zeros(rows, dtype=np.float32)
    ids: dict[str, np.ndarray] = {}
    for f in p.fields:
        ids[f.name] = _sample_ids(rng, f, rows, day, p.drift)
        values, inverse = np.unique(ids[f.name], return_inverse=True)
        vec = rng.normal(0.0, latent_std, size=(values.size, p.latent_dim)).astype(np.float32)[inverse]
        vec_sum += vec
        sq_sum += np.einsum("rd,rd->r", vec, vec)
        logit += rng.normal(0.0, bias_std, size=values.size).astype(np.float32)[inverse]
    logit += 0.5 * (np.einsum("rd,rd->r", vec_sum, vec_sum) - sq_sum)

    numeric: dict[str, pa.Array] = {}
    for i in range(p.n_numeric):
        counts, missing, effect = _numeric_column(rng, rows)
        logit += effect / np.sqrt(p.n_numeric)
        numeric[CRITEO_NUMERIC[i] if p.criteo_layout else f"n{i + 1}"] = pa.array(counts, mask=missing)

    logit += rng.normal(0.0, p.noise, size=rows).astype(np.float32)
    logit += _global_bias(logit, p.ctr)
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)

    columns: dict[str, pa.Array] = {"label": pa.array(label)}
    if day is not None:
        columns["day"] = pa.array(day)
    columns.update(numeric)
    for name, col in ids.items():
        columns[name] = _hex_tokens(col) if p.criteo_layout else pa.array(col)
    return pa.table(columns)


def schema_for(preset: str | Preset, fmt: str, **knobs: float | int | None) -> Schema:
    """The :class:`Schema` that reads back what :func:`write` produced for this preset."""
    p = resolve_preset(preset, **knobs)
    if fmt == "criteo":
        _check_criteo_layout(p)
        return criteo_schema()
    fields = tuple(FieldSpec(f"n{i + 1}", "numeric") for i in range(p.n_numeric))
    if p.criteo_layout:
        fields = tuple(FieldSpec(n, "numeric") for n in CRITEO_NUMERIC[: p.n_numeric])
    fields += tuple(FieldSpec(f.name, "categorical") for f in p.fields)
    return Schema(fields=fields, label="label", day="day" if p.days > 0 else None)


def write(table: pa.Table, out: str | Path, fmt: str, schema: Schema) -> list[Path]:
    """Write a generated table as ``fmt`` (criteo TSV, csv or parquet).

    csv and parquet also get a ``<out>.schema.json`` sidecar, which
    :func:`meda.ctr.data.load_dataset` picks up when no schema is passed.
    Returns the paths written.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, out)
    else:
        if fmt == "criteo":
            table = table.select(list(schema.columns or ()))
        options = pacsv.WriteOptions(include_header=schema.header, delimiter=schema.delimiter, quoting_style="none")
        pacsv.write_csv(table, out, write_options=options)
    if fmt == "criteo":
        return [out]
    return [out, schema.save(sidecar_path(out))]


def _check_criteo_layout(p: Preset) -> None:
    if not p.criteo_layout:
        raise ValueError(
            f"preset {p.name!r} does not have Criteo's 13 numeric + 26 categorical fields; "
            "write it with --format csv or --format parquet, or use --preset criteo"
        )


def _sample_ids(rng: np.random.Generator, f: IdField, rows: int, day: np.ndarray | None, drift: float) -> np.ndarray:
    """Zipf-distributed IDs ``[rows]`` in ``[0, cardinality)``; rank -> ID is a random permutation."""
    ranks = np.arange(1, f.cardinality + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-f.zipf)
    rank = np.searchsorted(cdf, rng.random(rows) * cdf[-1], side="right")
    rank = np.minimum(rank, f.cardinality - 1)
    if day is not None and drift > 0:
        rank = (rank + day * round(drift * f.cardinality)) % f.cardinality
    return rng.permutation(f.cardinality)[rank]


def _numeric_column(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Criteo-like count column: (int64 counts ``[rows]``, missing mask, logit effect ``[rows]``)."""
    mu, sigma = rng.uniform(0.0, 4.0), rng.uniform(0.5, 2.0)
    log_counts = rng.normal(mu, sigma, size=rows)
    counts = np.floor(np.expm1(np.clip(log_counts, 0.0, 20.0))).astype(np.int64)
    missing = rng.random(rows) < rng.uniform(0.0, 0.4)
    weight = rng.normal(0.0, 0.5)
    effect = np.where(missing, 0.0, weight * (log_counts - mu) / sigma).astype(np.float32)
    return counts, missing, effect


def _global_bias(logit: np.ndarray, ctr: float) -> float:
    """The shift that makes the mean of sigmoid(logit + shift) about ``ctr`` (bisection)."""
    lo, hi = -20.0, 20.0
    sample = logit[:: max(1, logit.size // 100_000)]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(sample + mid)))) < ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _hex_tokens(ids: np.ndarray) -> pa.Array:
    """IDs ``[rows]`` -> 8-character lowercase hex strings, as Criteo writes tokens."""
    lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    nibbles = (ids.astype(np.uint64)[:, None] >> shifts) & np.uint64(0xF)
    chars = np.ascontiguousarray(lut[nibbles.astype(np.intp)])
    return pa.array(chars.view("S8").ravel()).cast(pa.string())
