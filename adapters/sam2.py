"""SAM 2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024) as a model family,
through Hugging Face ``transformers.Sam2Model`` (the image model: no memory modules).

Variants: ``sam2-hiera-tiny | sam2-hiera-small | sam2-hiera-base-plus | sam2-hiera-large`` (SAM 2.1
weights by default: hub ids ``facebook/sam2.1-hiera-*``; SAM 2.0 files load the same way, the image
model's keys did not change), ``medsam2`` (MedSAM2, Ma et al. 2025: a fine-tuned SAM 2.1 Hiera-T
run at 512 px; ``model.checkpoint: MedSAM2_latest.pt``) and ``sam2-tiny-random`` (random init,
2.0 M parameters, 0.3 M of them Hiera, for tests and offline runs).

Shapes. The Hiera encoder (``vision_encoder.backbone``: patch stride 4, four stages, each halving
the grid) and its FPN neck give three maps of width D (256 for every released model) at strides 4,
8 and 16. ``encode_images`` returns the stride-16 map plus ``no_memory_embedding`` as
``image_embeddings`` (B×D×S/16×S/16, what SAM 2's image predictor adds on a frame without memory)
and the two finer maps after the mask decoder's 1×1 projections ``conv_s0``/``conv_s1`` as
``high_res_features`` (B×D/8×S/4×S/4, B×D/4×S/8×S/8). Those projections belong to the mask
decoder (they train with it) but run at encoding, as in the official code and transformers: the
projected maps are 8× and 4× smaller than the raw ones, which matters once they are repeated per
prompt. ``decode_prompts`` gives N×M×S/4×S/4 low-res logits and N×M IoU like SAM.

Preprocessing differs from SAM v1: the image is resized to an S×S square (aspect ratio not kept,
no padding) and normalised with the ImageNet mean/std (sam2/utils/transforms.py: ``Resize((S, S))``
on the 0-1 float image, antialiased bilinear, then ``Normalize``). ``SquareResizeTransform`` does
exactly that with ``F.interpolate(antialias=True)`` (what torchvision's tensor Resize calls), so
``resized_shape`` is (S, S) and the base class's ``logits_to_original`` (crop nothing, resize the
S×S logits to H×W) is the official post-processing; no override is needed.

Decisions:
- Object score: SAM 2's decoder also predicts whether the object is present (``object_score_logits``).
  samtune ignores it in training and prediction, as the official image predictor does
  (SAM2ImagePredictor never gates masks with it; only the video tracker, SAM2Base._forward_sam_heads,
  replaces masks of absent objects). An empty mask is learnt from the mask logits themselves.
- Single-mask output: transformers' and the official image predictor's decoder, in eval mode, may
  replace the single-mask token's output by the best multimask output when the former is
  "unstable" (``dynamic_multimask_via_stability``). Training optimises the single-mask token (the
  fallback is off in train mode), so samtune switches the fallback off on the models it builds and
  evaluates what was trained. ``config.json`` keeps the official setting, so an exported folder
  behaves like the official model elsewhere.
- Export: ``hf`` only (a ``Sam2Model.from_pretrained`` folder, LoRA merged). ``sam-pth`` is SAM v1's
  key layout; an official SAM 2 ``.pt`` would need the video memory modules that the image model
  does not have (the official loader is strict); ONNX is not written for SAM 2's three-map encoder
  output (adapters/export.py exports SamModel's signature).

Official checkpoints (``sam2.1_hiera_tiny.pt`` ..., ``MedSAM2_latest.pt``: ``{"model": state_dict}``
of the sam2 package's ``SAM2Base``) are read with ``torch.load(weights_only=True)`` and converted
in memory (``official_to_hf``): the image encoder, prompt encoder and mask decoder keys are renamed
to transformers' (the mapping follows transformers' convert_sam2_to_hf.py), and the video-only keys
(memory attention, memory encoder, object pointers, ``mask_downsample``, ``maskmem_tpos_enc``,
``no_mem_pos_enc``, ``no_obj_ptr``, ``no_obj_embed_spatial``) are left out.

Video / volumes: ``video_model_from(image_model, official)`` builds transformers'
``Sam2VideoModel`` (memory attention across frames) from the same weights: every image-model
module has the same name in both classes, and the memory modules come from the official file
(``official_to_hf(..., video=True)`` maps all of its keys).

Reference implementation for the tests: ``sam2==1.1.0`` on PyPI is a source distribution only
(its setup.py builds a CUDA extension unless ``SAM2_BUILD_CUDA=0``, and it requires torchvision and
hydra); ``SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0`` gives the pure
Python package. Its ``sam2/__init__`` imports hydra, so the tests import ``sam2.modeling`` under an
empty parent package (tests/unit/adapters/test_sam2.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder

from samtune.adapters.checkpoint_files import CheckpointError, load_state_dict_file
from samtune.adapters.family import CLASS_PROMPTS, ImageEmbeddings, ModelFamily, register_family
from samtune.adapters.registry import ModelVariant, register_model
from samtune.errors import SamtuneError

# ImageNet statistics on 0-1 RGB, as SAM 2 normalises (sam2/utils/transforms.py, SAM2Transforms)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- architecture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HieraLayout:
    """One Hiera encoder: widths and heads per stage (each stage doubles both), blocks per stage,
    the blocks with global attention (counted across stages), the window size per stage and the
    background size of the windowed position embedding."""

    embed_dims: tuple[int, ...]
    heads: tuple[int, ...]
    blocks: tuple[int, ...]
    global_blocks: tuple[int, ...]
    windows: tuple[int, ...] = (8, 4, 14, 7)
    position_background: tuple[int, int] = (7, 7)

    @property
    def depth(self) -> int:
        return sum(self.blocks)


# The released encoders, from the sam2 package's configs (sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml;
# Hiera's constructor defaults fill what a yaml leaves out: base_plus takes stages (2, 3, 16, 3),
# global blocks (12, 16, 20) and a 14×14 background) and transformers' convert_sam2_to_hf.get_config.
HIERA = {
    "hiera_tiny": HieraLayout((96, 192, 384, 768), (1, 2, 4, 8), (1, 2, 7, 2), (5, 7, 9)),
    "hiera_small": HieraLayout((96, 192, 384, 768), (1, 2, 4, 8), (1, 2, 11, 2), (7, 10, 13)),
    "hiera_base_plus": HieraLayout((112, 224, 448, 896), (2, 4, 8, 16), (2, 3, 16, 3), (12, 16, 20), position_background=(14, 14)),
    "hiera_large": HieraLayout((144, 288, 576, 1152), (2, 4, 8, 16), (2, 6, 36, 4), (23, 33, 43), windows=(8, 4, 16, 8)),
}
# A Hiera of ~0.3 M parameters for tests and the offline demo: the released structure (four
# stages, widths and heads doubling, a global block inside stage 2, the first block of a stage
# pooling its queries inside the previous stage's windows), and windows that need padding at 64
# and 128 px (6 on 8×8 and 4×4 grids) as 14 does on SAM 2's 64×64 grid.
HIERA_TEST = HieraLayout((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 2, 1), (4,), windows=(8, 4, 6, 4), position_background=(4, 4))

# The prompt encoder and mask decoder of every released SAM 2 (SAM2Base._build_sam_heads: width =
# the neck's 256, two two-way layers, 8 heads, MLP 2048, IoU head 3×256, mask input 16 channels).
DECODER = dict(num_hidden_layers=2, num_attention_heads=8, mlp_dim=2048, iou_head_depth=3, iou_head_hidden_dim=256)
PATCH_STRIDE = 4  # Hiera's 7×7 stride-4 patch embedding
EMBEDDING_STRIDE = 16  # image embeddings (the third FPN level) per input pixel


def check_image_size(image_size: int, layout: HieraLayout) -> None:
    """Every stage's grid must halve evenly (3 poolings after the stride-4 patch embedding: a
    multiple of 32), and stage 0's grid must be a whole number of its windows (the windowed
    position embedding is tiled over it)."""
    multiple = int(np.lcm(32, PATCH_STRIDE * layout.windows[0]))
    if image_size % multiple or image_size < 2 * multiple:
        raise SamtuneError(f"model.image_size={image_size}: a SAM 2 (Hiera) model needs a multiple of {multiple}, at least {2 * multiple}.")


def sam2_config(image_size: int, layout: HieraLayout, width: int = 256, **decoder) -> Sam2Config:
    """A Sam2Config for ``layout`` at ``image_size`` px; decoder fields as released unless overridden."""
    check_image_size(image_size, layout)
    backbone = Sam2HieraDetConfig(
        hidden_size=layout.embed_dims[0], num_attention_heads=layout.heads[0], image_size=[image_size, image_size],
        blocks_per_stage=list(layout.blocks), embed_dim_per_stage=list(layout.embed_dims),
        num_attention_heads_per_stage=list(layout.heads), window_size_per_stage=list(layout.windows),
        global_attention_blocks=list(layout.global_blocks), window_positional_embedding_background_size=list(layout.position_background),
    )  # fmt: skip
    sizes = [[image_size // s] * 2 for s in (PATCH_STRIDE, 2 * PATCH_STRIDE, EMBEDDING_STRIDE)]
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=list(layout.embed_dims[::-1]), backbone_feature_sizes=sizes, fpn_hidden_size=width)
    prompt = Sam2PromptEncoderConfig(hidden_size=width, image_size=image_size, patch_size=EMBEDDING_STRIDE, mask_input_channels=16)
    mask_decoder = Sam2MaskDecoderConfig(hidden_size=width, **{**DECODER, **decoder})
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=mask_decoder)


def make_tiny_sam2_config(image_size: int = 128) -> Sam2Config:
    """``sam2-tiny-random``: HIERA_TEST with a 128-wide neck and the released decoder's layout
    (8 heads, MLP 2048 on the few prompt tokens: cheap, and the official SAM2Base builds exactly
    this decoder for any neck width, which the equivalence test relies on). 128 is the narrowest
    width transformers' video model accepts (``sam2_video_config``)."""
    return sam2_config(image_size, HIERA_TEST, width=128)


