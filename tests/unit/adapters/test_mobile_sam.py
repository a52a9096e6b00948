"""MobileSAM (TinyViT encoder + SAM decoder) against the reference implementation.

The reference is the MobileSAM code as packaged on PyPI by ``mobilesam-mirror==1.0.0`` (a copy of
github.com/ChaoningZhang/MobileSAM's ``mobile_sam`` package; test-only, installed with
``pip install mobilesam-mirror==1.0.0 --no-deps``). Its package ``__init__`` imports the predictor
(torchvision), and ``modeling/tiny_vit_sam.py`` imports timm (which imports torchvision); neither
can be imported beside this torch. So, as with segment_anything (helpers_official.py), an empty
parent package is registered and only ``mobile_sam.modeling`` is imported; when timm itself does
not import, the four timm names tiny_vit_sam.py imports are given stand-ins for the duration of
that import (DropPath — unused at drop-path rate 0 —, to_2tuple, trunc_normal_ for the random
init, and the register_model decorator): none of them takes part in a forward pass.

The reference TinyViT hard-codes a 64×64 output grid (1024 px) in ``forward_features``; the fast
tests run its own modules at 128 px and do that last reshape with the real grid
(``reference_embeddings``); the slow test runs its forward unchanged at 1024 px. Random weights
(seeded), nothing downloads.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from samtune import SamtuneError
from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.family import ImageEmbeddings, get_family
from samtune.adapters.mobile_sam import TINY_VIT_5M, load_official_mobile_sam
from samtune.adapters.registry import build_model
from samtune.adapters.tiny_vit import TinyViT

TOLERANCE = 1e-4  # max abs diff, float32
SIZE = 128  # fast tests: grid 8, every TinyViT-5M stage pads its windows (32/7, 16/7, 8/14... px tokens)
INSTALL_HINT = "install the test reference with: .venv/bin/pip install mobilesam-mirror==1.0.0 --no-deps"


# --- the reference package ---------------------------------------------------------------------


def _timm_stand_ins() -> dict[str, types.ModuleType]:
    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob:
                raise NotImplementedError("timm stand-in: drop path is only used at rate 0 here")
            return x

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers, models.registry = models, layers, registry
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


def _timm_imports() -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        importlib.import_module("timm.models.layers")
        return True
    except Exception:  # timm installed without a working torchvision
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        return False


def import_reference_modeling() -> types.ModuleType:
    """``mobile_sam.modeling`` without the package __init__ (torchvision); skips when not installed."""
    if "mobile_sam.modeling" in sys.modules:
        return sys.modules["mobile_sam.modeling"]
    if "mobile_sam" not in sys.modules:
        spec = importlib.util.find_spec("mobile_sam")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"the MobileSAM reference (mobile_sam) is not installed; {INSTALL_HINT}")
        parent = types.ModuleType("mobile_sam")
        parent.__path__ = list(spec.submodule_search_locations)
        parent.__file__ = None
        sys.modules["mobile_sam"] = parent
    stand_ins = {} if _timm_imports() else _timm_stand_ins()
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("mobile_sam.modeling")
    except ImportError as exc:
        pytest.skip(f"mobile_sam.modeling failed to import ({exc}); {INSTALL_HINT}")
    finally:
        for name in stand_ins:  # the reference keeps its own references; nobody else sees the stand-ins
            sys.modules.pop(name, None)


def build_reference(image_size: int = 1024) -> nn.Module:
    """The reference MobileSAM as ``mobile_sam.build_sam.build_sam_vit_t`` builds it, at ``image_size``."""
    modeling = import_reference_modeling()
    grid = image_size // 16
    sam = modeling.Sam(
        image_encoder=modeling.TinyViT(
            img_size=image_size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
            use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip
    return sam.eval()


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere, so that no table or statistic sits at an identity value and hides a
    wrong mapping: BatchNorm statistics and scales away from 0/1 (MBConv's last BN starts at 0),
    attention biases comparable to q·k, small noise on everything else."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():  # views: in-place edits reach the module
        if not tensor.is_floating_point():
            continue
        if name.endswith(("bn.weight", "running_var")):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif name.endswith(("bn.bias", "running_mean")):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("attention_biases"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        else:
            tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    return module.eval()  # the reference caches the gathered attention bias (`ab`) when switched to eval


def reference_embeddings(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The reference ``TinyViT.forward_features``, its hard-coded 64×64 grid replaced by the real one."""
    x = encoder.patch_embed(pixels)
    for layer in encoder.layers:
        x = layer(x)
    grid = pixels.shape[-1] // 16
    return encoder.neck(x.view(x.shape[0], grid, grid, x.shape[-1]).permute(0, 3, 1, 2))


def reference_decode(sam, embeddings, boxes, multimask):
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
    )  # fmt: skip


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return randomise(build_reference(SIZE))


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    """The reference's state dict as a .pt file (what mobile_sam.pt is)."""
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint):
    return build_model("mobile-sam", checkpoint, image_size=SIZE)


