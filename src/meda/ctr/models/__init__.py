"""CTR models and their registry: :func:`build_model` by name.

Every model reads the same :class:`~meda.ctr.features.FeatureMap` through the shared
:class:`~meda.ctr.embedding.FeatureEmbedding` and returns click logits ``[B]``.
"""

from __future__ import annotations

import inspect
from typing import Any

from meda.ctr.features import FeatureMap
from meda.ctr.models.attention import AutoInt
from meda.ctr.models.base import MLP, CTRModel
from meda.ctr.models.cross import DCN, DCNv2
from meda.ctr.models.deep import DNN, DeepFM, WideDeep
from meda.ctr.models.linear import FM, LR
from meda.ctr.models.product import PNN

MODELS: dict[str, type[CTRModel]] = {
    "lr": LR,
    "fm": FM,
    "dnn": DNN,
    "widedeep": WideDeep,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNv2,
    "autoint": AutoInt,
    "pnn": PNN,
}


def model_options(name: str) -> dict[str, Any]:
    """Configurable options of model ``name`` and their defaults."""
    options: dict[str, Any] = {}
    for cls in _model_class(name).__mro__:  # a subclass taking **options inherits its base's options
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        for k, p in params.items():
            if k not in ("self", "feature_map") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                options.setdefault(k, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return options


def build_model(name: str, feature_map: FeatureMap, **cfg: Any) -> CTRModel:
    """Build model ``name`` (case-insensitive; see :data:`MODELS`) for ``feature_map``.

    ``cfg`` holds model options (``embedding_dim``, ``hidden_units``, ``dropout``,
    ``batch_norm``, ``embedding_init``, and per-model ones); options a model does not
    have are rejected with the list of those it has.
    """
    options = model_options(name)
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise TypeError(f"model {name!r} has no option(s) {unknown}; its options are {sorted(options)}")
    return _model_class(name)(feature_map, **cfg)


def _model_class(name: str) -> type[CTRModel]:
    key = name.lower().replace("&", "").replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[key]


__all__ = ["MLP", "MODELS", "CTRModel", "build_model", "model_options"]
