"""Random-weight models of every family meda.kv is tested on, with ready-made ``generate`` inputs.

``build_tiny(family)`` builds a tiny model (4 decoder layers, hidden 64, 4 query / 2 KV heads, vocab 512,
two-layer vision towers) from a config alone, so tests run offline in well under a second per generate.
Sliding-window families (Gemma 2 / 3, Cohere 2) get a 32-token window, shorter than every prompt; Gemma 2
is always built with eager attention (transformers has no SDPA path with its soft-capping).
``build_shaped(preset)`` builds real 7B shapes (random weights, no download) for GPU smoke runs. Both
return a :class:`TinyModel`, whose ``inputs`` method writes prompts the way each family's processor would:
text, then the image (or video) tokens with the processor's own markers, then a final question.

Vocabulary layout of the tiny models: 0 pad, 1 bos, 2 eos, text tokens in ``[3, 500)``, media markers
(``<fake_token_around_image>`` / ``<img>``, ``</img>`` / ``[IMG_END]``, ``[IMG_BREAK]``, ``<global-img>``,
Idefics3 tile tokens) at 500-505, and the image, video, vision-start and vision-end tokens at 508-511. Text
prompts draw only from the text range, so a prompt never holds a special token by accident (real-shaped
presets keep their real special ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

TEXT_FAMILIES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
    "cohere2",
)
VLM_FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_onevision",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "mistral3",
    "internvl",
    "gemma3",
)
FAMILIES: tuple[str, ...] = TEXT_FAMILIES + VLM_FAMILIES
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# families whose sdpa path cannot apply their attention (Gemma 2's logit soft-capping): always built with eager
EAGER_ONLY: tuple[str, ...] = ("gemma2",)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_IDS = (3, 500)
# markers around / inside image runs: <fake_token_around_image> / <img> / [IMG_BREAK], </img> / [IMG_END],
# <global-img>, and Idefics3's tile tokens <row_1_col_1>, <row_1_col_2>
MEDIA_OPEN_ID, MEDIA_CLOSE_ID, IMAGE_BREAK_ID, GLOBAL_IMAGE_ID = 500, 501, 502, 503
TILE_IDS = (504, 505)
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 508, 509, 510, 511
SLIDING_WINDOW = 32  # shorter than every tiny prompt, so sliding layers really drop tokens
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
_HYBRID = ["sliding_attention", "full_attention"] * 2
# Mistral-7B-v0.1 used a 4096-token sliding window; v0.2+ and the tiny model use full attention.
# Gemma 2 / 3 alternate sliding and full layers here (Gemma 3 ships 5:1); Cohere 2 ships 3:1 as here.
# Gemma scales queries by query_pre_attn_scalar^-0.5 (not head_dim^-0.5), Gemma 2 soft-caps attention
# logits at 50; Granite scales logits by attention_multiplier (1/head_dim, as Granite 3 does).
TEXT_EXTRAS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "gemma2": {"sliding_window": SLIDING_WINDOW, "layer_types": _HYBRID, "query_pre_attn_scalar": 32},
    "gemma3_text": {"sliding_window": SLIDING_WINDOW, "layer_types": _HYBRID, "query_pre_attn_scalar": 32},
    "cohere2": {"sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "granite": {
        "attention_multiplier": 1 / 16,
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    },
}


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
    token_type_key: str | None = None

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
        if self.token_type_key:
            out[self.token_type_key] = token_types(out["input_ids"], self.image_token_id, self.video_token_id)
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


TIMESTAMP_TOKENS = 4  # Qwen3-VL writes "<0.5 seconds>" before each frame: a few text tokens


def qwen_vl_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``<|vision_start|>`` + t*h*w/merge^2 pads + ``<|vision_end|>``.

    Patches are flattened to ``[t*h*w, channels * temporal_patch * patch^2]`` with the grid in
    ``image_grid_thw`` (images repeat their frame over the temporal patch, so t = 1) or
    ``video_grid_thw``; Qwen2.5-VL videos also get ``second_per_grid_ts`` (temporal_patch / fps, fps 2).
    Qwen3-VL videos are one ``<t seconds><|vision_start|>`` + h*w/merge^2 pads + ``<|vision_end|>`` per
    temporal step, as ``Qwen3VLProcessor`` writes them (the timestamp is text).
    """
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (2, 4 * merge, 4 * merge) if video else (1, 6 * merge, 8 * merge)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(math.prod(grid), width, generator=generator)
    placeholder = config.video_token_id if video else config.image_token_id
    steps = grid[0] if video and config.model_type == "qwen3_vl" else 1
    tokens = []
    for _ in range(steps):
        stamp = torch.randint(*TEXT_IDS, (TIMESTAMP_TOKENS,), generator=generator).tolist() if steps > 1 else []
        pads = [placeholder] * (math.prod(grid) // steps // merge**2)
        tokens += [*stamp, config.vision_start_token_id, *pads, config.vision_end_token_id]
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


def anyres_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """LLaVA-NeXT / OneVision anyres: base crop + best-resolution crops, unpadded features and row newlines.

    ``pixel_values`` is ``[1, crops, channels, size, size]`` and ``image_sizes`` ``[1, 2]`` (height, width).
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    _no_video(config, video)
    vision = config.vision_config
    crops = image_size_to_num_patches(ONEVISION_IMAGE_SIZE, config.image_grid_pinpoints, vision.image_size)
    shape = (1, crops, vision.num_channels, vision.image_size, vision.image_size)
    pixels = torch.randn(*shape, generator=generator)
    count = anyres_image_tokens(config, *ONEVISION_IMAGE_SIZE)
    sizes = torch.tensor([ONEVISION_IMAGE_SIZE])
    tokens = [_config_id(config, "image_token_id", "image_token_index")] * count
    return Media(tokens, {"pixel_values": pixels, "image_sizes": sizes})


def anyres_image_tokens(config: Any, height: int, width: int) -> int:
    """Image tokens of one ``height x width`` image, computed as ``LlavaNextProcessor`` (and, with its
    ``anyres_max_N`` cap, ``LlavaOnevisionProcessor``) does."""
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
    if (aspect := getattr(config, "vision_aspect_ratio", None)) is not None:
        max_crops = int(aspect.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * patches**2))
        if ratio > 1.1:
            unpadded, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
    cls = config.vision_config.model_type == "clip_vision_model"  # CLIP's CLS, dropped by "default"
    count = patches**2 + cls + unpadded + newlines
    return count - (config.vision_feature_select_strategy == "default")


def onevision_image_tokens(config: Any, height: int, width: int) -> int:
    """Image tokens of one ``height x width`` image, computed as ``LlavaOnevisionProcessor`` does."""
    return anyres_image_tokens(config, height, width)


def idefics3_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """Idefics3 / SmolVLM with image splitting: a 1x2 grid of tiles, then the downscaled global image.

    Tokens as ``Idefics3Processor`` writes them: per tile ``<fake_token_around_image><row_1_col_j>`` + ``<image>``
    x seq, a newline after the row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x seq +
    ``<fake_token_around_image>``, with seq = (size / patch)^2 / scale_factor^2. ``pixel_values`` is
    ``[1, 3, channels, size, size]`` (tiles then the global image) with a full ``pixel_attention_mask``.
    """
    _no_video(config, video)
    vision = config.vision_config
    seq = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    image, newline = [config.image_token_id] * seq, int(torch.randint(*TEXT_IDS, (1,), generator=generator))
    tokens = [token for tile in TILE_IDS for token in (MEDIA_OPEN_ID, tile, *image)]
    tokens += [newline, newline, MEDIA_OPEN_ID, GLOBAL_IMAGE_ID, *image, MEDIA_OPEN_ID]
    shape = (1, len(TILE_IDS) + 1, vision.num_channels, vision.image_size, vision.image_size)
    pixels = torch.randn(*shape, generator=generator)
    mask = torch.ones(shape[0], shape[1], vision.image_size, vision.image_size, dtype=torch.bool)
    return Media(tokens, {"pixel_values": pixels, "pixel_attention_mask": mask})


PIXTRAL_IMAGE_SIZE = (32, 48)  # (height, width), multiples of patch x spatial merge


def pixtral_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """Mistral 3 (Pixtral tower): one ``[IMG]`` per merged patch, ``[IMG_BREAK]`` after each row and
    ``[IMG_END]`` in place of the last break, as ``PixtralProcessor`` writes them; ``image_sizes`` ``[1, 2]``."""
    _no_video(config, video)
    height, width = PIXTRAL_IMAGE_SIZE
    step = config.vision_config.patch_size * config.spatial_merge_size
    row = [config.image_token_index] * (width // step) + [IMAGE_BREAK_ID]
    tokens = row * (height // step)
    tokens[-1] = MEDIA_CLOSE_ID
    pixels = torch.randn(1, config.vision_config.num_channels, height, width, generator=generator)
    return Media(tokens, {"pixel_values": pixels, "image_sizes": torch.tensor([PIXTRAL_IMAGE_SIZE])})


INTERNVL_PATCHES = 3  # a 2:1 picture: two 1x2 tiles plus the thumbnail, as crop_to_patches makes it


def internvl_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """InternVL: ``<img>`` + ``<IMG_CONTEXT>`` x (seq x patches) + ``</img>``, seq = (size / patch)^2 x
    downsample_ratio^2, as ``InternVLProcessor`` writes it; ``pixel_values`` ``[patches, channels, size, size]``."""
    _no_video(config, video)
    vision = config.vision_config
    height, width = vision.image_size
    seq = round((height // vision.patch_size[0]) * (width // vision.patch_size[1]) * config.downsample_ratio**2)
    tokens = [MEDIA_OPEN_ID, *[config.image_token_id] * (seq * INTERNVL_PATCHES), MEDIA_CLOSE_ID]
    pixels = torch.randn(INTERNVL_PATCHES, vision.num_channels, height, width, generator=generator)
    return Media(tokens, {"pixel_values": pixels})


def gemma3_media(config: Any, generator: torch.Generator, video: bool) -> Media:
    """Gemma 3: ``<start_of_image>`` + ``<image_soft_token>`` x mm_tokens_per_image + ``<end_of_image>``, and
    ``token_type_ids`` 1 on the soft tokens (the processor's; the model attends bidirectionally within an image)."""
    _no_video(config, video)
    vision = config.vision_config
    tokens = [config.boi_token_index, *[config.image_token_index] * config.mm_tokens_per_image, config.eoi_token_index]
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return Media(tokens, {"pixel_values": pixels})


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
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: M-RoPE decoder (Qwen3: interleaved sections, q/k norms) and a two-block
    vision tower (Qwen2.5: windowed + one full block; Qwen3: learned position grid, DeepStack from block 0)."""
    text = _text(f"{family}_text", overrides)
    half = text["head_dim"] // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _thirds(half)}
    if family == "qwen3_vl":  # 24:20:20 of 64 in the real model; interleaved t/h/w frequencies
        text["rope_parameters"] |= {"mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
        text["rope_parameters"] |= {"mrope_interleaved": True}
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
        "qwen3_vl": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 8,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
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


def _llava_next_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-NeXT: mistral decoder (as LLaVA-NeXT-Mistral), CLIP tower with CLS, anyres grids up to 2x2."""
    side = 32
    return {
        "text_config": _text("mistral", overrides),
        "vision_config": {**_tower("clip_vision_model", side, 8), "projection_dim": 32},
        "image_token_index": IMAGE_ID,
        "image_grid_pinpoints": [[side * h, side * w] for h in (1, 2) for w in (1, 2)],
    }


def _idefics3_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Idefics3 / SmolVLM: llama decoder, SigLIP-like tower, pixel shuffle by ``scale_factor`` 2."""
    return {
        "text_config": _text("llama", overrides),
        "vision_config": _tower(f"{family}_vision", 32, 8),
        "scale_factor": 2,
        "image_token_id": IMAGE_ID,
    }


def _mistral3_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Mistral 3: mistral decoder, Pixtral tower (2-D RoPE over any image size), 2x2 patch merger."""
    vision = {**_tower("pixtral", 64, 8), "head_dim": 16}
    return {
        "text_config": _text("mistral", overrides),
        "vision_config": vision,
        "image_token_index": IMAGE_ID,
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
    }


def _internvl_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """InternVL 3: qwen2 decoder, InternViT tower, pixel shuffle by ``downsample_ratio`` 0.5."""
    vision = {**_tower("internvl_vision", 32, 8), "image_size": [32, 32], "patch_size": [8, 8]}
    return {
        "text_config": _text("qwen2", overrides),
        "vision_config": vision,
        "image_token_id": IMAGE_ID,
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
    }


def _gemma3_config(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3: gemma3_text decoder (sliding + full layers), SigLIP tower, 2x2-pooled image soft tokens."""
    return {
        "text_config": _text("gemma3_text", overrides),
        "vision_config": _tower("siglip_vision_model", 32, 8),
        "mm_tokens_per_image": 4,
        "image_token_index": IMAGE_ID,
        "boi_token_index": VISION_START_ID,
        "eoi_token_index": VISION_END_ID,
    }


def _tower(model_type: str, image_size: int, patch_size: int) -> dict[str, Any]:
    """A two-layer vision tower config of ``model_type`` (hidden 32, 2 heads)."""
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family: config kwargs from shape overrides, its vision inputs, and the processor's
    token-type key (``mm_token_type_ids`` for Qwen-VL, ``token_type_ids`` for Gemma 3), if any."""

    config: Callable[[str, dict[str, Any]], dict[str, Any]]
    media: MediaBuilder | None = None
    token_type_key: str | None = None


SPECS: dict[str, FamilySpec] = {
    **{name: FamilySpec(_text_config) for name in TEXT_FAMILIES},
    "llava": FamilySpec(_llava_config, llava_media),
    "llava_onevision": FamilySpec(_onevision_config, anyres_media),
    "llava_next": FamilySpec(_llava_next_config, anyres_media),
    **{
        name: FamilySpec(_qwen_vl_config, qwen_vl_media, token_type_key="mm_token_type_ids")
        for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    },
    "idefics3": FamilySpec(_idefics3_config, idefics3_media),
    "smolvlm": FamilySpec(_idefics3_config, idefics3_media),
    "mistral3": FamilySpec(_mistral3_config, pixtral_media),
    "internvl": FamilySpec(_internvl_config, internvl_media),
    "gemma3": FamilySpec(_gemma3_config, gemma3_media, token_type_key="token_type_ids"),
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
    early (no eos), so ``generate(max_new_tokens=n)`` always returns ``n`` new tokens per row. Families in
    ``EAGER_ONLY`` (Gemma 2) are built with eager attention whatever ``attn_implementation`` says.
    """
    return _wrap(family, tiny_config(family, **shape_overrides), attn_implementation, seed, dtype, "cpu")


def _wrap(family: str, config: Any, attn: str, seed: int, dtype: torch.dtype, device: str) -> TinyModel:
    """Instantiate ``config`` with seeded random weights and pair it with its prompt builder."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    spec = SPECS[family]
    attn = "eager" if family in EAGER_ONLY else attn
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
        token_type_key=spec.token_type_key,
    )


def _config_id(config: Any, *names: str) -> int | None:
    for name in names:
        if (value := getattr(config, name, None)) is not None:
            return int(value)
    return None
