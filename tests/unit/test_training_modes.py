"""LoRA presets and block selection, training modes, gradient checkpointing, input-size changes."""

from __future__ import annotations

import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.lora import PRESETS, LoraSettings, count_parameters, prepare_trainable, select_lora_modules
from samtune.adapters.registry import build_sam, resize_hf_model

SIZE = 64


def lora_params_of(model, names, rank):
    """rank × (in + out) per adapted Linear, from the model's own shapes."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_adapts_what_it_names(preset):
    base = build_sam("tiny", image_size=SIZE)
    names = select_lora_modules(base, LoraSettings(preset=preset))
    expected_lora = lora_params_of(base, names, rank=4)
    decoder_params = sum(p.numel() for p in base.mask_decoder.parameters())
    model = prepare_trainable(base, "lora", LoraSettings(preset=preset))
    counts = count_parameters(model)
    assert counts["encoder_lora"] + counts["decoder_lora"] == expected_lora
    in_decoder = any(n.startswith("mask_decoder.") for n in names)
    assert counts["mask_decoder"] == (0 if in_decoder else decoder_params)
    assert counts["image_encoder"] == counts["prompt_encoder"] == 0
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    expected_kinds = {
        "encoder_qkv": {"qkv"}, "encoder_qkv_proj": {"qkv", "proj"}, "encoder_all_linear": {"qkv", "proj", "lin1", "lin2"},
        "decoder_attention": {"q_proj", "k_proj", "v_proj", "out_proj"},
        "encoder_qkv+decoder_attention": {"qkv", "q_proj", "k_proj", "v_proj", "out_proj"},
    }[preset]  # fmt: skip
    assert kinds == expected_kinds


def test_blocks_restrict_encoder_lora_to_the_last_ones():
    base = build_sam("tiny", image_size=SIZE)
    depth = len(base.vision_encoder.layers)
    names = select_lora_modules(base, LoraSettings(preset="encoder_all_linear", blocks=(-2, -1)))
    assert {n.split(".")[2] for n in names} == {str(depth - 2), str(depth - 1)}
    model = prepare_trainable(base, "lora", LoraSettings(preset="encoder_all_linear", blocks=(-2, -1)))
    adapted = {n.split(".lora_")[0].replace("base_model.model.", "") for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == set(names)


@pytest.mark.parametrize(
    "settings, message",
    [
        (LoraSettings(preset="encoder_qvk"), "did you mean 'encoder_qkv'"),
        (LoraSettings(target_modules=r"vision_encoder\.nothing"), "matches no Linear module"),
        (LoraSettings(target_modules="(unclosed"), "not a valid regular expression"),
        (LoraSettings(blocks=(99,)), "block 99 does not exist"),
        (LoraSettings(preset="decoder_attention", blocks=(0,)), None),  # decoder modules are not blocks: fine
    ],
)
def test_lora_selection_errors(settings, message):
    base = build_sam("tiny", image_size=SIZE)
    if message is None:
        assert select_lora_modules(base, settings)
        return
    with pytest.raises(SamtuneError, match=message):
        select_lora_modules(base, settings)


def test_decoder_only_and_full_modes():
    model = prepare_trainable(build_sam("tiny", image_size=SIZE), "decoder_only", LoraSettings())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.") for n in trainable)
    model = prepare_trainable(build_sam("tiny", image_size=SIZE), "full", LoraSettings())
    counts = count_parameters(model)
    assert counts["trainable"] == counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["image_encoder"] > 0 and counts["prompt_encoder"] > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = build_sam("tiny", image_size=SIZE)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = prepare_trainable(base, "lora", LoraSettings(preset="encoder_all_linear"))
        with torch.no_grad():  # LoRA B starts at zero: move it so encoder gradients are non-trivial
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        out = model(pixel_values=pixels, input_boxes=torch.tensor([[[4.0, 4.0, 40.0, 40.0]]] * 2), multimask_output=False)
        (out.pred_masks.square().mean() + out.iou_scores.mean()).backward()
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(getattr(m, "gradient_checkpointing") for m in layers) == checkpointing
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(n for n in plain if "vision_encoder" in n and "lora_A" in n and plain[n].abs().sum() > 0)
    # equal up to float reduction order: two runs without checkpointing differ by ~2e-5 on this CPU
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-4, rtol=1e-3)
    with pytest.raises(AssertionError):  # and the tolerance is tight enough to see a real change
        torch.testing.assert_close(plain[name] * 1.01 + 1e-3, plain[name], atol=1e-4, rtol=1e-3)


def test_hf_model_at_another_input_size(tmp_path):
    model = build_sam("tiny", image_size=128)
    model.save_pretrained(tmp_path / "hf")
    same = build_sam("sam-vit-base", checkpoint=tmp_path / "hf", image_size=128)
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    smaller = build_sam("sam-vit-base", checkpoint=tmp_path / "hf", image_size=64)
    grid = 64 // model.config.vision_config.patch_size
    assert smaller.vision_encoder.pos_embed.shape[1:3] == (grid, grid)
    out = smaller(pixel_values=torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[[8.0, 8.0, 30.0, 30.0]]]))
    assert out.pred_masks.shape[-1] == 4 * grid
    resized_back = resize_hf_model(smaller, 128)
    assert resized_back.vision_encoder.pos_embed.shape == model.vision_encoder.pos_embed.shape
