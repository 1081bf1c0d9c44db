"""Random-weight models of every family meda.kv supports, with ready-made ``generate`` inputs.

``build_tiny(family)`` builds a tiny model (4 decoder layers, hidden 64, 4 query / 2 KV heads, vocab 512,
two-layer vision towers) from a config alone, so tests run offline in well under a second per generate.
``build_shaped(preset)`` builds the same families at a real 7B shape (random weights, no download) for
GPU smoke runs. Both return a :class:`TinyModel`, whose ``inputs`` method writes prompts the way each
family's processor would: text, then the image (or video) placeholder run, then a final question.

Vocabulary layout of the tiny models: 0 pad, 1 bos, 2 eos, text tokens in ``[3, 500)``, and the image,
video, vision-start and vision-end tokens at 508-511. Text prompts draw only from the text range, so a
prompt never holds a special token by accident (real-shaped presets keep their real special ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from meda.kv.models import TEXT_FAMILIES, VISION_FAMILIES

FAMILIES: tuple[str, ...] = TEXT_FAMILIES + VISION_FAMILIES
VLM_FAMILIES: tuple[str, ...] = VISION_FAMILIES
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_IDS = (3, 500)
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 508, 509, 510, 511
QUESTION_TOKENS = 8
DEFAULT_LENGTH = 96

TINY_TEXT = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "tie_word_embeddings": False,
}
# Mistral-7B-v0.1 used a 4096-token sliding window; v0.2+ and the tiny model use full attention.
TEXT_EXTRAS: dict[str, dict[str, Any]] = {"mistral": {"sliding_window": None}}


@dataclass(frozen=True)
class Media:
    """One prompt's vision input: its placeholder run and its tensors (batch dim first, concatenated)."""

    tokens: list[int]
    tensors: dict[str, torch.Tensor]


MediaBuilder = Callable[[Any, torch.Generator, bool], Media]


