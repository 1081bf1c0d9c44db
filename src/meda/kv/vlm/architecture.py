"""The architecture of ``meda-vlm-mini``: SmolLM2-135M-Instruct + a small CLIP vision tower + a projector.

A LLaVA model (``LlavaForConditionalGeneration``): images of ``IMAGE_SIZE`` pixels are cut into
``PATCH_SIZE`` patches by a 4-layer CLIP vision encoder trained from scratch; its patch features (the CLS
token dropped) go through LLaVA's two-layer projector into SmolLM2's embedding space, so one image is
:data:`TOKENS_PER_IMAGE` tokens. The language model is frozen; a LoRA adapter of rank :data:`LORA_RANK` on
every projection of every decoder layer is trained with the vision side and merged into the weights at load.

The tokenizer gains one special token, ``<image>``; the embedding row of that token is never read (the
model writes image features there), so it is zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from meda.kv.eval.tasks_mm import IMAGE_SIZE

PATCH_SIZE = 4
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN = "<image>"
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
LORA_RANK = 16
LORA_ALPHA = 32.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# SmolLM2's own chat template (with its default system turn), extended to list-of-parts content so
# ``{"type": "image"}`` entries become the image token: a string turn and a parts turn render the same.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_processor(tokenizer: Any) -> Any:
    """A ``LlavaProcessor`` around SmolLM2's tokenizer: ``processor(text=..., images=...)`` expands each
    ``<image>`` into :data:`TOKENS_PER_IMAGE` image tokens and normalises the pixels."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def llava_config(text_config: Any, image_token_id: int) -> Any:
    """The LLaVA config: ``text_config`` (SmolLM2's, vocabulary grown to hold ``image_token_id``) and the
    small CLIP vision config."""
    from transformers import CLIPVisionConfig, LlavaConfig

    text = text_config.to_dict()
    text["vocab_size"] = max(text["vocab_size"], image_token_id + 1)
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, **VISION)
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )


def build_model(language_model: nn.Module, image_token_id: int, seed: int = 0) -> Any:
    """A ``LlavaForConditionalGeneration`` holding ``language_model``'s weights (a Llama causal LM) and a
    freshly initialised vision tower and projector (seeded).

    The embedding matrix grows by the rows up to ``image_token_id`` (zeros); with tied embeddings the
    head is the same tensor.
    """
    from transformers import LlavaForConditionalGeneration

    config = llava_config(language_model.config, image_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    source = language_model.state_dict()
    target = model.model.language_model
    rows = source["model.embed_tokens.weight"].shape[0]
    with torch.no_grad():
        missing, unexpected = target.load_state_dict(
            {k.removeprefix("model."): v for k, v in source.items() if k.startswith("model.") and "embed" not in k},
            strict=False,
        )
        if unexpected or [k for k in missing if "embed" not in k]:
            raise RuntimeError(f"language model weights do not fit: missing {missing}, unexpected {unexpected}")
        target.embed_tokens.weight.zero_()
        target.embed_tokens.weight[:rows] = source["model.embed_tokens.weight"]
        if model.lm_head.weight.data_ptr() != target.embed_tokens.weight.data_ptr():
            model.lm_head.weight.zero_()
            model.lm_head.weight[:rows] = source.get("lm_head.weight", source["model.embed_tokens.weight"])
    return model


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``: a frozen linear layer plus a trainable low-rank update.

    ``lora_a`` is ``[rank, in_features]`` (Kaiming-uniform), ``lora_b`` ``[out_features, rank]`` (zeros), so
    the wrapped layer starts equal to the base layer.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_a.to(x.dtype).t()) @ self.lora_b.to(x.dtype).t()
        return self.base(x) + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update ``scale * B A``, ``[out_features, in_features]``."""
        return self.scale * (self.lora_b @ self.lora_a)


def add_lora(model: Any, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> list[str]:
    """Wrap every :data:`LORA_TARGETS` linear layer of the language model in a :class:`LoRALinear`;
    returns the wrapped module names (relative to ``model.model.language_model``)."""
    lm = model.model.language_model
    names = [
        name
        for name, module in lm.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(module, nn.Linear)
    ]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = lm.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def merge_lora(model: Any) -> int:
    """Fold every :class:`LoRALinear` back into a plain linear layer (``W += scale * B A``); returns how many."""
    lm = model.model.language_model
    wrapped = [(name, module) for name, module in lm.named_modules() if isinstance(module, LoRALinear)]
    with torch.no_grad():
        for name, module in wrapped:
            parent_name, child = name.rsplit(".", 1)
            base = module.base
            base.weight += module.delta().to(base.weight.dtype)
            setattr(lm.get_submodule(parent_name), child, base)
    return len(wrapped)


def trainable_state(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The weights the project trains, by file: ``vision`` (vision tower + projector, keys relative to
    ``model.model``) and ``lora`` (``<module>.lora_a`` / ``.lora_b``, relative to the language model)."""
    inner = model.model
    vision = {f"vision_tower.{k}": v for k, v in inner.vision_tower.state_dict().items()}
    vision |= {f"multi_modal_projector.{k}": v for k, v in inner.multi_modal_projector.state_dict().items()}
    lora = {k: v for k, v in inner.language_model.state_dict().items() if ".lora_" in k}
    return {"vision": vision, "lora": lora}


def load_trainable(model: Any, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load :func:`trainable_state` output into ``model`` (LoRA already added); every key must match."""
    inner = model.model
    own = trainable_state(model)
    for part in ("vision", "lora"):
        if set(state[part]) != set(own[part]):
            extra, lacking = set(state[part]) - set(own[part]), set(own[part]) - set(state[part])
            raise ValueError(
                f"{part} weights do not match the architecture: extra {sorted(extra)[:3]}, "
                f"missing {sorted(lacking)[:3]}"
            )
    with torch.no_grad():
        for key, value in state["vision"].items():
            own["vision"][key].copy_(value)
        lm_params = dict(inner.language_model.named_parameters())
        for key, value in state["lora"].items():
            lm_params[key].copy_(value)
