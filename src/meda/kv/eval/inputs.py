"""Turn a :class:`~meda.kv.eval.tasks.Sample` into model inputs, the way a user would prompt the model.

The sample's text is the user turn of the model's chat template. For a vision-language model, each
:data:`~meda.kv.eval.tasks.IMAGE_PLACEHOLDER` becomes the processor's own image token, and the processor
expands it into the model's number of patch tokens (never a fixed count here).
"""

from __future__ import annotations

from typing import Any

import torch

from meda.kv.eval.tasks import IMAGE_PLACEHOLDER, Sample


def is_multimodal(processor: Any) -> bool:
    """True for a processor that takes images (it has an image processor)."""
    return hasattr(processor, "image_processor")


def sample_inputs(processor: Any, sample: Sample, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Chat-formatted, tokenised inputs of one sample (batch 1).

    Raises:
        ValueError: images for a text-only model, or placeholders that do not match the images.
    """
    placeholders = sample.text.count(IMAGE_PLACEHOLDER)
    if placeholders != len(sample.images):
        raise ValueError(
            f"the sample has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(sample.images)} images; "
            "a task must put one placeholder per image"
        )
    text = sample.text
    if sample.images:
        if not is_multimodal(processor):
            raise ValueError(
                f"this sample has {len(sample.images)} images but the model is text-only; pick a text task "
                "(passkey, multikey, vartrack) or a vision-language model such as meda-vlm-mini"
            )
        image_token = getattr(processor, "image_token", None)
        if image_token is None:
            raise ValueError(f"{type(processor).__name__} has no image_token to stand for {IMAGE_PLACEHOLDER}")
        text = text.replace(IMAGE_PLACEHOLDER, image_token)
    tokenizer = getattr(processor, "tokenizer", processor)
    template_owner = processor if getattr(processor, "chat_template", None) else tokenizer
    if getattr(template_owner, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        if is_multimodal(processor) and template_owner is processor:
            messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        text = template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if sample.images:
        enc = processor(text=[text], images=list(sample.images), return_tensors="pt")
    else:
        enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in enc.items()}


def eos_ids(model: Any, processor: Any) -> set[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's end-of-sequence ids."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