@dataclass
class TinyModel:
    """A random-weight model in eval mode and a generator of prompts that fit it.

    Attributes:
        family: ``config.model_type``.
        model: the transformers model (eval mode).
        image_token_id / video_token_id: placeholder ids of this model (None where it has none).
        question_tokens: length of the final question; the last ``question_tokens`` tokens of every prompt.
    """

    family: str
    model: Any
    image_token_id: int | None
    video_token_id: int | None
    question_tokens: int = QUESTION_TOKENS
    media_builder: MediaBuilder | None = field(default=None, repr=False)
    mark_token_types: bool = False

    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self.media_builder is not None

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Ids of every image/video placeholder token of this model."""
        return tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)

    def inputs(
        self, batch: int, *, lengths: list[int] | None = None, video: bool = False, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """``generate`` kwargs for ``batch`` prompts, left-padded to the longest.

        Prompt ``i`` is ``[bos] context [media] question`` of ``lengths[i]`` tokens (image/video tokens
        included) drawn from ``seed + i``: row ``i`` of ``inputs(b, seed=s)`` equals
        ``inputs(1, lengths=[lengths[i]], seed=s + i)``. Default lengths are 96, 112, 80, 96, ...

        Returns:
            ``input_ids`` and ``attention_mask`` ``[batch, max_len]``, plus for VLMs the vision tensors
            (``pixel_values`` and ``image_grid_thw`` / ``image_sizes``, or ``pixel_values_videos`` and
            ``video_grid_thw``) and, for the Qwen-VL families, ``mm_token_type_ids`` (1 image, 2 video).
        """
        if video and not self.is_vlm:
            raise ValueError(f"{self.family} takes no video; video inputs work for {VIDEO_FAMILIES}")
        lengths = lengths if lengths is not None else default_lengths(batch)
        if len(lengths) != batch:
            raise ValueError(f"got {len(lengths)} lengths for a batch of {batch}")
        rows, media = [], []
        for i, length in enumerate(lengths):
            generator = torch.Generator().manual_seed(seed + i)
            item = self.media_builder(self.model.config, generator, video) if self.media_builder else None
            rows.append(self._prompt(length, item.tokens if item else [], generator))
            media.append(item)
        out = _left_pad(rows, pad_id=_pad_id(self.model.config))
        if self.mark_token_types:
            out["mm_token_type_ids"] = token_types(out["input_ids"], self.image_token_id, self.video_token_id)
        if self.is_vlm:
            out |= {key: torch.cat([m.tensors[key] for m in media]) for key in media[0].tensors}
        return {key: _to_model(value, self.model) for key, value in out.items()}

    def _prompt(self, length: int, media: list[int], generator: torch.Generator) -> list[int]:
        """``[bos] context media question``, ``length`` tokens in all."""
        context = length - 1 - len(media) - self.question_tokens
        if context < 1:
            raise ValueError(
                f"a {self.family} prompt needs at least {len(media) + self.question_tokens + 2} tokens "
                f"({len(media)} of them vision tokens), got {length}"
            )
        text = torch.randint(*TEXT_IDS, (context + self.question_tokens,), generator=generator).tolist()
        return [BOS_ID, *text[:context], *media, *text[context:]]


def default_lengths(batch: int) -> list[int]:
    """Prompt lengths used when none are given: 96 for one prompt, then 112, 80, 96, ... (all different)."""
    return [DEFAULT_LENGTH + 16 * ((i + 1) % 3 - 1) for i in range(batch)]


def token_types(input_ids: torch.Tensor, image_id: int | None, video_id: int | None) -> torch.Tensor:
    """``mm_token_type_ids`` as the Qwen-VL processors write them: 0 text, 1 image, 2 video."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    for value, token in ((1, image_id), (2, video_id)):
        if token is not None:
            types[input_ids == token] = value
    return types


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` ``[batch, max_len]``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(config: Any) -> int:
    text = getattr(config, "text_config", config)
    return text.pad_token_id if text.pad_token_id is not None else PAD_ID


def _to_model(value: torch.Tensor, model: Any) -> torch.Tensor:
    """Move to the model's device; floating tensors (pixels) also take its dtype."""
    dtype = model.dtype if value.is_floating_point() else None
    return value.to(device=model.device, dtype=dtype)


# ---------------------------------------------------------------- vision inputs, one builder per processor


def qwen_vl_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` + t*h*w/merge^2 pads + ``<|vision_end|>``.

    Patches are flattened to ``[t*h*w, channels * temporal_patch * patch^2]`` with the grid in
    ``image_grid_thw`` (images repeat their frame over the temporal patch, so t = 1) or
    ``video_grid_thw``; Qwen2.5-VL videos also get ``second_per_grid_ts`` (temporal_patch / fps, fps 2).
    """
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (2, 4 * merge, 4 * merge) if video else (1, 6 * merge, 8 * merge)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(math.prod(grid), width, generator=generator)
    placeholder = config.video_token_id if video else config.image_token_id
    tokens = [config.vision_start_token_id, *[placeholder] * (math.prod(grid) // merge**2), config.vision_end_token_id]
    grid_thw = torch.tensor([grid])
    if not video:
        return Media(tokens, {"pixel_values": pixels, "image_grid_thw": grid_thw})
    tensors = {"pixel_values_videos": pixels, "video_grid_thw": grid_thw}
    if config.model_type == "qwen2_5_vl":
        tensors["second_per_grid_ts"] = torch.tensor([vision.temporal_patch_size / 2.0])
    return Media(tokens, tensors)


def llava_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """LLaVA-1.5: one square image, ``(size / patch)^2`` ``<image>`` tokens (+1 with the "full" strategy)."""
    _no_video(config, video)
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return Media([_config_id(config, "image_token_id", "image_token_index")] * count, {"pixel_values": pixels})


ONEVISION_IMAGE_SIZE = (12, 60)  # (height, width): a 1x2 anyres crop grid whose unpadding drops rows


def onevision_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """LLaVA-OneVision anyres: base crop + best-resolution crops, unpadded features and row newlines.

    ``pixel_values`` is ``[1, crops, channels, size, size]`` and ``image_sizes`` ``[1, 2]`` (height, width).
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    _no_video(config, video)
    vision = config.vision_config
    crops = image_size_to_num_patches(ONEVISION_IMAGE_SIZE, config.image_grid_pinpoints, vision.image_size)
    shape = (1, crops, vision.num_channels, vision.image_size, vision.image_size)
    pixels = torch.randn(*shape, generator=generator)
    count = onevision_image_tokens(config, *ONEVISION_IMAGE_SIZE)
    sizes = torch.tensor([ONEVISION_IMAGE_SIZE])
    tokens = [_config_id(config, "image_token_id", "image_token_index")] * count
    return Media(tokens, {"pixel_values": pixels, "image_sizes": sizes})


def onevision_image_tokens(config: Any, height: int, width: int) -> int:
    """Image tokens of one ``height x width`` image, computed as ``LlavaOnevisionProcessor`` does."""
    from transformers.image_processing_utils import select_best_resolution

    side = config.vision_config.image_size
    patches = side // config.vision_config.patch_size
    best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
    rows, cols = patches * (best_height // side), patches * (best_width // side)
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    unpadded, newlines = rows * cols, rows
    max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_crops * patches**2))
    if ratio > 1.1:
        unpadded, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
    count = patches**2 + unpadded + newlines
    return count - (config.vision_feature_select_strategy == "default")


def _no_video(config: Any, video: bool) -> None:
    if video:
        raise ValueError(f"tiny {config.model_type} models take images only; video works for {VIDEO_FAMILIES}")


# ---------------------------------------------------------------- configs


