"""Official SAM 2 / MedSAM2 checkpoints (``{"model": state_dict}`` of the sam2 package's ``SAM2Base``)
converted in memory to transformers' keys, for the image model and (``video=True``) the video model;
see adapters/sam2.py."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import Sam2Config, Sam2Model

from samtune.adapters.checkpoint_files import CheckpointError, load_exactly, load_state_dict_file
from samtune.adapters.sam2_config import HIERA, layout_of, single_mask_token_only

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
            for name in _POSITIONAL:  # one matrix, two buffers in transformers (two tensors: see same_positional_tables)
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
    layout = layout_of(config)
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
    load_exactly(model, hf_sd, source, f"the SAM 2 image model of model.name={variant_name!r} (transformers key names)",
                 "Use an unmodified official SAM 2 / MedSAM2 checkpoint.", unknown=unknown)  # fmt: skip
    single_mask_token_only(model)
    return model.eval()


_HF_VIDEO_PREFIXES = tuple(hf for _, hf in _VIDEO_PREFIXES)


def is_video_only_hf(key: str) -> bool:
    """A Sam2VideoModel key that Sam2Model does not have (memory modules, object pointers)."""
    return key.startswith(_HF_VIDEO_PREFIXES)
