"""The tiny model zoo: every family generates, left-padded batches match batch 1, inputs match the processors."""

from __future__ import annotations

import pytest
import torch

from meda.kv.support import check_supported
from meda.kv.tiny import (
    FAMILIES,
    PRESETS,
    VIDEO_FAMILIES,
    VLM_FAMILIES,
    build_shaped,
    build_tiny,
    config_preset,
    default_lengths,
    onevision_image_tokens,
)

NEW_TOKENS = 8
CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VIDEO_FAMILIES]


def generate(tiny, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy continuation tokens ``[batch, NEW_TOKENS]``."""
    with torch.no_grad():
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("family", "video"), CASES, ids=[f + ("-video" if v else "") for f, v in CASES])
def test_padded_batch_matches_batch_one(family: str, video: bool, attn: str) -> None:
    """Every row of a left-padded batch of 3 generates exactly the tokens of its prompt alone (fp32)."""
    tiny = build_tiny(family, attn_implementation=attn)
    lengths = default_lengths(3)
    batch = tiny.inputs(3, video=video)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    tokens = generate(tiny, batch)
    assert tokens.shape == (3, NEW_TOKENS)
    for row, length in enumerate(lengths):
        alone = generate(tiny, tiny.inputs(1, lengths=[length], video=video, seed=row))
        assert torch.equal(alone[0], tokens[row]), f"{family}/{attn} row {row}: {alone[0]} != {tokens[row]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_is_deterministic_and_supported(family: str) -> None:
    first, second = build_tiny(family), build_tiny(family)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert check_supported(first.model) == family
    assert not first.model.training
    config = getattr(first.model.config, "text_config", first.model.config)
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (4, 2, 64)
    assert first.is_vlm == (family in VLM_FAMILIES)


def test_families_are_distinct() -> None:
    assert len(set(FAMILIES)) == len(FAMILIES)
    assert set(VIDEO_FAMILIES) <= set(VLM_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize(("family", "video"), CASES, ids=[f + ("-video" if v else "") for f, v in CASES])
def test_prompt_layout(family: str, video: bool) -> None:
    """Left padding, rows reproducible from their seed, context before the media and a text question after."""
    tiny = build_tiny(family)
    batch = tiny.inputs(3, lengths=[80, 120, 100], video=video, seed=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 120)
    for row, length in enumerate([80, 120, 100]):
        assert mask[row].tolist() == [0] * (120 - length) + [1] * length
        alone = tiny.inputs(1, lengths=[length], video=video, seed=5 + row)
        assert torch.equal(alone["input_ids"][0], ids[row, 120 - length :])
    placeholder = tiny.video_token_id if video else tiny.image_token_id
    vision = torch.isin(ids, torch.tensor(tiny.vision_token_ids, dtype=torch.long))
    if not tiny.is_vlm:
        assert not vision.any()
        return
    assert (ids == placeholder).sum(1).unique().numel() == 1  # same media in every row
    for row in range(3):
        where = (ids[row] == placeholder).nonzero().flatten()  # runs may be split by markers (test_families)
        assert mask[row, : where[0]].sum() >= 2, "bos and context before the media"
        assert not vision[row, -tiny.question_tokens :].any(), "the question is text"
    if "mm_token_type_ids" in batch:
        types = batch["mm_token_type_ids"]
        assert torch.equal(types == (2 if video else 1), ids == placeholder)
        assert not (types == (1 if video else 2)).any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("video", [False, True])
def test_qwen_token_count_follows_grid(family: str, video: bool) -> None:
    tiny = build_tiny(family)
    batch = tiny.inputs(2, video=video)
    grid = batch["video_grid_thw" if video else "image_grid_thw"]
    merge = tiny.model.config.vision_config.spatial_merge_size
    placeholder = tiny.video_token_id if video else tiny.image_token_id
    assert grid.shape == (2, 3)
    assert (batch["input_ids"] == placeholder).sum(1).tolist() == (grid.prod(1) // merge**2).tolist()
    pixels = batch["pixel_values_videos" if video else "pixel_values"]
    assert pixels.shape[0] == int(grid.prod(1).sum())
    for marker in ("vision_start_token_id", "vision_end_token_id"):
        assert (batch["input_ids"] == getattr(tiny.model.config, marker)).sum().item() == 2


@pytest.mark.parametrize("size", [(12, 60), (48, 80), (90, 40), (32, 32)])
def test_onevision_token_count_matches_model_features(size: tuple[int, int]) -> None:
    """The processor-side count equals the number of features the model's own anyres packing produces."""
    tiny = build_tiny("llava_onevision")
    model, config = tiny.model, tiny.model.config
    crops = _onevision_crops(config, size)
    pixels = torch.randn(crops, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        features = model.model.get_image_features(pixels[None], torch.tensor([size]), return_dict=True)
    assert features.pooler_output[0].shape[0] == onevision_image_tokens(config, *size)


def _onevision_crops(config, size: tuple[int, int]) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)


def test_llava_token_count_follows_patch_grid() -> None:
    tiny = build_tiny("llava")
    vision = tiny.model.config.vision_config
    batch = tiny.inputs(1)
    assert (batch["input_ids"] == tiny.image_token_id).sum() == (vision.image_size // vision.patch_size) ** 2
    assert batch["pixel_values"].shape == (1, 3, vision.image_size, vision.image_size)


def test_shape_overrides_and_dtype() -> None:
    tiny = build_tiny("qwen2_vl", num_hidden_layers=2, dtype=torch.bfloat16)
    assert tiny.model.config.text_config.num_hidden_layers == 2
    assert tiny.model.dtype == torch.bfloat16
    assert tiny.inputs(1)["pixel_values"].dtype == torch.bfloat16


def test_bad_requests_raise() -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny("gpt2")
    with pytest.raises(ValueError, match="video"):
        build_tiny("llava").inputs(1, video=True)
    with pytest.raises(ValueError, match="video"):
        build_tiny("llama").inputs(1, video=True)
    with pytest.raises(ValueError, match="at least"):
        build_tiny("qwen2_vl").inputs(1, lengths=[20])
    with pytest.raises(ValueError, match="lengths"):
        build_tiny("llama").inputs(2, lengths=[40])


@pytest.mark.parametrize(
    ("preset", "params"), [("qwen2-7b", 7.62e9), ("qwen2-vl-7b", 8.29e9), ("qwen2.5-vl-7b", 8.29e9)]
)
def test_presets_have_real_shapes(preset: str, params: float) -> None:
    config = config_preset(preset)
    text = getattr(config, "text_config", config)
    shape = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert shape == (3584, 28, 28, 4)
    assert (text.intermediate_size, text.vocab_size) == (18944, 152064)
    shaped = build_shaped(preset, device="meta")
    assert shaped.model.dtype == torch.bfloat16
    assert sum(p.numel() for p in shaped.model.parameters()) == pytest.approx(params, rel=0.005)
    assert set(PRESETS) >= {preset}


def test_qwen_image_matches_the_image_processor() -> None:
    """The tiny Qwen2-VL image is what the real image processor makes of a 224x168 picture."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tiny = build_tiny("qwen2_vl")
    vision = tiny.model.config.vision_config
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
    )
    real = processor(Image.new("RGB", (224, 168), (10, 20, 30)), return_tensors="pt")
    ours = tiny.inputs(1)
    assert torch.equal(real["image_grid_thw"], ours["image_grid_thw"])
    assert real["pixel_values"].shape == ours["pixel_values"].shape
