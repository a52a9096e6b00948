"""Every registered model family, through the interface the trainer uses: build its tiny variant,
a prompted forward/backward, every LoRA preset and role, an adapter folder round trip."""

from __future__ import annotations

import math
import pytest
import torch
from peft import PeftModel

from samtune.adapters.family import ImageEmbeddings, get_family, list_families
from samtune.adapters.lora import apply_lora, preset_roles, select_lora_modules
from samtune.adapters.registry import build_model, get_variant, list_models
from samtune.constants import LORA_PRESETS, LORA_ROLES
from samtune.finetune.recipe import LoraSection

SIZE = 64  # input px, rounded up per family to a size it takes (ModelFamily.input_multiple: SAM 3's 14 px patches -> 70)


def size_of(family) -> int:
    return math.ceil(SIZE / family.input_multiple) * family.input_multiple


def tiny_variant(family: str) -> str:
    names = [n for n in list_models() if get_variant(n).family == family and get_variant(n).make_config is not None]
    assert names, f"model family {family!r} registers no random-init variant for tests"
    return names[0]


@pytest.fixture(params=list_families())
def family_model(request):
    family = get_family(request.param)
    return family, build_model(tiny_variant(request.param), image_size=size_of(family))


def test_prompted_forward_backward_reaches_the_encoder(family_model):
    family, model = family_model
    transform = family.make_transform(size_of(family))
    image = (torch.rand(40, 64, 3) * 255).to(torch.uint8).numpy()
    out = transform(image=image, mask=image[:, :, 0] > 128)
    h, w = transform.resized_shape((40, 64))  # SAM: longest side to S, padded (40×64); SAM 2: a square resize (64×64)
    assert out["image"].shape == (size_of(family), size_of(family), 3) and max(h, w) == size_of(family) and (h, w) in {(40, 64), (size_of(family), size_of(family))}
    pixels = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())[None]
    embeddings = family.encode_images(model, pixels.requires_grad_(False))
    assert isinstance(embeddings, ImageEmbeddings)
    repeated = embeddings.repeat_interleave(2)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 20.0], [10.0, 2.0, 60.0, 38.0]])
    low_res, iou = family.decode_prompts(model, repeated, boxes=boxes)
    assert low_res.shape[:2] == (2, 1) and iou.shape == (2, 1)
    up = family.upscale_logits(low_res, size_of(family))
    assert up.shape == (2, 1, size_of(family), size_of(family))
    assert family.logits_to_original(up[0], (h, w), (80, 128)).shape == (80, 128)
    up.square().mean().backward()
    encoder_grads = [p.grad for n, p in model.named_parameters() if n.startswith(family.image_encoder + ".")]
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)


@pytest.mark.parametrize("preset", [*LORA_PRESETS, *LORA_ROLES, "encoder_mlp+decoder_attention"])
def test_every_preset_resolves_to_modules_of_its_roles(family_model, preset):
    family, model = family_model
    names = select_lora_modules(model, family, LoraSection(preset=preset))
    assert names
    for role in preset_roles(preset):
        import re

        assert any(re.fullmatch(family.lora_roles[role], n) for n in names), role


def test_unknown_preset_or_role_names_the_known_ones(family_model):
    from samtune import SamtuneError

    family, model = family_model
    with pytest.raises(SamtuneError, match="did you mean `encoder_attention`"):
        select_lora_modules(model, family, LoraSection.model_construct(preset="encoder_atention"))
    with pytest.raises(SamtuneError, match=f"not available for model family '{family.name}'.*roles: encoder_attention"):
        family.lora_patterns(("encoder_conv",))