def _layout_of(config: Sam2Config) -> HieraLayout:
    b = config.vision_config.backbone_config
    return HieraLayout(
        tuple(b.embed_dim_per_stage), tuple(b.num_attention_heads_per_stage), tuple(b.blocks_per_stage),
        tuple(b.global_attention_blocks), tuple(b.window_size_per_stage), tuple(b.window_positional_embedding_background_size),
    )  # fmt: skip


def with_image_size(config: Sam2Config, image_size: int) -> Sam2Config:
    """The same architecture at another input size. No weight depends on it: Hiera interpolates its
    position embedding to the grid, and the prompt encoder's Fourier features take coordinates
    normalised by the image size."""
    check_image_size(image_size, _layout_of(config))
    config.vision_config.backbone_config.image_size = [image_size, image_size]
    config.vision_config.backbone_feature_sizes = [[image_size // s] * 2 for s in (PATCH_STRIDE, 2 * PATCH_STRIDE, EMBEDDING_STRIDE)]
    config.prompt_encoder_config.image_size = image_size
    return config


def single_mask_token_only(model) -> None:
    """Decode the single-mask token whenever one mask is asked for, in eval mode too (see the module
    docstring); the config keeps the official setting."""
    for module in model.modules():
        if isinstance(module, Sam2MaskDecoder):
            module.dynamic_multimask_via_stability = False


@torch.no_grad()
def _same_positional_tables(model: Sam2Model) -> None:
    """The image-wide positional encoding and the prompt encoder's point encoding must use one
    Fourier matrix (the official model has one, ``pe_layer``); transformers keeps two buffers and
    draws them independently at random init, which would put prompts and image on unrelated
    coordinates. Copied, not shared: safetensors refuses to save two names for one tensor."""
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)


# --- preprocessing -----------------------------------------------------------------------------


class SquareResizeTransform:
    """``transform(image=H×W×3 RGB or H×W grey (0-255), mask=H×W)`` -> {"image": S×S×3 float32,
    "mask": S×S}: SAM 2's square resize (aspect ratio not kept, nothing padded) and ImageNet
    normalisation. The image is resized as float (the official pipeline resizes the 0-1 tensor,
    not a rounded uint8 image); the label map with nearest neighbour at pixel centres (OpenCV's
    INTER_NEAREST_EXACT, as adapters/preprocess.py, by index: any dtype, bool included)."""

    def __init__(self, image_size: int, pixel_mean: tuple[float, ...] = IMAGENET_MEAN, pixel_std: tuple[float, ...] = IMAGENET_STD):
        self.image_size = image_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)  # on 0-1 values

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """The whole S×S input is image: every original size maps to (S, S)."""
        return self.image_size, self.image_size

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        size = self.image_size
        planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        planes = planes[None] if image.ndim == 2 else planes.permute(2, 0, 1)  # a grey slice is resized once
        if tuple(image.shape[:2]) != (size, size):
            planes = F.interpolate(planes[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            mask = mask[_nearest_centres(mask.shape[0], size)][:, _nearest_centres(mask.shape[1], size)]
        mean = torch.tensor(self.pixel_mean).view(3, 1, 1) * 255.0
        std = torch.tensor(self.pixel_std).view(3, 1, 1) * 255.0
        chw = ((planes.expand(3, -1, -1) - mean) / std).numpy()
        return {"image": chw.transpose(1, 2, 0), "mask": mask}  # S×S×3 view of the 3×S×S buffer


def _nearest_centres(n: int, size: int) -> np.ndarray:
    """Source index of each of ``size`` output pixels: the one holding the output pixel's centre."""
    return np.minimum(((np.arange(size) + 0.5) * (n / size)).astype(np.int64), n - 1)


# --- official checkpoints ----------------------------------------------------------------------

# Keys of SAM2Base that only the video tracker uses; the image model has no place for them.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "mask_downsample.",
)  # fmt: skip
VIDEO_ONLY_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")

_PREFIXES = (
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.", "vision_encoder.neck."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
)
# The video tracker's keys, for Sam2VideoModel (``official_to_hf(..., video=True)``)
_VIDEO_PREFIXES = (
    ("memory_attention.", "memory_attention."),
    ("memory_encoder.fuser.", "memory_encoder.memory_fuser."),
    ("memory_encoder.out_proj.", "memory_encoder.projection."),
    ("memory_encoder.pix_feat_proj.", "memory_encoder.feature_projection."),
    ("memory_encoder.", "memory_encoder."),
    ("obj_ptr_proj.", "object_pointer_proj."),
    ("obj_ptr_tpos_proj.", "temporal_positional_encoding_projection_layer."),
    ("mask_downsample.", "mask_downsample."),
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
)
# Renames inside a component (applied in order to the key after the prefix change); the official
# nn.Sequential indices become transformers' named modules.
_MASK_DOWNSCALING = {"0": "conv1", "1": "layer_norm1", "3": "conv2", "4": "layer_norm2", "6": "conv3"}
_OUTPUT_UPSCALING = {"0": "upscale_conv1", "1": "upscale_layer_norm", "3": "upscale_conv2"}
_RENAMES = (
    (re.compile(r"^vision_encoder\.backbone\.patch_embed\.proj\."), lambda m: "vision_encoder.backbone.patch_embed.projection."),
    (re.compile(r"^vision_encoder\.neck\.convs\.(\d+)\.conv\."), lambda m: f"vision_encoder.neck.convs.{m[1]}."),
    (re.compile(r"\.norm(\d?)\."), lambda m: f".layer_norm{m[1]}."),  # Hiera blocks, two-way and memory layers, fuser
    (re.compile(r"\.norm_final_attn\."), lambda m: ".layer_norm_final_attn."),
    (re.compile(r"\.out_proj\."), lambda m: ".o_proj."),
    (re.compile(r"^prompt_encoder\.mask_downscaling\.(\d)\."), lambda m: f"prompt_encoder.mask_embed.{_MASK_DOWNSCALING[m[1]]}."),
    (re.compile(r"^mask_decoder\.output_upscaling\.(\d)\."), lambda m: f"mask_decoder.{_OUTPUT_UPSCALING[m[1]]}."),
    # the memory fuser's ConvNeXt blocks
    (re.compile(r"\.dwconv\."), lambda m: ".depthwise_conv."),
    (re.compile(r"\.pwconv(\d)\."), lambda m: f".pointwise_conv{m[1]}."),
    (re.compile(r"\.gamma$"), lambda m: ".scale"),
)
# The official MLP (``layers.0 .. layers.n-1``) is transformers' ``proj_in``, ``layers.0 .. n-3``, ``proj_out``.
_MLP = re.compile(r"^(.*\.(?:mlp|output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)|object_pointer_proj)\.layers\.(\d+)\.(weight|bias)$")
# The mask downsampler's Sequential of (conv, LayerNorm2d, GELU) × n + a 1×1 conv -> layers.i.conv/layer_norm, final_conv
_DOWNSAMPLER = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$")
_POINT_EMBEDDING = re.compile(r"^prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_POSITIONAL = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")


def is_video_only(key: str) -> bool:
    return key.startswith(VIDEO_ONLY_PREFIXES) or key in VIDEO_ONLY_KEYS


def official_to_hf(sd: Mapping[str, torch.Tensor], video: bool = False) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Official SAM2Base keys -> transformers keys: (converted dict, video-only keys left out, keys
    that map to nothing). ``video``: convert the video tracker's keys too, for ``Sam2VideoModel``
    (then nothing is left out)."""
    prefixes = _PREFIXES + (_VIDEO_PREFIXES if video else ())
    renamed: dict[str, torch.Tensor] = {}
    left_out, unknown = [], []
    for key, value in sd.items():
        if not video and is_video_only(key):
            left_out.append(key)
            continue
        new = next((hf + key[len(old):] for old, hf in prefixes if key.startswith(old)), None)
        if new is None:
            unknown.append(key)
            continue
        for pattern, replace in _RENAMES:
            new = pattern.sub(replace, new)
        renamed[new] = value
    out: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    mlp_depth: dict[str, int] = {}
    downsampler_end = max((int(m[1]) for k in renamed if (m := _DOWNSAMPLER.match(k))), default=-1)
    for key in renamed:
        if m := _MLP.match(key):
            mlp_depth[m[1]] = max(mlp_depth.get(m[1], 0), int(m[2]) + 1)
    for key, value in renamed.items():
        if m := _MLP.match(key):
            prefix, index, param = m[1], int(m[2]), m[3]
            name = "proj_in" if index == 0 else "proj_out" if index == mlp_depth[prefix] - 1 else f"layers.{index - 1}"
            out[f"{prefix}.{name}.{param}"] = value
        elif m := _DOWNSAMPLER.match(key):
            index, param = int(m[1]), m[2]
            name = "final_conv" if index == downsampler_end else f"layers.{index // 3}.{('conv', 'layer_norm')[index % 3]}"
            out[f"memory_encoder.mask_downsampler.{name}.{param}"] = value
        elif m := _POINT_EMBEDDING.match(key):
            points[int(m[1])] = value
        elif key == _GAUSSIAN:
            for name in _POSITIONAL:  # one matrix, two buffers in transformers (two tensors: see _same_positional_tables)
                out[name] = value.clone()
        else:
            out[key] = value
    if points:  # four 1×C embeddings (negative, positive, box corners) -> one 4×C table
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], 0)
    return out, left_out, unknown


def encoder_of_official(sd: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(stage-0 width, number of Hiera blocks) of an official SAM 2 state dict; None if it has no Hiera."""
    patch = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {int(m[1]) for k in sd if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    return int(patch.shape[0]), len(blocks)


def _official_variant_name(width_depth: tuple[int, int]) -> str | None:
    return next((name for name, layout in HIERA.items() if (layout.embed_dims[0], layout.depth) == width_depth), None)


def load_official_sam2(path_or_sd, config: Sam2Config, variant_name: str = "") -> Sam2Model:
    """An official SAM 2 checkpoint (path, or a state dict) -> Sam2Model of ``config``, eval mode,
    loaded strictly (every image-model weight from the file, no key of the file unused except the
    video-only ones)."""
    source = "<state dict>" if isinstance(path_or_sd, Mapping) else str(path_or_sd)
    if isinstance(path_or_sd, Mapping):  # copies: the model adopts these tensors (assign=True)
        sd = {k: v.detach().clone() for k, v in path_or_sd.items()}
    else:
        sd = load_state_dict_file(path_or_sd)
    found = encoder_of_official(sd)
    if found is None:
        if "image_encoder.patch_embed.proj.weight" in sd or "image_encoder.patch_embed.seq.0.c.weight" in sd:
            raise CheckpointError(f"{source}: this is a SAM (v1) or MobileSAM checkpoint, not SAM 2; use model.name: sam-vit-base/large/huge, medsam-vit-base or mobile-sam for it.")
        raise CheckpointError(
            f"{source}: no Hiera patch embedding ('image_encoder.trunk.patch_embed.proj.weight') among {len(sd)} keys "
            f"(first: {list(sd)[:3]}); this is not an official SAM 2 checkpoint. Use e.g. sam2.1_hiera_tiny.pt or MedSAM2_latest.pt."
        )
    layout = _layout_of(config)
    if found != (layout.embed_dims[0], layout.depth):
        looks = _official_variant_name(found)
        fix = f"use model.name: sam2-{looks.replace('_', '-')}" if looks else "use the checkpoint of this model.name"
        raise CheckpointError(
            f"{source}: the encoder is a Hiera {found[0]} wide with {found[1]} blocks{f' ({looks})' if looks else ''}; "
            f"model.name={variant_name!r} is {layout.embed_dims[0]} wide with {layout.depth} blocks; {fix}."
        )
    hf_sd, _video, unknown = official_to_hf(sd)
    with torch.device("meta"):
        model = Sam2Model(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - hf_sd.keys()), sorted(unknown + list(hf_sd.keys() - expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit the SAM 2 image model. Missing keys ({len(missing)}, transformers names): {missing[:20]}; "
            f"unexpected keys ({len(unexpected)}): {unexpected[:20]}. Use an unmodified official SAM 2 / MedSAM2 checkpoint."
        )
    try:
        model.load_state_dict(hf_sd, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: tensor shapes do not fit model.name={variant_name!r}: {exc}") from exc
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source}: no values for {left_on_meta[:10]}.")
    single_mask_token_only(model)
    return model.eval()


# --- the video tracker --------------------------------------------------------------------------


# transformers' Sam2VideoMemoryAttentionLayer hard-codes 64-wide memories (kv_in_dim=64), as released
VIDEO_MEMORY_WIDTH = 64


def sam2_video_config(config: Sam2Config, official: Mapping[str, torch.Tensor] | None = None):
    """A ``transformers.Sam2VideoConfig`` around an image model's config: the same encoder, prompt
    encoder and decoder, memory modules as wide as the neck, the memory attention's rotary grid
    = the embedding grid. With ``official`` (an official state dict), what differs between SAM 2.0,
    2.1 and MedSAM2 is read from its keys: the number of memory-attention layers, the occlusion
    embedding and the temporal projection of object pointers (both new in 2.1)."""
    from transformers import Sam2VideoConfig

    if config.vision_config.fpn_hidden_size % VIDEO_MEMORY_WIDTH or config.vision_config.fpn_hidden_size <= VIDEO_MEMORY_WIDTH:
        raise SamtuneError(
            f"a SAM 2 video model needs a neck width that is a multiple of {VIDEO_MEMORY_WIDTH} above it (this model: "
            f"{config.vision_config.fpn_hidden_size}): transformers' memory attention reads {VIDEO_MEMORY_WIDTH}-wide memories "
            "and splits each object pointer into width/64 of them."
        )
    image_size, width = config.prompt_encoder_config.image_size, config.vision_config.fpn_hidden_size
    grid = image_size // EMBEDDING_STRIDE
    fields = dict(
        image_size=image_size, memory_attention_hidden_size=width, memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=width, mask_downsampler_embed_dim=width, memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=4 * width,
        memory_encoder_output_channels=VIDEO_MEMORY_WIDTH,
    )  # fmt: skip
    if official is not None:
        layers = {int(m[1]) for k in official if (m := re.match(r"memory_attention\.layers\.(\d+)\.", k))}
        fields.update(
            memory_attention_num_layers=len(layers), enable_occlusion_spatial_embedding="no_obj_embed_spatial" in official,
            enable_temporal_pos_encoding_for_object_pointers="obj_ptr_tpos_proj.weight" in official,
        )  # fmt: skip
    return Sam2VideoConfig(
        vision_config=config.vision_config.to_dict(), prompt_encoder_config=config.prompt_encoder_config.to_dict(),
        mask_decoder_config=config.mask_decoder_config.to_dict(), **fields,
    )  # fmt: skip


def video_model_from(image_model, official=None):
    """SAM 2's video tracker (``transformers.Sam2VideoModel``, memory propagation across frames or
    slices) with an image model's weights (LoRA merged first, class prompts left out), eval mode.

    The two classes share every image-model module name, so the image weights load as they are; the
    memory modules come from ``official`` (the official checkpoint the image model was fine-tuned
    from: path or state dict, converted by ``official_to_hf(video=True)``). ``official=None`` leaves
    them at random init (tests, ``sam2-tiny-random``)."""
    from transformers import Sam2VideoModel

    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    state = {k: v for k, v in image.state_dict().items() if not k.startswith(CLASS_PROMPTS + ".")}
    source = None
    if official is not None and not isinstance(official, Mapping):
        source, official = str(official), load_state_dict_file(official)
    config = sam2_video_config(image.config, official)
    model = Sam2VideoModel(config)  # on the CPU: its rotary tables are buffers that no state dict holds
    if official is None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not is_video_only_hf(k) for k in missing):
            raise CheckpointError(f"the image model does not fit Sam2VideoModel: missing {missing[:10]}, unexpected {unexpected[:10]}")
        return model.eval()
    converted, _, unknown = official_to_hf(official, video=True)
    weights = {**state, **{k: v for k, v in converted.items() if is_video_only_hf(k)}}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - weights.keys()), sorted(unknown + list(weights.keys() - expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source or '<state dict>'}: its memory modules do not fit the video model. Missing ({len(missing)}): {missing[:12]}; "
            f"unexpected ({len(unexpected)}): {unexpected[:12]}. Use the official SAM 2 / MedSAM2 file the image model comes from."
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source or '<state dict>'}: tensor shapes do not fit the video model: {exc}") from exc
    return model.eval()


def _video_model_hf(image_model, source: str):
    """``video_model_from`` with the memory modules of a Hugging Face folder or hub repo saved from
    ``Sam2VideoModel`` (what ``facebook/sam2.1-hiera-*`` hold for video use); a folder saved from
    ``Sam2Model`` has none, which is an error rather than a silently random memory."""
    from transformers import Sam2VideoModel

    try:
        pretrained, info = Sam2VideoModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError) as exc:  # offline, unknown hub id, no weights, not a SAM 2 config
        raise SamtuneError(
            f"could not load SAM 2's memory modules from {source!r} for volume propagation: {exc}\n"
            "Set model.checkpoint to the official .pt file (e.g. sam2.1_hiera_tiny.pt, MedSAM2_latest.pt) or a local folder saved from Sam2VideoModel."
        ) from None
    lacking = [k for k in info.get("missing_keys", []) if is_video_only_hf(k)]
    if lacking:
        raise SamtuneError(f"{source}: holds no memory modules ({len(lacking)} missing, e.g. {lacking[0]}): it was saved from the image model. "
                           "Set model.checkpoint to the official .pt file for memory propagation, or use eval.propagation=box.")  # fmt: skip
    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    state = {k: v for k, v in image.state_dict().items() if not k.startswith(CLASS_PROMPTS + ".")}
    config = sam2_video_config(image.config)
    for key in ("memory_attention_num_layers", "enable_occlusion_spatial_embedding", "enable_temporal_pos_encoding_for_object_pointers"):
        setattr(config, key, getattr(pretrained.config, key))  # what differs between SAM 2.0, 2.1 and MedSAM2
    video = Sam2VideoModel(config)
    memory = {k: v for k, v in pretrained.state_dict().items() if is_video_only_hf(k)}
    missing, unexpected = video.load_state_dict({**state, **memory}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: its memory modules do not fit this model (missing {missing[:8]}, unexpected {unexpected[:8]}).")
    return video.eval()


_HF_VIDEO_PREFIXES = tuple(hf for _, hf in _VIDEO_PREFIXES)


def is_video_only_hf(key: str) -> bool:
    """A Sam2VideoModel key that Sam2Model does not have (memory modules, object pointers)."""
    return key.startswith(_HF_VIDEO_PREFIXES)


# --- the family --------------------------------------------------------------------------------

_ENCODER_BLOCK = r"vision_encoder\.backbone\.blocks\.\d+\."
_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?"
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)\.(?:q|k|v|o)_proj"
)


