"""Official SAM checkpoints -> transformers.SamModel: numerical equivalence, round trip, errors, resizing.

The reference is Meta's `segment_anything.modeling` (test-only, installed with
`pip install segment-anything==1.0 --no-deps`); its components are called directly, not
`Sam.forward` (which is no_grad and does pre/post-processing). Random weights: nothing downloads.
"""

from __future__ import annotations

import os
import pickle
import shlex
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))  # helpers_official.py lies beside this file; tests/ has no __init__.py
import helpers_official  # noqa: E402

from samtune.adapters import checkpoint_files, official, official_config, official_keys, position_tables  # noqa: E402
from samtune.adapters.checkpoint_files import CheckpointError  # noqa: E402

TOLERANCE = 1e-4  # max abs diff, float32
# Small but structurally complete: 2 windowed + 2 global blocks, windows that tile the 8x8 grid,
# decoder with the official 8 heads (32 wide -> 2 channels per cross-attention head).
SMALL = dict(
    encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2, encoder_global_attn_indexes=(1, 3),
    image_size=128, window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)
GRID = SMALL["image_size"] // 16  # 8 tokens a side; low-res masks are 4 * GRID = 32 px


@pytest.fixture(scope="module")
def small_official():
    """(official Sam with perturbed random weights, its state dict)."""
    with torch.random.fork_rng():  # the modules' own init draws from the global RNG: make it repeatable
        torch.manual_seed(0)
        sam = helpers_official.perturb_parameters(helpers_official.build_official_sam(**SMALL), seed=0)
    return sam, sam.state_dict()


@pytest.fixture(scope="module")
def small_checkpoint(small_official, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "sam_small.pth"
    torch.save(small_official[1], path)
    return path


@pytest.fixture(scope="module")
def small_hf(small_checkpoint):
    return official.load_official_into_hf(small_checkpoint)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """An already-normalised input, 1x3xSxS."""
    return torch.randn(1, 3, SMALL["image_size"], SMALL["image_size"], generator=torch.Generator().manual_seed(1))


def make_prompts(case: str, grid: int = GRID) -> dict:
    """Official-layout prompts in the resized-input pixel frame (both implementations add the 0.5
    pixel-centre shift themselves): points 1 x N x 2 (x, y), labels 1 x N, box 1 x 4 (x1 y1 x2 y2),
    mask 1 x 1 x 4g x 4g low-res logits. Coordinates scale with the grid (fixed for grid 8 = 128 px)."""
    scale, generator = grid / GRID, torch.Generator().manual_seed(2)
    return {
        "points": torch.tensor([[[40.0, 50.0], [100.0, 30.0]]]) * scale if case == "points" else None,
        "labels": torch.tensor([[1, 0]]) if case == "points" else None,  # foreground, background
        "boxes": torch.tensor([[10.0, 20.0, 90.0, 110.0]]) * scale if "box" in case else None,
        "masks": torch.randn(1, 1, 4 * grid, 4 * grid, generator=generator) * 4 if "mask" in case else None,
    }


def run_official(sam, embedding, prompts, multimask):
    """Low-res mask logits (1 x C x 4g x 4g) and IoU (1 x C) from the reference components."""
    points = (prompts["points"], prompts["labels"]) if prompts["points"] is not None else None
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=points, boxes=prompts["boxes"], masks=prompts["masks"])
        return sam.mask_decoder(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )


def run_hf(model, prompts, multimask, **image):
    """Same outputs from SamModel (`pixel_values=` or `image_embeddings=`). Its prompt layout: points
    B x point_batch x N x 2, labels B x point_batch x N, boxes B x n_boxes x 4, masks B x 1 x 4g x 4g;
    outputs carry a point_batch axis, dropped here."""
    kwargs = {"input_masks": prompts["masks"]}
    if prompts["points"] is not None:
        kwargs.update(input_points=prompts["points"][:, None], input_labels=prompts["labels"][:, None])
    if prompts["boxes"] is not None:
        kwargs.update(input_boxes=prompts["boxes"][:, None])
    with torch.no_grad():
        out = model(multimask_output=multimask, **kwargs, **image)
    return out.pred_masks[:, 0], out.iou_scores[:, 0]


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("case", ["box", "points", "box+mask"])
def test_outputs_match_official(small_official, small_hf, image, case, multimask):
    sam, prompts = small_official[0], make_prompts(case)
    with torch.no_grad():
        embedding = sam.image_encoder(image)
    ref_masks, ref_iou = run_official(sam, embedding, prompts, multimask)
    masks, iou = run_hf(small_hf, prompts, multimask, pixel_values=image)
    assert masks.shape == ref_masks.shape == (1, 3 if multimask else 1, 4 * GRID, 4 * GRID)
    assert iou.shape == ref_iou.shape
    mask_diff, iou_diff = (masks - ref_masks).abs().max().item(), (iou - ref_iou).abs().max().item()
    print(f"\n[{case}, multimask={multimask}] max|d mask logits|={mask_diff:.3e} max|d iou|={iou_diff:.3e}")
    assert ref_masks.abs().max() > 1e-2  # a meaningful comparison, not zeros against zeros
    assert mask_diff < TOLERANCE and iou_diff < TOLERANCE