@pytest.fixture(scope="module")
def encoded(reference, converted):
    """(the reference's image embeddings, samtune's) of two random normalised images, computed once."""
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return reference_embeddings(reference.image_encoder, pixels), get_family("mobile_sam").encode_images(converted, pixels)


# --- equivalence -------------------------------------------------------------------------------


def test_checkpoint_keys_are_the_reference_encoder_keys_with_a_new_prefix(reference, converted):
    ours = {k for k in converted.state_dict() if k.startswith("vision_encoder.")}
    theirs = {k for k in reference.state_dict() if k.startswith("image_encoder.")}
    classifier = {f"image_encoder.{k}" for k in ("norm_head.weight", "norm_head.bias", "head.weight", "head.bias")}
    assert {"image_encoder." + k[len("vision_encoder."):] for k in ours} == theirs - classifier


def test_image_embeddings_match_reference(encoded):
    expected, ours = encoded[0], encoded[1].image_embeddings
    assert ours.shape == expected.shape == (2, 256, SIZE // 16, SIZE // 16)
    diff = (ours - expected).abs().max().item()
    print(f"\n[image embeddings, {SIZE} px] max|d|={diff:.3e} (values up to {expected.abs().max():.2f})")
    assert diff < TOLERANCE


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_box_masks_and_iou_match_reference(reference, converted, encoded, multimask):
    """Each implementation decodes from its own embeddings: the whole pipeline is compared."""
    family = get_family("mobile_sam")
    boxes = torch.tensor([[10.0, 20.0, 90.0, 110.0], [40.0, 8.0, 120.0, 60.0]])
    with torch.no_grad():
        ref_masks, ref_iou = zip(*(reference_decode(reference, encoded[0][i : i + 1], boxes[i : i + 1], multimask) for i in range(2)))
        ref_masks, ref_iou = torch.cat(ref_masks), torch.cat(ref_iou)
        masks, iou = family.decode_prompts(converted, encoded[1], boxes=boxes, multimask_output=multimask)
    assert masks.shape == ref_masks.shape == (2, 3 if multimask else 1, SIZE // 4, SIZE // 4)
    mask_diff, iou_diff = (masks - ref_masks).abs().max().item(), (iou - ref_iou).abs().max().item()
    print(f"\n[box, multimask={multimask}] max|d mask logits|={mask_diff:.3e} max|d iou|={iou_diff:.3e}")
    assert ref_masks.abs().max() > 1e-2  # a meaningful comparison, not zeros against zeros
    assert mask_diff < TOLERANCE and iou_diff < TOLERANCE


@pytest.mark.slow
def test_reference_forward_at_1024_matches():
    """The reference TinyViT's own forward (64×64 grid only) and a box through the whole model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = randomise(build_reference(1024))
    model = load_official_mobile_sam(reference.state_dict(), image_size=1024)
    family = get_family("mobile_sam")
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[100.0, 200.0, 700.0, 900.0]])
    with torch.no_grad():
        start = time.perf_counter()
        expected = reference.image_encoder(pixels)
        middle = time.perf_counter()
        ours = family.encode_images(model, pixels)
        end = time.perf_counter()
        ref_masks, ref_iou = reference_decode(reference, expected, box, False)
        masks, iou = family.decode_prompts(model, ours, boxes=box)
    diffs = [(a - b).abs().max().item() for a, b in ((ours.image_embeddings, expected), (masks, ref_masks), (iou, ref_iou))]
    print(f"\n[1024 px] max|d| embeddings {diffs[0]:.3e}, mask logits {diffs[1]:.3e}, iou {diffs[2]:.3e}; "
          f"encoder {middle - start:.2f} s (reference) / {end - middle:.2f} s (samtune)")  # fmt: skip
    assert expected.shape == (1, 256, 64, 64) and max(diffs) < TOLERANCE


# --- files -------------------------------------------------------------------------------------


def test_sam_pth_export_loads_strictly_into_the_reference(reference, converted, tmp_path):
    family = get_family("mobile_sam")
    (path,) = family.export(converted, "sam-pth", tmp_path / "exported.pt")
    exported = torch.load(path, weights_only=True)
    fresh = build_reference(SIZE)
    fresh.load_state_dict(exported, strict=True)  # the official key layout, classifier included
    original = reference.state_dict()
    for key, value in exported.items():
        if ".head." not in key and ".norm_head." not in key:
            assert torch.equal(value, original[key]), key


def test_whole_model_folder_round_trip(tmp_path):
    """decoder_only/full checkpoints: save_pretrained, then load_full rebuilds the TinyViT from config.json;
    class prompts in the file are left to finetune.checkpoints (which adds the module first)."""
    from samtune.finetune.checkpoints import load_checkpoint

    family = get_family("mobile_sam")
    model = build_model("mobile-sam-tiny", image_size=64, init_seed=3)
    family.add_class_prompts(model, 2, 1, seed=0)
    with torch.no_grad():
        for param in model.vision_encoder.parameters():
            param.add_(0.01)  # "trained"
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "classes.json").write_text('{"tokens": 1, "label_space": {"ids": [1, 2]}}')
    loaded = load_checkpoint(tmp_path, family, build_base=lambda: pytest.fail("a whole-model folder needs no base"))
    pixels, box = torch.randn(1, 3, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    with torch.no_grad():
        a = family.decode_prompts(model, family.encode_images(model, pixels), boxes=box)[0]
        b = family.decode_prompts(loaded, family.encode_images(loaded, pixels), boxes=box)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the same weights (kernels may differ by rounding)
    assert torch.equal(loaded.class_prompts.tokens, model.class_prompts.tokens)
    assert loaded.shared_image_embedding.positional_embedding is loaded.prompt_encoder.shared_embedding.positional_embedding
    resized = build_model("mobile-sam-tiny", tmp_path, image_size=128)  # the folder as model.checkpoint, at another size
    assert resized.config.prompt_encoder_config.image_embedding_size == 8
    assert torch.equal(resized.vision_encoder.neck[0].weight, model.vision_encoder.neck[0].weight)


def test_onnx_export_runs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    family = get_family("mobile_sam")
    model = build_model("mobile-sam-tiny", image_size=64)
    encoder_file, decoder_file = family.export(model, "onnx", tmp_path)
    pixels = torch.randn(2, 3, 64, 64)  # exported at batch 1: the batch axis is dynamic
    (embeddings,) = ort.InferenceSession(str(encoder_file)).run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = family.encode_images(model, pixels).image_embeddings
    assert (torch.from_numpy(embeddings) - expected).abs().max() < 1e-4
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0]], [[10.0, 10.0, 60.0, 58.0]]])
    low_res, _ = ort.InferenceSession(str(decoder_file)).run(None, {"image_embeddings": embeddings, "input_boxes": boxes.numpy()})
    assert low_res.shape == (2, 1, 16, 16)


# --- behaviour and errors ----------------------------------------------------------------------


def test_parameter_counts_of_mobile_sam():
    """TinyViT-5M encoder (without its ImageNet classifier) + SAM's prompt encoder and decoder."""
    from samtune.adapters.mobile_sam import assemble, mobile_sam_config

    model = assemble(mobile_sam_config(1024), meta=True)
    encoder = sum(p.numel() for p in model.vision_encoder.parameters())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert encoder == 5_743_892 and total == 9_808_708


def test_batchnorm_keeps_its_statistics_in_train_mode():
    model = build_model("mobile-sam-tiny", image_size=64).train()
    batchnorms = [m for m in model.vision_encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    before = [m.running_mean.clone() for m in batchnorms]
    model.vision_encoder(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, batchnorms))


def test_lora_blocks_count_attention_blocks_across_stages():
    from samtune.adapters.lora import select_lora_modules
    from samtune.finetune.recipe import LoraSection

    family = get_family("mobile_sam")
    model = build_model("mobile-sam-tiny", image_size=64)  # attention stages of 1, 2, 1 blocks: global 0 | 1 2 | 3
    assert family.encoder_depth(model) == 4
    names = select_lora_modules(model, family, LoraSection(preset="encoder_attention", blocks=[1, -1]))
    assert names == ["vision_encoder.layers.2.blocks.0.attn.qkv", "vision_encoder.layers.3.blocks.0.attn.qkv"]
    with pytest.raises(SamtuneError, match="block 4 does not exist; the encoder has 4 blocks"):
        select_lora_modules(model, family, LoraSection(preset="encoder_attention", blocks=[4]))


def test_refusals_name_what_works(converted, tmp_path):
    family = get_family("mobile_sam")
    with pytest.raises(SamtuneError, match="exports sam-pth, onnx.*cannot describe the TinyViT"):
        family.export(converted, "hf", tmp_path / "hf")
    with pytest.raises(SamtuneError, match="has sdpa"):
        family.set_attention(converted, "fused_relpos")
    family.set_attention(converted, "sdpa")
    with pytest.raises(SamtuneError, match="set model.checkpoint to the official MobileSAM weights"):
        build_model("mobile-sam")


def test_sam_checkpoint_given_to_mobile_sam_is_refused(tmp_path):
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}
    torch.save(sd, tmp_path / "sam_vit_b.pth")
    with pytest.raises(CheckpointError, match="SAM ViT checkpoint, not MobileSAM"):
        build_model("mobile-sam", tmp_path / "sam_vit_b.pth")
    with pytest.raises(CheckpointError, match="Missing keys"):
        load_official_mobile_sam({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}, image_size=SIZE)


def test_any_multiple_of_16_runs_with_the_same_weights(converted):
    """No position table: the 128-px weights run at 64 px (a different grid, windows padded)."""
    model = load_official_mobile_sam(_official(converted), image_size=64)
    out = get_family("mobile_sam").encode_images(model, torch.randn(1, 3, 64, 64))
    assert isinstance(out, ImageEmbeddings) and out.image_embeddings.shape == (1, 256, 4, 4)
    assert isinstance(model.vision_encoder, TinyViT) and model.vision_encoder.config == TINY_VIT_5M


def _official(model) -> dict:
    from samtune.adapters.mobile_sam import hf_to_official

    return hf_to_official(model.state_dict())
