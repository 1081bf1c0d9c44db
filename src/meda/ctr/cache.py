"""On-disk cache of encoded splits, keyed by input file identity + schema + options.

Layout: ``<cache_dir>/<key>/{train,valid,test}.<array>.npy`` plus ``meta.json``
(feature map and report). Arrays load memory-mapped, so a second run skips parsing
and reads only what it touches. A cache entry is written to a temporary folder and
renamed into place, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from meda.ctr.features import EncodedData, FeatureMap, Field

SPLITS = ("train", "valid", "test")
_ARRAYS = ("categorical", "numeric", "sequence", "label", "day", "group")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$MEDA_CACHE_DIR`` or ``~/.cache/meda/ctr``."""
    return Path(os.environ.get("MEDA_CACHE_DIR", Path.home() / ".cache" / "meda" / "ctr"))


def cache_key(files: list[Path], settings: dict[str, Any]) -> str:
    """Hash of every input file's resolved path, size and mtime, plus the settings (schema, options)."""
    identity = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    payload = json.dumps({"v": CACHE_VERSION, "files": identity, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load(entry: Path) -> tuple[FeatureMap, dict[str, EncodedData], dict[str, Any]] | None:
    """The cached (feature map, splits, report) at ``entry``, or None if there is none."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    fmap = FeatureMap([Field(**f) for f in meta["feature_map"]["fields"]], label=meta["feature_map"]["label"])
    splits = {}
    for split in SPLITS:
        arrays = {
            name: np.load(entry / f"{split}.{name}.npy", mmap_mode="r")
            for name in _ARRAYS
            if (entry / f"{split}.{name}.npy").is_file()
        }
        splits[split] = EncodedData(**arrays, skipped_rows=meta["skipped"][split])
    return fmap, splits, meta["report"]


def save(entry: Path, fmap: FeatureMap, splits: dict[str, EncodedData], report: dict[str, Any]) -> None:
    """Write a cache entry atomically (temporary folder, then rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        for split, data in splits.items():
            for name in _ARRAYS:
                arr = getattr(data, name)
                if arr is not None:
                    np.save(tmp / f"{split}.{name}.npy", np.ascontiguousarray(arr))
        meta = {
            "feature_map": {"fields": [asdict(f) for f in fmap.fields], "label": fmap.label},
            "skipped": {split: data.skipped_rows for split, data in splits.items()},
            "report": report,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if entry.exists():  # another process finished first: keep its entry
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
