"""SAM 2's architecture as data: the Hiera encoder layouts of the released models, the transformers
``Sam2Config`` built from them at any input size, and the init details samtune needs (see
adapters/sam2.py for the family)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2Model, Sam2PromptEncoderConfig, Sam2VisionConfig
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder

from samtune.errors import SamtuneError

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


def layout_of(config: Sam2Config) -> HieraLayout:
    b = config.vision_config.backbone_config
    return HieraLayout(
        tuple(b.embed_dim_per_stage), tuple(b.num_attention_heads_per_stage), tuple(b.blocks_per_stage),
        tuple(b.global_attention_blocks), tuple(b.window_size_per_stage), tuple(b.window_positional_embedding_background_size),
    )  # fmt: skip


def with_image_size(config: Sam2Config, image_size: int) -> Sam2Config:
    """The same architecture at another input size. No weight depends on it: Hiera interpolates its
    position embedding to the grid, and the prompt encoder's Fourier features take coordinates
    normalised by the image size."""
    check_image_size(image_size, layout_of(config))
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
def same_positional_tables(model: Sam2Model) -> None:
    """The image-wide positional encoding and the prompt encoder's point encoding must use one
    Fourier matrix (the official model has one, ``pe_layer``); transformers keeps two buffers and
    draws them independently at random init, which would put prompts and image on unrelated
    coordinates. Copied, not shared: safetensors refuses to save two names for one tensor."""
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