@register_family
class Sam2Family(ModelFamily):
    """SAM 2's image model. LoRA roles name the Linear layers of the Hiera blocks (the fused
    ``attn.qkv``, ``attn.proj``, ``mlp.proj_in/out``; the ``proj`` skip projection of a stage's
    first block is no role) and the two-way transformer's q/k/v/o projections.
    ``adapter.lora.blocks`` counts Hiera blocks across stages (Hiera-T: 12, S: 16, B+: 24, L: 48).
    ``no_memory_embedding`` (added to the image embeddings) counts as image encoder and stays
    frozen except in ``full`` mode; the image model has no memory modules."""

    name = "sam2"
    image_encoder = "vision_encoder"
    mask_decoder = "mask_decoder"
    prompt_modules = ("prompt_encoder", "shared_image_embedding")
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"attn\.qkv",  # q, k, v fused in one Linear
        "encoder_attention_out": _ENCODER_BLOCK + r"attn\.proj",
        "encoder_mlp": _ENCODER_BLOCK + r"mlp\.proj_(?:in|out)",
        "decoder_attention": _DECODER_ATTENTION,
    }
    encoder_block = re.compile(r"vision_encoder\.backbone\.blocks\.(\d+)\.")
    attention_kinds = ("sdpa",)  # transformers' SDPA path (Sam2Model's default)
    export_formats = ("hf",)

    def build(self, variant: ModelVariant, checkpoint: str | None, image_size: int, init_seed: int) -> Sam2Model:
        if checkpoint is None and variant.make_config is not None:
            with torch.random.fork_rng():
                torch.manual_seed(init_seed)
                model = Sam2Model(variant.make_config(image_size))
                _init_random(model)
            single_mask_token_only(model)
            return model
        config = self._config_of(variant, image_size)
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            raise SamtuneError(
                f"model.name={variant.name!r} has no download: set model.checkpoint to its official weights file "
                f"({_OFFICIAL_FILES.get(variant.name, 'the .pt file')})."
            )
        path = Path(source)
        if path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
            if not path.is_file():
                raise CheckpointError(f"model.checkpoint={source!r}: no such file; check the path (relative paths are relative to the current directory) or download {_OFFICIAL_FILES.get(variant.name, 'the checkpoint')} first.")
            return load_official_sam2(path, config, variant.name)
        if path.is_file():
            raise SamtuneError(
                f"model.checkpoint={source!r} is not an official SAM 2 .pt file or a Hugging Face model folder; "
                "point it at e.g. sam2.1_hiera_tiny.pt or a folder with config.json and model.safetensors."
            )
        return _load_hf(source, variant.name, path, image_size)  # a folder, or a hub id (facebook/sam2.1-hiera-tiny has a "suffix")

    def video_model(self, model, variant: ModelVariant, checkpoint: str | None):
        """Memory modules from the official file (``model.checkpoint: *.pt``), from a Hugging Face
        folder or hub id saved from ``Sam2VideoModel``, or at random init for random variants
        (then propagation shows only that the path runs: an untrained memory carries nothing)."""
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            if variant.make_config is None:
                raise SamtuneError(f"model.name={variant.name!r}: memory propagation needs its official weights file; set model.checkpoint "
                                   f"({_OFFICIAL_FILES.get(variant.name, 'the .pt file')}).")  # fmt: skip
            return video_model_from(model)
        if Path(source).is_file():
            return video_model_from(model, Path(source))
        return _video_model_hf(model, source)

    @staticmethod
    def _config_of(variant: ModelVariant, image_size: int) -> Sam2Config:
        if variant.make_config is not None:
            return variant.make_config(image_size)
        return sam2_config(image_size, HIERA[variant.official_variant])

    def load_full(self, folder) -> Sam2Model:
        model = _from_pretrained(str(folder))
        single_mask_token_only(model)
        return model

    def encoder_depth(self, model) -> int:
        return sum(_sam2_config(model).vision_config.backbone_config.blocks_per_stage)

    def make_transform(self, image_size: int) -> SquareResizeTransform:
        return SquareResizeTransform(image_size)

    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        # Not Sam2Model.get_image_embeddings: it runs under no_grad, which would cut the gradient to the encoder's LoRA.
        fpn = model.vision_encoder(pixel_values).fpn_hidden_states  # strides 4, 8, 16
        decoder = model.mask_decoder
        image = fpn[2] + model.no_memory_embedding.reshape(1, -1, 1, 1)
        return ImageEmbeddings(image, (decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])))

    def decode_prompts(self, model, embeddings, boxes=None, points=None, point_labels=None, mask_inputs=None, multimask_output=False):
        has_points = points is not None and points.shape[1] > 0
        out = model(
            image_embeddings=[*embeddings.high_res_features, embeddings.image_embeddings],
            input_boxes=boxes[:, None] if boxes is not None else None,  # one prompt per embedding row
            input_points=points[:, None] if has_points else None,
            input_labels=point_labels[:, None] if has_points else None,
            input_masks=mask_inputs,
            multimask_output=multimask_output,
        )
        return out.pred_masks[:, 0], out.iou_scores[:, 0]

    def prompt_dim(self, model) -> int:
        return _sam2_config(model).prompt_encoder_config.hidden_size

    def decode_classes(self, model, embeddings, class_tokens):
        # As SamFamily: the decoder's point-batch axis carries the K classes of each image, the
        # class tokens sit where a box's corner embeddings would; no mask prompt (no_mask_embed).
        image = embeddings.image_embeddings
        batch, _, height, width = image.shape
        sparse = class_tokens.to(image.dtype)[None].expand(batch, -1, -1, -1)  # B×K×T×C
        dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        positions = model.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
        low_res = model.mask_decoder(
            image_embeddings=image, image_positional_embeddings=positions, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, high_resolution_features=list(embeddings.high_res_features),
        )[0]  # fmt: skip
        return low_res[:, :, 0]  # B×K×s×s

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_hf, merge_model

        if fmt not in self.export_formats:
            raise SamtuneError(
                f"--format {fmt!r}: a SAM 2 model exports hf (a transformers Sam2Model folder, LoRA merged). sam-pth is "
                "SAM v1's layout, and an official SAM 2 .pt also holds the video memory modules, which the image model does not have."
            )
        return export_hf(merge_model(model), Path(out))

    def component_of(self, parameter_name: str) -> str:
        if parameter_name.endswith("no_memory_embedding"):  # added to the encoder's output
            return "image_encoder"
        return super().component_of(parameter_name)