def test_image_embeddings_match_official(small_official, small_hf, image):
    with torch.no_grad():
        diff = (small_official[0].image_encoder(image) - small_hf.get_image_embeddings(image)).abs().max().item()
    print(f"\n[image embedding] max|d|={diff:.3e}")
    assert diff < TOLERANCE


def test_inferred_config(small_official):
    config = official_config.hf_config_from_official(small_official[1])
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (64, 4, 2)
    assert list(vision.global_attn_indexes) == [1, 3] and vision.window_size == 4
    assert (vision.image_size, vision.patch_size, vision.mlp_dim, vision.output_channels) == (128, 16, 256, 32)
    assert config.prompt_encoder_config.image_embedding_size == GRID
    assert config.mask_decoder_config.mlp_dim == 64 and config.mask_decoder_config.iou_head_hidden_dim == 32
    assert official_config.guess_official_variant(small_official[1]) == "custom"


def test_round_trip_is_exact_and_loads_into_official(small_official):
    sam, sd = small_official
    config = official_config.hf_config_from_official(sd)
    hf_sd = official_keys.official_to_hf_state_dict(sd, config)
    assert set(hf_sd) == set(transformers.SamModel(config).state_dict())  # every key accounted for
    back = official_keys.hf_to_official_state_dict(hf_sd)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    fresh = helpers_official.build_official_sam(**SMALL)
    fresh.load_state_dict(back, strict=True)


def test_export_from_loaded_model(small_official, small_hf):
    """A loaded (e.g. fine-tuned) SamModel exports to the exact official state dict."""
    back = official_keys.hf_to_official_state_dict(small_hf.state_dict())
    sd = small_official[1]
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_loaded_model_is_trainable_tied_and_owns_its_tensors(small_official):
    sd = small_official[1]
    model = official.load_official_into_hf(sd)
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert model.shared_image_embedding.positional_embedding is model.prompt_encoder.shared_embedding.positional_embedding
    with torch.no_grad():
        model.vision_encoder.pos_embed.add_(1.0)  # fine-tuning must not write into the caller's state dict
    assert not torch.equal(model.vision_encoder.pos_embed, sd["image_encoder.pos_embed"])
    hf_sd = dict(model.state_dict())
    hf_sd["prompt_encoder.shared_embedding.positional_embedding"] = torch.zeros(2, 16)  # untied and changed
    with pytest.raises(CheckpointError, match="tie_weights"):
        official_keys.hf_to_official_state_dict(hf_sd)


