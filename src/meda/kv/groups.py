"""Token groups of a prefill: which positions are real, which are vision, which are text.

Groups come from the model's own ids (``image_token_id``, ``video_token_id``,
``mm_token_type_ids``), never from a fixed token count per image. For a text-only
prompt (or a VLM call without images), the two groups MEDA's entropy compares are the
context and the final question: the last ``question_tokens`` valid tokens of each row,
unless the caller passes its own mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# config attributes that hold placeholder ids of vision tokens, across families
_VISION_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass
class TokenGroups:
    """Per-position groups of one prefill batch.

    Attributes:
        valid: bool ``[batch, tokens]``, False at padding.
        vision: bool ``[batch, tokens]``, the second group of the entropy (vision tokens,
            or the context when ``source`` is ``"text"``).
        source: "vision" (ids from the model), "text" (context vs question) or "caller".
        note: why a fallback was taken, for the report ("" if none).
    """

    valid: torch.Tensor
    vision: torch.Tensor
    source: str
    note: str = ""

    @property
    def text(self) -> torch.Tensor:
        return self.valid & ~self.vision

    def on(self, device: torch.device) -> TokenGroups:
        """These groups on ``device`` (itself when already there): layers of a model split across devices."""
        if self.valid.device == device:
            return self
        return TokenGroups(self.valid.to(device), self.vision.to(device), self.source, self.note)


def vision_token_ids(config) -> list[int]:
    """Placeholder ids of image/video tokens declared by a (multimodal) config."""
    ids = []
    for attr in _VISION_ID_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= 0:
            ids.append(value)
    return sorted(set(ids))


def question_mask(valid: torch.Tensor, question_tokens: int) -> torch.Tensor:
    """bool ``[batch, tokens]``: the last ``question_tokens`` valid tokens of each row."""
    # rank from the end among valid tokens: 0 for the last valid token
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1) - 1
    return valid & (from_end < question_tokens)


def token_groups(
    *,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    vision_ids: list[int],
    question_tokens: int,
    mm_token_type_ids: torch.Tensor | None = None,
    caller_mask: torch.Tensor | None = None,
) -> TokenGroups:
    """Groups for a prefill of ``shape = (batch, tokens)``.

    Priority: the caller's mask, then ``mm_token_type_ids`` (nonzero = vision), then
    the vision placeholder ids in ``input_ids``; with none of them (or no vision token
    in the prompt), context vs the last ``question_tokens`` tokens.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = attention_mask.to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
    if caller_mask is not None:
        if tuple(caller_mask.shape) != tuple(shape):
            raise ValueError(
                f"groups mask has shape {tuple(caller_mask.shape)} but the prompt is {tuple(shape)} "
                "(batch, tokens); pass one bool per prompt token, True for the vision/context group"
            )
        return TokenGroups(valid, caller_mask.to(device=device, dtype=torch.bool) & valid, "caller")
    vision = None
    if mm_token_type_ids is not None:
        vision = mm_token_type_ids.to(device) != 0
    elif input_ids is not None and vision_ids:
        vision = torch.isin(input_ids.to(device), torch.tensor(vision_ids, device=device))
    if vision is not None and bool((vision & valid).any()):
        return TokenGroups(valid, vision & valid, "vision")
    note = ""
    if vision_ids or mm_token_type_ids is not None:
        note = "no vision tokens in the prompt: entropy groups are the context and the final question"
    context = valid & ~question_mask(valid, question_tokens)
    return TokenGroups(valid, context, "text", note)
