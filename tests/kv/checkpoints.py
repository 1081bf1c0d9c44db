"""Tiny checkpoints on disk (model + tokenizer/processor), for loader and CLI tests. No downloads."""

from __future__ import annotations

from pathlib import Path

from meda.kv.tiny import IMAGE_ID, build_tiny


def word_tokenizer(extra: tuple[str, ...] = ()):
    """A whitespace word-level tokenizer over ``t3 .. t499`` (ids as in the tiny models) plus ``extra`` tokens."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 500)}}
    vocab |= {token: IMAGE_ID + i for i, token in enumerate(extra)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", extra_special_tokens=extra
    )


def save_tiny_llava(folder: Path):
    """Save a tiny LLaVA with a real ``LlavaProcessor`` to ``folder``; returns the TinyModel."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tiny = build_tiny("llava")
    vision = tiny.model.config.vision_config
    side = {"height": vision.image_size, "width": vision.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": vision.image_size}, crop_size=side),
        tokenizer=word_tokenizer(("<image>",)),
        patch_size=vision.patch_size,
        num_additional_image_tokens=1,  # CLIP's CLS token, as in the llava-hf processor configs
        vision_feature_select_strategy=tiny.model.config.vision_feature_select_strategy,
        image_token="<image>",
    )
    tiny.model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return tiny