def test_pixel_constants_are_dropped(small_official):
    sd = dict(small_official[1])
    sd["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    sd["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(-1, 1, 1)  # a custom normalisation: warn
    with pytest.warns(UserWarning, match="pixel_std"):
        model = official.load_official_into_hf(sd)
    assert not any("pixel" in k for k in model.state_dict())


@pytest.mark.parametrize("layout", ["model-wrapper", "state_dict-wrapper", "ddp-prefix", "safetensors"])
def test_file_layouts(small_official, tmp_path, layout):
    sd = small_official[1]
    path = tmp_path / ("sam.safetensors" if layout == "safetensors" else "sam.pth")
    if layout == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"model-wrapper": {"model": sd, "epoch": 3}, "state_dict-wrapper": {"state_dict": sd},
               "ddp-prefix": {f"module.{k}": v for k, v in sd.items()}}[layout]
        torch.save(obj, path)
    loaded = checkpoint_files.load_state_dict_file(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


# --- errors ------------------------------------------------------------------------------------


def fake_encoder(width: int, depth: int) -> dict:
    """Just enough (shape-only, meta) tensors for the variant guess."""
    sd = {"image_encoder.patch_embed.proj.weight": torch.empty(width, 3, 16, 16, device="meta")}
    sd.update({f"image_encoder.blocks.{i}.norm1.weight": torch.empty(width, device="meta") for i in range(depth)})
    return sd


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_guess_official_variant(variant):
    width, depth, _, _ = official_config.OFFICIAL_VARIANTS[variant]
    assert official_config.guess_official_variant(fake_encoder(width, depth)) == variant


def test_vit_l_checkpoint_under_vit_b_name():
    with pytest.raises(CheckpointError) as err:
        official.check_architecture(fake_encoder(1024, 24), "sam-vit-base", "sam_vit_l_0b3195.pth")
    message = str(err.value)
    print(f"\n{message}")
    assert message.startswith("sam_vit_l_0b3195.pth: keys look like ViT-L (1024-wide, 24 blocks)")
    assert "model.name is sam-vit-base" in message and "Use model.name: sam-vit-large" in message
    official.check_architecture(fake_encoder(1024, 24), "vit_l", "x.pth")  # the right name passes


def test_missing_and_unexpected_keys_are_listed(small_official, tmp_path):
    sd = dict(small_official[1])
    del sd["image_encoder.blocks.2.mlp.lin2.bias"]
    sd["image_encoder.adapter.down.weight"] = torch.zeros(4, 64)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        official.load_official_into_hf(path)
    message = str(err.value)
    assert message.startswith(str(path))
    assert "image_encoder.blocks.2.mlp.lin2.bias" in message and "image_encoder.adapter.down.weight" in message
    assert "Missing keys (1)" in message and "unexpected keys (1)" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(small_official, tmp_path, suffix):
    path = tmp_path / f"sam_vit_b_01ec64{suffix}"
    if suffix == ".pth":
        torch.save(small_official[1], path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in small_official[1].items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        official.load_official_into_hf(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    obj = {"model": {"image_encoder.pos_embed": _Payload(marker)}}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as err:
        official.load_official_into_hf(path)
    message = str(err.value)
    assert str(path) in message and "would execute code" in message and "no code was run" in message
    assert not marker.exists()
    if writer == "pickle.dump":  # control: the payload is live, so the refusal above is what protected us
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(_Payload(control)))
        assert control.exists()


# --- image size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_load_at_other_image_size(small_checkpoint, size):
    model = official.load_official_into_hf(small_checkpoint, image_size=size)
    grid, vision = size // 16, model.vision_encoder
    assert vision.pos_embed.shape == (1, grid, grid, 64)
    for i, layer in enumerate(vision.layers):
        expected = 2 * grid - 1 if i in SMALL["encoder_global_attn_indexes"] else 2 * SMALL["window_size"] - 1
        assert layer.attn.rel_pos_h.shape == layer.attn.rel_pos_w.shape == (expected, 32)
    assert model.config.prompt_encoder_config.image_embedding_size == grid
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(pixel_values=image, input_boxes=torch.tensor([[[4.0, 8.0, size - 10.0, size - 4.0]]]))
    assert out.pred_masks.shape == (1, 1, 3, 4 * grid, 4 * grid)
    assert torch.isfinite(out.pred_masks).all() and torch.isfinite(out.iou_scores).all()


def test_same_image_size_is_bit_identical(small_official, small_checkpoint, small_hf):
    config = official_config.hf_config_from_official(small_official[1], image_size=SMALL["image_size"])
    hf_sd = official_keys.official_to_hf_state_dict(small_official[1], config)
    resized = position_tables.resize_position_tables(hf_sd, config)
    assert all(resized[k] is hf_sd[k] for k in hf_sd)
    model = official.load_official_into_hf(small_checkpoint, image_size=SMALL["image_size"])
    reference = small_hf.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())


def test_rel_pos_resize_matches_official_on_the_fly_interpolation(small_official):
    """Resizing a global table ahead of time equals what the official attention does when lengths differ."""
    modeling = helpers_official.import_official_modeling()
    table = small_official[1]["image_encoder.blocks.1.attn.rel_pos_h"]  # (2*8-1, 32)
    config = official_config.hf_config_from_official(small_official[1], image_size=256)
    resized = position_tables.resize_position_tables({"vision_encoder.layers.1.attn.rel_pos_h": table}, config)
    new = resized["vision_encoder.layers.1.attn.rel_pos_h"]
    grid = 256 // 16
    get_rel_pos = sys.modules[modeling.ImageEncoderViT.__module__].get_rel_pos
    assert torch.equal(get_rel_pos(grid, grid, table), get_rel_pos(grid, grid, new))


# --- full size -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b_full_size_matches_official():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        sam = helpers_official.perturb_parameters(helpers_official.build_official_sam(768, 12, 12, (2, 5, 8, 11)))
    sd = sam.state_dict()
    assert official_config.guess_official_variant(sd) == "vit_b"
    model = official.load_official_into_hf(sd, expected_variant="sam-vit-base")
    vision = model.config.vision_config
    assert list(vision.global_attn_indexes) == [2, 5, 8, 11] and vision.window_size == 14
    assert vision.num_attention_heads == 12
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the encoder dominates the cost: run it once per implementation
        ref_embedding, embedding = sam.image_encoder(image), model.get_image_embeddings(image)
    print(f"\n[ViT-B 1024, image embedding] max|d|={(ref_embedding - embedding).abs().max().item():.3e}")
    for case in ("box", "points", "box+mask"):
        for multimask in (True, False):
            prompts = make_prompts(case, grid=64)
            ref_masks, ref_iou = run_official(sam, ref_embedding, prompts, multimask)
            masks, iou = run_hf(model, prompts, multimask, image_embeddings=embedding)
            mask_diff, iou_diff = (masks - ref_masks).abs().max().item(), (iou - ref_iou).abs().max().item()
            print(f"[ViT-B 1024, {case}, multimask={multimask}] max|d mask|={mask_diff:.3e} max|d iou|={iou_diff:.3e}")
            assert mask_diff < TOLERANCE and iou_diff < TOLERANCE
