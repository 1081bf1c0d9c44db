"""Describe a CTR data set once: its columns, field kinds and file layout.

A :class:`Schema` says which column is the label, which are categorical, numeric
or multi-valued (sequence) features, where the optional day and group columns
are, and how a delimited text file is laid out. Built-in schemas cover the
Criteo TSV and Avazu CSV formats; others load from a small JSON or YAML file::

    {"label": "click", "delimiter": ",", "header": true, "day": "day",
     "fields": [{"name": "user_id", "kind": "categorical", "hash_buckets": 100000},
                {"name": "price", "kind": "numeric"},
                {"name": "history", "kind": "sequence", "separator": "|", "max_len": 20}]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

SpecKind = Literal["categorical", "numeric", "sequence"]
_KINDS = ("categorical", "numeric", "sequence")

# Columns an Avazu-style `hour` (YYMMDDHH) column is expanded into by the readers.
HOUR_OF_DAY = "hour_of_day"
WEEKDAY = "weekday"


@dataclass(frozen=True)
class FieldSpec:
    """One raw feature column and how to encode it.

    Attributes:
        name: column name in the file (or a column derived by the reader, e.g. ``hour_of_day``).
        kind: "categorical" (one token per row), "numeric" (one number per row; empty = missing)
            or "sequence" (several tokens per row joined by ``separator``).
        separator: token separator of a sequence field.
        max_len: padded length of a sequence field (longer rows keep their first ``max_len`` tokens).
        min_count: per-field override of the data set's ``min_count`` (tokens seen fewer
            times in the training split map to the OOV index).
        hash_buckets: if set, tokens are hashed into this many buckets instead of getting a
            vocabulary (for huge fields; no OOV, collisions instead).
    """

    name: str
    kind: SpecKind
    separator: str = "|"
    max_len: int = 10
    min_count: int | None = None
    hash_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}; use one of {_KINDS}")
        if self.kind == "sequence" and self.max_len < 1:
            raise ValueError(f"field {self.name!r}: a sequence field needs max_len >= 1")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"field {self.name!r}: hash_buckets must be >= 1 (or None for a vocabulary)")


@dataclass(frozen=True)
class Schema:
    """Every column of a CTR file that matters, described once.

    Attributes:
        fields: feature columns in the order models see them (within each kind).
        label: the 0/1 click column.
        columns: every column of the file in order, for files without a header row
            (None: the header names them).
        delimiter: field delimiter of text files.
        header: whether text files start with a header row.
        day: integer day/chunk column for continual training, or None.
        group: user (or other) column for group AUC, or None.
        hour: an Avazu-style ``YYMMDDHH`` column; the reader derives ``hour_of_day`` and
            ``weekday`` from it and, when ``day`` names a column not in the file, the day index.
    """

    fields: tuple[FieldSpec, ...]
    label: str = "label"
    columns: tuple[str, ...] | None = None
    delimiter: str = ","
    header: bool = True
    day: str | None = None
    group: str | None = None
    hour: str | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema lists fields more than once: {dupes}")
        if not self.fields:
            raise ValueError("schema has no feature fields; add at least one categorical or numeric field")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also listed as a feature field")

    def derived_columns(self) -> tuple[str, ...]:
        """Columns the reader computes rather than reads (from ``hour``)."""
        if self.hour is None:
            return ()
        derived = [HOUR_OF_DAY, WEEKDAY]
        if self.day is not None:
            derived.append(self.day)
        return tuple(derived)

    def source_columns(self) -> list[str]:
        """Columns that must be present in every input file, in a stable order."""
        wanted = [self.label, *(f.name for f in self.fields)]
        wanted += [c for c in (self.day, self.group, self.hour) if c is not None]
        derived = set(self.derived_columns())
        out: list[str] = []
        for name in wanted:
            if name not in derived and name not in out:
                out.append(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fields"] = [asdict(f) for f in self.fields]
        out["columns"] = list(self.columns) if self.columns is not None else None
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Schema:
        raw = dict(raw)
        unknown = set(raw) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown schema keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        if "fields" not in raw:
            raise ValueError("schema needs a 'fields' list of {name, kind, ...} entries")
        raw["fields"] = tuple(FieldSpec(**f) for f in raw["fields"])
        if raw.get("columns") is not None:
            raw["columns"] = tuple(raw["columns"])
        return cls(**raw)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema from a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in {".yaml", ".yml"}:
            try:
                import yaml
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml (or use JSON)") from e
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid schema in {path}: {e}") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def sidecar_path(data_file: str | Path) -> Path:
    """Where the schema of a csv/parquet file is looked for when none is passed: ``<file>.schema.json``."""
    data_file = Path(data_file)
    return data_file.with_name(data_file.name + ".schema.json")


CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


def criteo_schema() -> Schema:
    """Criteo display-ads TSV: label, I1..I13 (integers), C1..C26 (hex tokens); no header.

    Missing values are empty strings: a missing integer becomes "missing" for the numeric
    transform, a missing token is its own token ("").
    """
    fields = tuple(FieldSpec(n, "numeric") for n in CRITEO_NUMERIC) + tuple(
        FieldSpec(n, "categorical") for n in CRITEO_CATEGORICAL
    )
    return Schema(
        fields=fields,
        label="label",
        columns=("label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL),
        delimiter="\t",
        header=False,
    )


AVAZU_CATEGORICAL = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip


def avazu_schema() -> Schema:
    """Avazu CSV with header: id, click, hour (YYMMDDHH), then 21 categorical columns.

    ``id`` is ignored; ``hour`` becomes the categoricals ``hour_of_day`` and ``weekday`` and
    the day index ``day`` (days since the earliest date in the data) for continual mode.
    """
    fields = tuple(FieldSpec(n, "categorical") for n in (HOUR_OF_DAY, WEEKDAY, *AVAZU_CATEGORICAL))
    return Schema(fields=fields, label="click", delimiter=",", header=True, day="day", hour="hour")


BUILTIN_SCHEMAS = {"criteo": criteo_schema, "avazu": avazu_schema}