def _sam2_config(model) -> Sam2Config:
    config = getattr(model, "config", None)  # a PeftModel forwards .config to the base model
    if not isinstance(config, Sam2Config):
        raise TypeError(f"expected a transformers Sam2Model (or a peft model around one), got {type(model).__name__}")
    return config


@torch.no_grad()
def _init_random(model: Sam2Model) -> None:
    """Initialisation a random SAM 2 can learn from: one Fourier matrix for image and prompts
    (``_same_positional_tables``) and ViT-style position embeddings (std 0.02; transformers and the
    official Hiera start them at zero, which only loaded weights overwrite)."""
    _same_positional_tables(model)
    backbone = model.vision_encoder.backbone
    torch.nn.init.trunc_normal_(backbone.pos_embed, std=0.02)
    torch.nn.init.trunc_normal_(backbone.pos_embed_window, std=0.02)


def _from_pretrained(source: str, config: Sam2Config | None = None) -> Sam2Model:
    """``Sam2Model.from_pretrained`` (a folder or hub repo saved from Sam2Model, or from Sam2VideoModel:
    the memory weights are then not loaded). Class prompts in a samtune folder are loaded by the caller."""
    model = Sam2Model.from_pretrained(source, config=config) if config is not None else Sam2Model.from_pretrained(source)
    return model.eval()