def test_adapter_folder_round_trip(family_model, tmp_path):
    family, model = family_model
    name = tiny_variant(family.name)
    wrapped = apply_lora(model, family, LoraSection(preset="encoder_all_linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # make the adapter non-trivial: LoRA B starts at zero
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    wrapped.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_model(name, image_size=size_of(family)), str(tmp_path / "adapter")).eval()
    pixels = torch.randn(1, 3, size_of(family), size_of(family))
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    with torch.no_grad():
        a = family.decode_prompts(wrapped.eval(), family.encode_images(wrapped, pixels), boxes=box)[0]
        b = family.decode_prompts(loaded, family.encode_images(loaded, pixels), boxes=box)[0]
        base = build_model(name, image_size=size_of(family))
        c = family.decode_prompts(base, family.encode_images(base, pixels), boxes=box)[0]
    torch.testing.assert_close(a, b)
    # the adapter changed the output (by more than 1 % of its scale: random tiny models' logits can
    # be small, SAM 3's are about 1e-2), and the folder carried it
    assert (a - c).abs().max() > 0.01 * c.abs().max()


def test_class_prompts_decode_every_class_and_train(family_model):
    """Automatic mode: K learnt prompts on every image in one decoder call, gradients reach them."""
    family, model = family_model
    family.add_class_prompts(model, 3, 2, seed=0)
    pixels = torch.randn(2, 3, size_of(family), size_of(family))
    embeddings = family.encode_images(model, pixels)
    tokens = model.class_prompts()
    assert tokens.shape == (3, 2, family.prompt_dim(model))
    low_res = family.decode_classes(model, embeddings, tokens)
    assert low_res.shape[:2] == (2, 3)
    # class k of image b is the prompt k alone: the same as decoding that prompt by itself
    second = ImageEmbeddings(embeddings.image_embeddings[1:], tuple(f[1:] for f in embeddings.high_res_features))
    alone = family.decode_classes(model, second, tokens[2:])
    torch.testing.assert_close(alone[0, 0], low_res[1, 2], atol=1e-5, rtol=1e-4)
    low_res.square().mean().backward()
    assert model.class_prompts.tokens.grad is not None and model.class_prompts.tokens.grad.abs().sum() > 0


def test_class_prompts_are_saved_in_the_adapter_and_load_with_plain_peft(family_model, tmp_path):
    family, model = family_model
    family.add_class_prompts(model, 4, 2, seed=0)
    peft_model = apply_lora(model, family, LoraSection())
    with torch.no_grad():
        peft_model.class_prompts.modules_to_save["default"].tokens.add_(1.0)  # "trained"
    trained = peft_model.class_prompts().detach().clone()
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "class_prompts" in n)
    peft_model.save_pretrained(tmp_path)
    base = build_model(tiny_variant(family.name), image_size=size_of(family))
    family.add_class_prompts(base, 4, 2, seed=5)  # another init: the folder's values must win
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    assert torch.equal(loaded.class_prompts(), trained)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 0.01 * max(a.abs().max(), b.abs().max()))


def test_a_class_prompt_joins_clicks_and_a_mask_prompt_in_one_decoder_pass(family_model):
    """Corrections from the automatic result: ``decode_prompts(class_tokens=...)``. Alone, a class
    prompt decodes exactly as ``decode_classes`` does for that class; clicks and the previous
    low-res logits as mask prompt then change the answer, and gradients reach the class prompt."""
    family, model = family_model
    family.add_class_prompts(model, 3, 2, seed=0)
    embeddings = family.encode_images(model, torch.randn(2, 3, size_of(family), size_of(family)))
    tokens = model.class_prompts()
    every_class = family.decode_classes(model, embeddings, tokens)  # 2×3×s×s
    alone, iou = family.decode_prompts(model, embeddings, class_tokens=tokens[1])  # T×C: one class for every row
    assert alone.shape == (2, 1, *every_class.shape[-2:]) and iou.shape == (2, 1)
    torch.testing.assert_close(alone[:, 0], every_class[:, 1], atol=1e-5, rtol=1e-4)
    per_row, _ = family.decode_prompts(model, embeddings, class_tokens=tokens[[2, 0]])  # N×T×C: a class per row
    torch.testing.assert_close(per_row[:, 0], torch.stack([every_class[0, 2], every_class[1, 0]]), atol=1e-5, rtol=1e-4)

    points = torch.tensor([[[20.0, 30.0], [50.0, 10.0]], [[5.0, 5.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])  # the second row's second click is padding
    previous = every_class[:, 1:2].detach()  # N×1×s×s: the automatic result as mask prompt
    clicked, _ = family.decode_prompts(model, embeddings, points=points, point_labels=labels, class_tokens=tokens[1])
    refined, _ = family.decode_prompts(model, embeddings, points=points, point_labels=labels, mask_inputs=previous, class_tokens=tokens[1])
    assert clicked.shape == refined.shape == alone.shape
    assert differ(clicked, alone) and differ(refined, clicked)  # random tiny models answer in ~1e-4 logits
    refined.square().mean().backward()
    assert model.class_prompts.tokens.grad[1].abs().sum() > 0 and model.class_prompts.tokens.grad[0].abs().sum() == 0
