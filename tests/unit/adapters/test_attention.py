"""adapters/attention.py: the fused rel-pos attention equals transformers' eager and SDPA attention
(outputs and gradients, windowed and global blocks, padded windows, interpolated rel-pos tables),
under peft LoRA too, and set_vision_attention switches modules in place."""

from __future__ import annotations

import pytest
import torch
from samtune.adapters.attention import FusedRelPosAttention, set_vision_attention
from samtune.adapters.family import get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_sam
from samtune.finetune.recipe import LoraSection
from transformers import (
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import (
    SamVisionAttention,
    SamVisionSdpaAttention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors; a second thread only contends

SAM = get_family("sam")
TOL = {"atol": 1e-5, "rtol": 1e-5}


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-5 of the gradient's largest entry: a bias gradient sums over every token (≈40 here),
    so float32 summation order alone moves it by ~1e-5 (eager and SDPA differ from each other as much)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def _randomise_rel_pos(model) -> None:
    """transformers zero-initialises rel_pos_h/w, which would make the bias (and its test) vacuous."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _odd_window_sam() -> SamModel:
    """12×12 tokens; window 5 pads the grid to 15 (q' 32+5+5 → 48: zero columns), global block 32+12+12 = 56."""
    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, mlp_dim=128, image_size=96, patch_size=8,
        output_channels=32, window_size=5, global_attn_indexes=[1], num_pos_feats=16, initializer_range=0.02,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=96, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    _randomise_rel_pos(model)
    return model


@pytest.fixture  # per test: the tests switch its attention class
def tiny():
    model = build_sam("tiny")  # 16×16 tokens, window 8 in blocks 0 and 2, global attention in blocks 1 and 3
    _randomise_rel_pos(model)
    return model


def _encode(model, kind: str, pixels: torch.Tensor, params: dict[str, torch.Tensor]):
    """Encoder output and the gradients of a fixed random functional w.r.t. pixels and ``params``."""
    set_vision_attention(model, kind)
    pixels = pixels.clone().requires_grad_(True)
    out = SAM.encode_images(model, pixels).image_embeddings
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * weights).sum(), [pixels, *params.values()])
    return out.detach(), dict(zip(["pixels", *params], grads))


@pytest.fixture
def odd_window():
    return _odd_window_sam()


@pytest.mark.parametrize("which", ["tiny", "odd_window"])
def test_fused_equals_eager_and_sdpa_with_gradients(request, which):
    model = request.getfixturevalue(which)
    vision = model.config.vision_config
    assert vision.use_rel_pos and 0 < len(vision.global_attn_indexes) < vision.num_hidden_layers  # both block kinds
    params = {n: p for n, p in model.named_parameters() if ".attn.qkv." in n or "rel_pos_" in n}
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(0))
    fused, fused_grads = _encode(model, "fused_relpos", pixels, params)
    for kind in ("eager", "sdpa"):
        out, grads = _encode(model, kind, pixels, params)
        torch.testing.assert_close(fused, out, **TOL)
        for name, grad in grads.items():
            assert_grad_close(fused_grads[name], grad, f"{kind}: d/d{name}")
    assert all(g.abs().sum() > 0 for n, g in fused_grads.items() if "rel_pos_" in n)


@pytest.mark.parametrize("pad_value", [False, True], ids=["v_own_dim", "v_padded"])
def test_module_alone_interpolates_rel_pos_like_transformers(monkeypatch, pad_value):
    # A global block whose tables were made for 12×12 tokens, run on 9×9: get_rel_pos interpolates.
    # v_padded forces the CUDA-only branch (v zero-padded to q'/k''s 56 columns, output sliced back).
    monkeypatch.setattr(FusedRelPosAttention, "_pad_value", lambda self, query_aug: pad_value)
    config = SamVisionConfig(hidden_size=64, num_attention_heads=2, image_size=96, patch_size=8)
    module = SamVisionAttention(config, window_size=0)
    _randomise_rel_pos(module)
    hidden = torch.randn(3, 9, 9, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    eager = module(hidden)[0]
    eager_grads = torch.autograd.grad(eager.square().sum(), [hidden, *module.parameters()])
    set_vision_attention(module, "fused_relpos")
    fused = module(hidden)[0]
    torch.testing.assert_close(fused, eager, **TOL)
    for fused_grad, eager_grad in zip(torch.autograd.grad(fused.square().sum(), [hidden, *module.parameters()]), eager_grads):
        assert_grad_close(fused_grad, eager_grad, "module")


def test_value_padding_only_where_pytorch_would_pick_flash():
    from samtune.adapters.attention import _flash_could_run

    assert _flash_could_run((9, 0), 192, training=True)  # H100, ViT-B/L global blocks at 1024 px
    assert _flash_could_run((9, 0), 208, training=True)  # ViT-H: head_dim 80 + 64 + 64
    assert not _flash_could_run((8, 9), 208, training=True) and _flash_could_run((8, 9), 208, training=False)
    assert not _flash_could_run((7, 5), 96, training=False)  # flash needs sm80+
    assert not _flash_could_run((9, 0), 264, training=False)  # > 256
    module = FusedRelPosAttention(SamVisionConfig(hidden_size=64, num_attention_heads=2, image_size=96, patch_size=8), 0)
    assert not module._pad_value(torch.zeros(1, 1, 4, 96, dtype=torch.bfloat16))  # CPU: v keeps its own dim


def test_peft_lora_model_switches_in_place_and_lora_gradients_match():
    model = prepare_trainable(build_sam("tiny"), SAM, "lora", LoraSection(rank=2))
    _randomise_rel_pos(model)
    with torch.no_grad():  # lora_B starts at zero: LoRA would not change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    names_before = [n for n, _ in model.named_parameters()]
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(params) == 2 * model.config.vision_config.num_hidden_layers
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    sdpa, sdpa_grads = _encode(model, "sdpa", pixels, params)

    depth = model.config.vision_config.num_hidden_layers
    assert set_vision_attention(model, "fused_relpos") == depth
    attn = model.base_model.model.vision_encoder.layers[0].attn
    assert type(attn) is FusedRelPosAttention and "lora" in type(attn.qkv).__module__  # the LoRA wrapper stayed
    assert [n for n, _ in model.named_parameters()] == names_before
    fused, fused_grads = _encode(model, "fused_relpos", pixels, params)
    torch.testing.assert_close(fused, sdpa, **TOL)
    for name, grad in sdpa_grads.items():
        assert grad.abs().sum() > 0, name
        assert_grad_close(fused_grads[name], grad, name)


def test_switching_back_restores_sdpa_exactly(tiny):
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    layers = tiny.vision_encoder.layers
    assert all(type(layer.attn) is SamVisionSdpaAttention for layer in layers)  # transformers' default
    with torch.no_grad():
        before = SAM.encode_images(tiny, pixels).image_embeddings
        assert set_vision_attention(tiny, "fused_relpos") == len(layers)
        assert all(type(layer.attn) is FusedRelPosAttention for layer in layers)
        assert set_vision_attention(tiny.vision_encoder, "sdpa") == len(layers)
        after = SAM.encode_images(tiny, pixels).image_embeddings
    assert all(type(layer.attn) is SamVisionSdpaAttention for layer in layers)
    assert torch.equal(before, after)


def test_unknown_kind_names_the_known_ones(tiny):
    with pytest.raises(ValueError, match="fused_relpos") as info:
        set_vision_attention(tiny, "flash")
    assert "sdpa" in str(info.value) and "eager" in str(info.value)
    assert all(type(layer.attn) is SamVisionSdpaAttention for layer in tiny.vision_encoder.layers)