def _load_hf(source: str, name: str, path: Path, image_size: int) -> Sam2Model:
    if path.is_dir() and not (path / "config.json").is_file():
        raise SamtuneError(f"{path}: not a Hugging Face model folder (no config.json).")
    if path.is_absolute() and not path.exists():  # never a hub id
        raise SamtuneError(f"model.checkpoint={source!r}: no such folder; check the path, or set an official .pt file (e.g. sam2.1_hiera_tiny.pt).")
    try:
        config = with_image_size(Sam2Config.from_pretrained(source), image_size)
        model = _from_pretrained(source, config)
    except OSError as exc:  # offline, unknown hub id, or missing weight files
        raise SamtuneError(
            f"could not load SAM 2 weights for model.name={name!r} from {source!r}: {exc}\n"
            "Set model.checkpoint to a local Hugging Face folder (e.g. a `huggingface-cli download "
            f"{source}` copy) or an official .pt file (e.g. sam2.1_hiera_tiny.pt), or run online so the hub id can be downloaded."
        ) from None
    single_mask_token_only(model)
    return model


_OFFICIAL_FILES = {
    "sam2-hiera-tiny": "sam2.1_hiera_tiny.pt",
    "sam2-hiera-small": "sam2.1_hiera_small.pt",
    "sam2-hiera-base-plus": "sam2.1_hiera_base_plus.pt",
    "sam2-hiera-large": "sam2.1_hiera_large.pt",
    "medsam2": "MedSAM2_latest.pt, from the MedSAM2 release (huggingface.co/wanglab/MedSAM2)",
}

