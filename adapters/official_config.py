"""Infer a `transformers.SamConfig` from the tensor shapes of an official SAM state dict.

Recognises Meta's released variants (ViT-B/L/H) by encoder width and depth and maps them to their
Hugging Face model names. Shape letters: C = encoder width, g = image_size / patch_size (token-grid
side), D = prompt/decoder width (256 in every released checkpoint).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import transformers

from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.official_keys import _PE_KEY

# variant -> (encoder width, depth, heads, global-attention block indexes), as in segment_anything.build_sam
OFFICIAL_VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
HF_MODEL_NAMES = {"vit_b": "sam-vit-base", "vit_l": "sam-vit-large", "vit_h": "sam-vit-huge"}
_DECODER_HEADS = 8  # not recoverable from shapes; every released SAM decoder uses 8


def _block_count(sd: Mapping, prefix: str) -> int:
    """Number of `prefix<N>.` children (N counted from 0)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _encoder_width_depth(sd: Mapping) -> tuple[int, int]:
    """(C, depth): patch-embedding output channels and number of encoder blocks."""
    if "image_encoder.patch_embed.proj.weight" in sd:  # (C, 3, p, p)
        return int(sd["image_encoder.patch_embed.proj.weight"].shape[0]), _block_count(sd, "image_encoder.blocks.")
    raise CheckpointError(
        f"no image-encoder patch embedding ('image_encoder.patch_embed.proj.weight') among {len(sd)} keys "
        f"(first: {list(sd)[:3]}); this is not a SAM checkpoint. Use an official SAM / MedSAM .pth."
    )


def guess_official_variant(sd) -> str:
    """'vit_b' | 'vit_l' | 'vit_h' from encoder width and depth, else 'custom'."""
    width, depth = _encoder_width_depth(sd)
    return next((name for name, (w, d, _, _) in OFFICIAL_VARIANTS.items() if (w, d) == (width, depth)), "custom")


def _require(sd: Mapping, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing key '{key}', needed to infer the architecture. Use a complete SAM checkpoint.")
    return sd[key]


def hf_config_from_official(sd, image_size=None) -> transformers.SamConfig:
    """Infer a `SamConfig` from an official state dict's tensor shapes.

    `image_size` (pixels, multiple of the patch size) overrides the checkpoint's training size; the
    position tables must then be resized with `resize_position_tables`.
    """
    width, depth = _encoder_width_depth(sd)
    variant, enc, dec = guess_official_variant(sd), "image_encoder.", "mask_decoder."
    patch = int(_require(sd, enc + "patch_embed.proj.weight").shape[-1])  # (C, 3, p, p)
    # g from the absolute table (1, g, g, C); without one, from the requested size
    grid = int(sd[enc + "pos_embed"].shape[1]) if enc + "pos_embed" in sd else (image_size or 1024) // patch
    use_rel_pos = enc + "blocks.0.attn.rel_pos_h" in sd
    if use_rel_pos:  # tables are (2g-1, C/heads) in global blocks, (2*window-1, C/heads) in windowed ones
        heads = width // int(sd[enc + "blocks.0.attn.rel_pos_h"].shape[1])
        lengths = [int(_require(sd, f"{enc}blocks.{i}.attn.rel_pos_h").shape[0]) for i in range(depth)]
        global_idx = [i for i, n in enumerate(lengths) if n == 2 * grid - 1]
        window_lengths = {n for n in lengths if n != 2 * grid - 1}
        if len(window_lengths) > 1:
            raise CheckpointError(
                f"windowed blocks have rel-pos tables of several lengths {sorted(window_lengths)}, so no single "
                f"window size fits; this is not a SAM ViT. Use an official SAM / MedSAM checkpoint."
            )
        window = (window_lengths.pop() + 1) // 2 if window_lengths else grid
        if window == grid and variant != "custom":  # both kinds of block compute the same; keep Meta's split
            global_idx = list(OFFICIAL_VARIANTS[variant][3])
    elif variant != "custom":
        heads, global_idx, window = OFFICIAL_VARIANTS[variant][2], list(OFFICIAL_VARIANTS[variant][3]), 14
    else:
        raise CheckpointError(
            "custom-size encoder without rel-pos tables: heads and global blocks cannot be inferred from "
            "shapes. Build the SamConfig by hand for this checkpoint."
        )
    size = int(image_size) if image_size else grid * patch
    if size % patch:
        raise CheckpointError(f"image_size {size} is not a multiple of the patch size {patch}; use a multiple.")
    width_keys = {enc + "neck.0.weight": 0, "prompt_encoder.no_mask_embed.weight": 1, dec + "iou_token.weight": 1}
    widths = [int(_require(sd, key).shape[axis]) for key, axis in width_keys.items()]
    if len(set(widths)) > 1:
        raise CheckpointError(
            f"neck, prompt-encoder and mask-decoder widths differ ({widths}): the file mixes parts of "
            f"different models. Use a consistent SAM checkpoint."
        )
    dim = widths[0]  # D
    vision = dict(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, image_size=size, patch_size=patch,
        num_channels=int(sd[enc + "patch_embed.proj.weight"].shape[1]), output_channels=dim,
        mlp_dim=int(_require(sd, enc + "blocks.0.mlp.lin1.weight").shape[0]),
        qkv_bias=enc + "blocks.0.attn.qkv.bias" in sd, use_abs_pos=enc + "pos_embed" in sd,
        use_rel_pos=use_rel_pos, window_size=window, global_attn_indexes=global_idx,
        num_pos_feats=int(_require(sd, _PE_KEY).shape[1]), layer_norm_eps=1e-6,
    )
    prompt = dict(
        hidden_size=dim, image_size=size, patch_size=patch, layer_norm_eps=1e-6,
        mask_input_channels=int(_require(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0]),
        num_point_embeddings=_block_count(sd, "prompt_encoder.point_embeddings."),
    )
    inner = int(_require(sd, dec + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight").shape[0])
    decoder = dict(
        hidden_size=dim, num_hidden_layers=_block_count(sd, dec + "transformer.layers."),
        num_attention_heads=_DECODER_HEADS, attention_downsample_rate=dim // inner,
        mlp_dim=int(_require(sd, dec + "transformer.layers.0.mlp.lin1.weight").shape[0]),
        num_multimask_outputs=int(_require(sd, dec + "mask_tokens.weight").shape[0]) - 1,
        iou_head_depth=_block_count(sd, dec + "iou_prediction_head.layers."),
        iou_head_hidden_dim=int(_require(sd, dec + "iou_prediction_head.layers.0.weight").shape[0]),
        layer_norm_eps=1e-5,  # the official two-way transformer uses torch's default LayerNorm eps, not 1e-6
    )
    return transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