def _text(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Tiny decoder config kwargs of a text family (also the language model inside a VLM)."""
    return {"model_type": family, **TINY_TEXT, **TEXT_EXTRAS.get(family, {}), **overrides}


def _text_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Top-level config kwargs of a text family (``model_type`` is the family itself)."""
    return {key: value for key, value in _text(family, overrides).items() if key != "model_type"}


def _qwen_vl_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL / Qwen2.5-VL: M-RoPE decoder and a two-block vision tower (Qwen2.5: windowed + one full block)."""
    text = _text(f"{family}_text", overrides)
    half = text["head_dim"] // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _thirds(half)}
    vision = {
        "qwen2_vl": {"depth": 2, "embed_dim": 32, "hidden_size": text["hidden_size"], "num_heads": 2, "mlp_ratio": 2},
        "qwen2_5_vl": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": text["hidden_size"],
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "tokens_per_second": 2,
        },
    }[family]
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
    }


def _thirds(half: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) over ``half`` rotary frequencies, in the 16:24:24 ratio."""
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _llava_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-1.5: llama decoder, CLIP tower (CLS dropped by the "default" feature strategy)."""
    return {
        "text_config": _text("llama", overrides),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
            "projection_dim": 32,
        },
        "image_token_index": IMAGE_ID,
        "image_seq_length": (32 // 4) ** 2,
    }


def _onevision_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-OneVision: qwen2 decoder, SigLIP tower (no CLS, "full" strategy), anyres crop grids up to 3x3."""
    side = 32
    return {
        "text_config": _text("qwen2", overrides),
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": 8,
        },
        "image_token_index": IMAGE_ID,
        "video_token_index": VIDEO_ID,
        "image_grid_pinpoints": [[side * h, side * w] for h in (1, 2, 3) for w in (1, 2, 3)],
    }


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family: config kwargs from shape overrides, and its vision inputs."""

    config: Callable[[str, dict[str, Any]], dict[str, Any]]
    media: MediaBuilder | None = None
    mark_token_types: bool = False


SPECS: dict[str, FamilySpec] = {
    **{name: FamilySpec(_text_config) for name in TEXT_FAMILIES},
    "llava": FamilySpec(_llava_config, llava_media),
    "llava_onevision": FamilySpec(_onevision_config, onevision_media),
    "qwen2_vl": FamilySpec(_qwen_vl_config, qwen_vl_media, mark_token_types=True),
    "qwen2_5_vl": FamilySpec(_qwen_vl_config, qwen_vl_media, mark_token_types=True),
}


def tiny_config(family: str, **shape_overrides: Any) -> Any:
    """The tiny transformers config of ``family``; ``shape_overrides`` go to the (text) decoder config."""
    from transformers import AutoConfig

    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; tiny models exist for {', '.join(FAMILIES)}")
    kwargs = SPECS[family].config(family, shape_overrides)
    return AutoConfig.for_model(family, **kwargs)


QWEN2_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
QWEN_VL_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
MROPE_7B = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}

# name -> (family, config kwargs): real 7B shapes from the published config.json files.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-7b": ("qwen2", {**QWEN2_7B_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2-vl-7b": (
        "qwen2_vl",
        {
            "text_config": {**QWEN2_7B_TEXT, "model_type": "qwen2_vl_text", "rope_parameters": MROPE_7B},
            "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4},
            **QWEN_VL_IDS,
        },
    ),
    "qwen2.5-vl-7b": (
        "qwen2_5_vl",
        {
            "text_config": {
                **QWEN2_7B_TEXT,
                "model_type": "qwen2_5_vl_text",
                "max_position_embeddings": 128000,
                "rope_parameters": MROPE_7B,
            },
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "fullatt_block_indexes": [7, 15, 23, 31],
                "window_size": 112,
                "tokens_per_second": 2,
            },
            **QWEN_VL_IDS,
        },
    ),
}


def config_preset(name: str) -> Any:
    """The transformers config of a real model shape (``PRESETS``), without downloading anything."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    family, kwargs = PRESETS[name]
    return AutoConfig.for_model(family, **kwargs)


def build_shaped(
    preset: str = "qwen2-vl-7b",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> TinyModel:
    """A random-weight model of a real shape (e.g. Qwen2-VL-7B), initialised directly on ``device``.

    For GPU speed and memory smoke runs; ``device="meta"`` builds it without allocating weights.
    """
    config = config_preset(preset)
    return _wrap(config.model_type, config, attn_implementation, seed, dtype, device)


def build_tiny(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **shape_overrides: Any,
) -> TinyModel:
    """A tiny random ``family`` model (deterministic in ``seed``), eval mode, on the CPU.

    ``shape_overrides`` (e.g. ``num_hidden_layers=2``) go to the decoder config. Generation never stops
    early (no eos), so ``generate(max_new_tokens=n)`` always returns ``n`` new tokens per row.
    """
    return _wrap(family, tiny_config(family, **shape_overrides), attn_implementation, seed, dtype, "cpu")


def _wrap(family: str, config: Any, attn: str, seed: int, dtype: torch.dtype, device: str) -> TinyModel:
    """Instantiate ``config`` with seeded random weights and pair it with its prompt builder."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    spec = SPECS[family]
    auto = AutoModelForImageTextToText if spec.media else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = _pad_id(config)
    return TinyModel(
        family=family,
        model=model,
        image_token_id=_config_id(config, "image_token_id", "image_token_index") if spec.media else None,
        video_token_id=_config_id(config, "video_token_id", "video_token_index") if spec.media else None,
        media_builder=spec.media,
        mark_token_types=spec.mark_token_types,
    )


def _config_id(config: Any, *names: str) -> int | None:
    for name in names:
        if (value := getattr(config, name, None)) is not None:
            return int(value)
    return None
