"""adapters/lora.py: what trains, what stays frozen, parameter accounting, identity at init, presets and block
selection, training modes, gradient checkpointing."""

from __future__ import annotations

import re

import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.family import get_family
from samtune.adapters.lora import apply_lora, count_parameters, prepare_trainable, select_lora_modules
from samtune.adapters.registry import build_sam
from samtune.constants import LORA_PRESETS
from samtune.finetune.recipe import LoraSection

SAM = get_family("sam")


SIZE = 64
RANK = 4


@pytest.fixture(scope="module")
def base():
    return build_sam("tiny", image_size=SIZE)


@pytest.fixture(scope="module")
def wrapped():
    return apply_lora(build_sam("tiny", image_size=SIZE), SAM, LoraSection(rank=RANK, alpha=4.0))  # defaults otherwise


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

    counts = count_parameters(wrapped, SAM)
    assert counts["encoder_lora"] == expected_lora
    assert counts["mask_decoder"] == decoder
    assert counts["trainable"] == expected_lora + decoder
    components = {k: v for k, v in counts.items() if k not in ("trainable", "total")}
    assert sum(components.values()) == counts["trainable"]  # the components add up
    assert all(v == 0 for k, v in components.items() if k not in ("encoder_lora", "mask_decoder"))


def test_total_counts_the_base_model_once_plus_lora(base, wrapped):
    # peft keeps a frozen copy of the mask decoder (modules_to_save): it must not be counted twice.
    base_total = sum(p.numel() for p in base.parameters())
    counts = count_parameters(wrapped, SAM)
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
        apply_lora(model, SAM, LoraSection(target_modules=r".*vision_encoder\.layers\.\d+\.attn\.query"))
    # full match, not search: a suffix of the real names matches nothing either
    with pytest.raises(SamtuneError):
        apply_lora(model, SAM, LoraSection(target_modules=r"attn\.qkv"))


def predict_low_res(model, pixels, boxes):
    """B×1 box prompts through SamModel.forward -> B×1×s×s low-res mask logits."""
    return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks[:, 0]


def _inputs():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=g)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0]], [[10.0, 10.0, 60.0, 50.0]]])
    return pixels, boxes


def test_outputs_at_init_equal_the_base_model(base):
    wrapped = apply_lora(build_sam("tiny", image_size=SIZE), SAM, LoraSection(rank=RANK))
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


def lora_params_of(model, names, rank):
    """rank × (in + out) per adapted Linear, from the model's own shapes."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


@pytest.mark.parametrize("preset", list(LORA_PRESETS))
def test_every_preset_adapts_what_it_names(preset):
    base = build_sam("tiny", image_size=SIZE)
    names = select_lora_modules(base, SAM, LoraSection(preset=preset))
    expected_lora = lora_params_of(base, names, rank=4)
    decoder_params = sum(p.numel() for p in base.mask_decoder.parameters())
    model = prepare_trainable(base, SAM, "lora", LoraSection(preset=preset))
    counts = count_parameters(model, SAM)
    assert counts["encoder_lora"] + counts["decoder_lora"] == expected_lora
    in_decoder = any(n.startswith("mask_decoder.") for n in names)
    assert counts["mask_decoder"] == (0 if in_decoder else decoder_params)
    assert counts["image_encoder"] == counts["prompt_encoder"] == 0
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    expected_kinds = {
        "encoder_qkv": {"qkv"}, "encoder_attention": {"qkv"}, "encoder_qkv_proj": {"qkv", "proj"}, "encoder_all_linear": {"qkv", "proj", "lin1", "lin2"},
        "decoder_attention": {"q_proj", "k_proj", "v_proj", "out_proj"},
        "encoder_qkv+decoder_attention": {"qkv", "q_proj", "k_proj", "v_proj", "out_proj"},
    }[preset]  # fmt: skip
    assert kinds == expected_kinds


def test_blocks_restrict_encoder_lora_to_the_last_ones():
    base = build_sam("tiny", image_size=SIZE)
    depth = len(base.vision_encoder.layers)
    names = select_lora_modules(base, SAM, LoraSection(preset="encoder_all_linear", blocks=(-2, -1)))
    assert {n.split(".")[2] for n in names} == {str(depth - 2), str(depth - 1)}
    model = prepare_trainable(base, SAM, "lora", LoraSection(preset="encoder_all_linear", blocks=(-2, -1)))
    adapted = {n.split(".lora_")[0].replace("base_model.model.", "") for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == set(names)


@pytest.mark.parametrize(
    "settings, message",
    [
        (LoraSection.model_construct(preset="encoder_qvk"), "did you mean `encoder_qkv`"),
        (LoraSection(target_modules=r"vision_encoder\.nothing"), "matches no Linear module"),
        (LoraSection(target_modules="(unclosed"), "not a valid regular expression"),
        (LoraSection(blocks=(99,)), "block 99 does not exist"),
        (LoraSection(preset="decoder_attention", blocks=(0,)), None),  # decoder modules are not blocks: fine
    ],
)
def test_lora_selection_errors(settings, message):
    base = build_sam("tiny", image_size=SIZE)
    if message is None:
        assert select_lora_modules(base, SAM, settings)
        return
    with pytest.raises(SamtuneError, match=message):
        select_lora_modules(base, SAM, settings)


def test_decoder_only_and_full_modes():
    model = prepare_trainable(build_sam("tiny", image_size=SIZE), SAM, "decoder_only", LoraSection())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.") for n in trainable)
    model = prepare_trainable(build_sam("tiny", image_size=SIZE), SAM, "full", LoraSection())
    counts = count_parameters(model, SAM)
    assert counts["trainable"] == counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["image_encoder"] > 0 and counts["prompt_encoder"] > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = build_sam("tiny", image_size=SIZE)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = prepare_trainable(base, SAM, "lora", LoraSection(preset="encoder_all_linear"))
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
