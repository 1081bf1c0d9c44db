"""Turn a text prompt (and optional images) into model inputs, the way a user would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def build_inputs(
    processor, prompt: str, images: Sequence[str | Path | Image.Image] | None = None, device=None
) -> dict[str, torch.Tensor]:
    """Chat-formatted inputs for one user turn.

    ``processor`` is a tokenizer (text models) or a multimodal processor (VLMs). ``images`` are files or PIL
    images (video frames already decoded, for example); they are placed before the text, one
    ``{"type": "image"}`` entry each, so the processor expands each into the model's own number of image tokens.
    """
    images = images or []
    if images and not hasattr(processor, "image_processor"):
        raise ValueError("--image was given but this model has no image processor (is it a text-only model?)")
    pil = [_open_image(p) for p in images]
    content: list[dict] = [{"type": "image"} for _ in pil] + [{"type": "text", "text": prompt}]
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "chat_template", None) or getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": content if pil else prompt}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # no chat template: the processor's image placeholder once per image, then the prompt
        image_token = getattr(processor, "image_token", None) if pil else None
        if pil and image_token is None:
            raise ValueError("this processor has neither a chat template nor an image_token to place the images")
        text = " ".join([image_token] * len(pil) + [prompt]) if pil else prompt
    if pil:
        enc = processor(text=[text], images=pil, return_tensors="pt")
    else:
        enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in enc.items()}


def _open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a file path or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, str | Path):
        raise TypeError(f"an image must be a file path or a PIL image, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return Image.open(path).convert("RGB")
