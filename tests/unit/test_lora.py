"""LoRA on the tiny SAM: what trains, what stays frozen, the parameter accounting, identity at init."""

from __future__ import annotations

import re

import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.lora import LoraSettings, apply_lora, count_parameters
from samtune.adapters.registry import build_sam

SIZE = 64
RANK = 4


@pytest.fixture(scope="module")
def base():
    return build_sam("tiny", image_size=SIZE)


@pytest.fixture(scope="module")
def wrapped():
    return apply_lora(build_sam("tiny", image_size=SIZE), LoraSettings(rank=RANK, alpha=4.0))  # defaults otherwise


def _qkv_layers(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if re.fullmatch(r"vision_encoder\.layers\.\d+\.attn\.qkv", n)}


def test_lora_targets_every_encoder_qkv(base, wrapped):
    qkv = _qkv_layers(base)
    assert len(qkv) == base.config.vision_config.num_hidden_layers
    lora_modules = {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
                    for n, _ in wrapped.named_modules() if n.endswith("lora_A.default")}  # fmt: skip
    assert lora_modules == set(qkv)


def test_trainable_parameters_are_exactly_lora_plus_mask_decoder(base, wrapped):
    qkv = _qkv_layers(base)
    expected_lora = sum(RANK * (layer.in_features + layer.out_features) for layer in qkv.values())
    decoder = sum(p.numel() for p in base.mask_decoder.parameters())
    trainable = {n: p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}
    lora = sum(v for n, v in trainable.items() if "lora_" in n)
    assert lora == expected_lora
    assert all("lora_" in n or "mask_decoder" in n for n in trainable)
    assert sum(trainable.values()) == expected_lora + decoder

    counts = count_parameters(wrapped)
    assert counts["encoder_lora"] == expected_lora
    assert counts["mask_decoder"] == decoder
    assert counts["trainable"] == expected_lora + decoder
    components = {k: v for k, v in counts.items() if k not in ("trainable", "total")}
    assert sum(components.values()) == counts["trainable"]  # the components add up
    assert all(v == 0 for k, v in components.items() if k not in ("encoder_lora", "mask_decoder"))


def test_total_counts_the_base_model_once_plus_lora(base, wrapped):
    # peft keeps a frozen copy of the mask decoder (modules_to_save): it must not be counted twice.
    base_total = sum(p.numel() for p in base.parameters())
    counts = count_parameters(wrapped)
    assert counts["total"] == base_total + counts["encoder_lora"]
    assert counts["total"] < sum(p.numel() for p in wrapped.parameters())  # the raw sum double-counts


def test_encoders_are_frozen(wrapped):
    inner = wrapped.base_model.model
    for module in (inner.vision_encoder, inner.prompt_encoder, inner.shared_image_embedding):
        for name, p in module.named_parameters():
            assert p.requires_grad == ("lora_" in name), name
    decoder_params = [p for n, p in inner.mask_decoder.named_parameters() if "original_module" not in n]
    assert decoder_params and all(p.requires_grad for p in decoder_params)


def test_unmatched_target_modules_raise():
    model = build_sam("tiny", image_size=SIZE)
    with pytest.raises(SamtuneError, match="matches no"):
        apply_lora(model, LoraSettings(target_modules=r".*vision_encoder\.layers\.\d+\.attn\.query"))
    # full match, not search: a suffix of the real names matches nothing either
    with pytest.raises(SamtuneError):
        apply_lora(model, LoraSettings(target_modules=r"attn\.qkv"))


def predict_low_res(model, pixels, boxes):
    """B×1 box prompts through SamModel.forward -> B×1×s×s low-res mask logits."""
    return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks[:, 0]


def _inputs():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=g)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0]], [[10.0, 10.0, 60.0, 50.0]]])
    return pixels, boxes


def test_outputs_at_init_equal_the_base_model(base):
    wrapped = apply_lora(build_sam("tiny", image_size=SIZE), LoraSettings(rank=RANK))
    pixels, boxes = _inputs()
    with torch.no_grad():
        expected = predict_low_res(base, pixels, boxes)
        got = predict_low_res(wrapped, pixels, boxes)
        assert got.shape == expected.shape and got.shape[:2] == (2, 1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # ... and the adapters are in the forward path: a non-zero B changes the output
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
        assert not torch.allclose(predict_low_res(wrapped, pixels, boxes), expected, atol=1e-4)