register_model(ModelVariant("sam2-hiera-tiny", "sam2", "SAM 2.1 Hiera-T (Ravi et al., 2024)", 1024, "facebook/sam2.1-hiera-tiny", "hiera_tiny"))
register_model(ModelVariant("sam2-hiera-small", "sam2", "SAM 2.1 Hiera-S", 1024, "facebook/sam2.1-hiera-small", "hiera_small"))
register_model(ModelVariant("sam2-hiera-base-plus", "sam2", "SAM 2.1 Hiera-B+", 1024, "facebook/sam2.1-hiera-base-plus", "hiera_base_plus"))
register_model(ModelVariant("sam2-hiera-large", "sam2", "SAM 2.1 Hiera-L", 1024, "facebook/sam2.1-hiera-large", "hiera_large"))
# MedSAM2 runs at 512 px (its sam2.1_hiera_t512.yaml: image_size 512)
register_model(ModelVariant("medsam2", "sam2", "MedSAM2 (Ma et al., 2025): SAM 2.1 Hiera-T fine-tuned on 3D medical images; set model.checkpoint: MedSAM2_latest.pt", 512, None, "hiera_tiny"))
register_model(ModelVariant("sam2-tiny-random", "sam2", "random-init small SAM 2 (Hiera) for tests and offline runs", 128, None, None, make_tiny_sam2_config))
