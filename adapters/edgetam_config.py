"""EdgeTAM's architecture as data: transformers' ``EdgeTamConfig`` / ``EdgeTamVideoConfig`` built at any
input size, and the RepViT encoder (adapters/repvit.py) answering where transformers puts its
``TimmWrapperModel`` (see adapters/edgetam.py for the family).

The encoder without timm. ``EdgeTamVisionModel`` builds ``AutoModel.from_config(backbone_config)``;
a ``TimmWrapperConfig`` there would build ``TimmWrapperModel``, which needs timm (and so torchvision).
samtune's backbone config is a subclass of it (``RepViTTimmConfig``: same fields, same
``model_type: timm_wrapper`` in config.json) registered with ``AutoModel`` to samtune's
``RepViTBackbone``, which holds the RepViT as ``timm_model`` and returns what ``TimmWrapperModel``
returns with ``features_only`` (``last_hidden_state`` = the four stage maps). Everything else of the
model is transformers' own, unchanged; its state dict and config.json are those of transformers'
EdgeTAM, so a samtune folder loads in transformers where timm is installed, and transformers'
folders load here (``config_from_dict`` swaps the backbone config).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AutoModel,
    EdgeTamConfig,
    EdgeTamMaskDecoderConfig,
    EdgeTamPromptEncoderConfig,
    EdgeTamVisionConfig,
    PreTrainedModel,
    TimmWrapperConfig,
)
from transformers.models.edgetam.modeling_edgetam import EdgeTamMaskDecoder
from transformers.models.timm_wrapper.modeling_timm_wrapper import TimmWrapperModelOutput

from samtune.adapters.repvit import REPVIT_M1, RepViTFeatures, RepViTLayout
from samtune.adapters.sam2_config import DECODER, EMBEDDING_STRIDE, PATCH_STRIDE
from samtune.errors import SamtuneError

# --- the encoder behind transformers' EdgeTamVisionModel ----------------------------------------

# timm's named RepViT layouts that samtune builds (EdgeTAM ships repvit_m1; timm/models/repvit.py)
REPVIT_ARCHITECTURES = {"repvit_m1": REPVIT_M1}
# timm.create_model arguments transformers' EdgeTAM config passes (convert_edgetam_to_hf.get_config)
FEATURE_ARGS = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}


class RepViTTimmConfig(TimmWrapperConfig):
    """A ``TimmWrapperConfig`` that samtune builds without timm (registered below)."""

    @classmethod
    def of(cls, layout: RepViTLayout) -> "RepViTTimmConfig":
        """repvit_m1 as timm names it; another layout as repvit_m1 with timm's ``embed_dim``/``depth``
        overrides (``timm.create_model("repvit_m1", embed_dim=..., depth=...)`` builds the same)."""
        args = dict(FEATURE_ARGS)
        if layout != REPVIT_M1:
            args.update(embed_dim=list(layout.embed_dims), depth=list(layout.depths))
        return cls(architecture="repvit_m1", model_args=args)


def repvit_layout(backbone: TimmWrapperConfig | dict) -> RepViTLayout:
    """The RepViT a (dict of a) ``TimmWrapperConfig`` describes; an error for anything else."""
    values = backbone if isinstance(backbone, dict) else backbone.to_dict()
    name, args = str(values.get("architecture")).split(".")[0], dict(values.get("model_args") or {})  # "repvit_m1.dist_in1k": timm's pretrained tag
    if name not in REPVIT_ARCHITECTURES:
        raise SamtuneError(f"EdgeTAM backbone {name!r}: samtune builds {', '.join(REPVIT_ARCHITECTURES)} (EdgeTAM's encoder) only.")
    if not args.get("features_only") or list(args.get("out_indices", [])) != FEATURE_ARGS["out_indices"] or args.get("in_chans", 3) != 3:
        raise SamtuneError(f"EdgeTAM backbone model_args {args}: expected the four stage maps of a 3-channel RepViT ({FEATURE_ARGS}).")
    unknown = set(args) - {*FEATURE_ARGS, "embed_dim", "depth"}
    if unknown:
        raise SamtuneError(f"EdgeTAM backbone model_args {sorted(unknown)}: not a RepViT option samtune builds (embed_dim, depth).")
    base = REPVIT_ARCHITECTURES[name]
    return RepViTLayout(args.get("embed_dim", base.embed_dims), args.get("depth", base.depths))


class RepViTBackbone(PreTrainedModel):
    """``TimmWrapperModel``'s place and answer (``timm_model``; ``last_hidden_state`` = the four maps)."""

    config_class = RepViTTimmConfig
    config: RepViTTimmConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: RepViTTimmConfig):
        super().__init__(config)
        self.timm_model = RepViTFeatures(repvit_layout(config))
        self.post_init()

    def _init_weights(self, module):
        """RepViT initialises itself (timm's init: torch's defaults, BatchNorm as ConvNorm sets it)."""

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> TimmWrapperModelOutput:  # kwargs: output flags, unused (as timm's)
        return TimmWrapperModelOutput(last_hidden_state=self.timm_model(pixel_values))


AutoModel.register(RepViTTimmConfig, RepViTBackbone)


def layout_of(config: EdgeTamConfig) -> RepViTLayout:
    return repvit_layout(config.vision_config.backbone_config)


# --- the image model ------------------------------------------------------------------------------


def check_image_size(image_size: int, layout: RepViTLayout) -> None:
    """Every stage halves the grid and the FPN adds the last map, upsampled ×2, to the one before."""
    if image_size % layout.stride or image_size < 2 * layout.stride:
        raise SamtuneError(f"model.image_size={image_size}: an EdgeTAM (RepViT) model needs a multiple of {layout.stride}, at least {2 * layout.stride}.")


def _feature_sizes(image_size: int) -> list[list[int]]:
    """The three FPN levels the decoder reads: strides 4, 8, 16."""
    return [[image_size // s] * 2 for s in (PATCH_STRIDE, 2 * PATCH_STRIDE, EMBEDDING_STRIDE)]


def edgetam_config(image_size: int, layout: RepViTLayout = REPVIT_M1, width: int = 256, **decoder) -> EdgeTamConfig:
    """An EdgeTamConfig for ``layout`` at ``image_size`` px: the released neck (FPN of width 256 over
    the four stages, top-down into levels 2 and 3, levels 0-2 read; edgetam.yaml) and SAM 2's prompt
    encoder and decoder, whose fields ``decoder`` may override."""
    check_image_size(image_size, layout)
    vision = EdgeTamVisionConfig(
        backbone_config=RepViTTimmConfig.of(layout), backbone_channel_list=list(layout.embed_dims[::-1]),
        backbone_feature_sizes=_feature_sizes(image_size), fpn_hidden_size=width, fpn_top_down_levels=[2, 3], num_feature_levels=3,
    )  # fmt: skip
    prompt = EdgeTamPromptEncoderConfig(hidden_size=width, image_size=image_size, patch_size=EMBEDDING_STRIDE, mask_input_channels=16)
    mask_decoder = EdgeTamMaskDecoderConfig(hidden_size=width, **{**DECODER, **decoder})
    return untied(EdgeTamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=mask_decoder))


def untied(config: EdgeTamConfig) -> EdgeTamConfig:
    """Say that no weight is tied to the input embeddings (true of EdgeTAM). peft asks the model for
    them before wrapping it unless the config says so, and transformers' EdgeTamModel has no
    ``get_input_embeddings`` (Sam2Model answers with Hiera's patch embedding)."""
    config.tie_word_embeddings = False
    return config


# A RepViT of 0.1 M parameters for tests and offline runs: four stages, SE on alternate blocks, a stage
# of two blocks (with and without SE); with a 128-wide neck (the narrowest the video model accepts).
REPVIT_TEST = RepViTLayout((16, 32, 48, 64), (1, 1, 2, 1))


def make_tiny_edgetam_config(image_size: int = 128) -> EdgeTamConfig:
    """``edgetam-tiny-random``: REPVIT_TEST, a 128-wide neck, the released decoder's layout (as
    ``sam2-tiny-random``)."""
    return edgetam_config(image_size, REPVIT_TEST, width=128)


def with_image_size(config: EdgeTamConfig, image_size: int) -> EdgeTamConfig:
    """The same architecture at another input size (RepViT and the FPN have no position table)."""
    check_image_size(image_size, layout_of(config))
    config.vision_config.backbone_feature_sizes = _feature_sizes(image_size)
    config.prompt_encoder_config.image_size = image_size
    return config


def config_from_dict(values: dict) -> EdgeTamConfig:
    """The image model's config from a config.json of transformers' ``EdgeTamModel`` or
    ``EdgeTamVideoModel`` (whose image modules are the same), with samtune's backbone config."""
    vision = dict(values.get("vision_config") or {})
    if values.get("model_type") not in ("edgetam", "edgetam_video") or "backbone_config" not in vision:
        raise SamtuneError(f"config.json has model_type {values.get('model_type')!r}: not an EdgeTAM model (edgetam or edgetam_video).")
    backbone = RepViTTimmConfig.of(repvit_layout(vision.pop("backbone_config")))
    vision = EdgeTamVisionConfig.from_dict({k: v for k, v in vision.items() if k in EdgeTamVisionConfig.__dataclass_fields__})
    vision.backbone_config = backbone
    return untied(EdgeTamConfig(
        vision_config=vision, prompt_encoder_config=EdgeTamPromptEncoderConfig.from_dict(values["prompt_encoder_config"]),
        mask_decoder_config=EdgeTamMaskDecoderConfig.from_dict(values["mask_decoder_config"]),
    ))  # fmt: skip


def single_mask_token_only(model) -> None:
    """As SAM 2's (adapters/sam2_config.py): decode the single-mask token whenever one mask is asked
    for; the config keeps the official setting."""
    for module in model.modules():
        if isinstance(module, EdgeTamMaskDecoder):
            module.dynamic_multimask_via_stability = False


# --- the video model ------------------------------------------------------------------------------

# transformers' memory attention reads 64-wide memories (EdgeTamVideoMemoryAttentionLayer: kv_in_dim=64),
# and the spatial perceiver works at that width (edgetam.yaml: spatial_perceiver dim 64)
VIDEO_MEMORY_WIDTH = 64
# The memory modules EdgeTAM releases (edgetam.yaml; transformers' convert_edgetam_video_to_hf.get_config)
RELEASED_MEMORY = dict(enable_occlusion_spatial_embedding=False, enable_temporal_pos_encoding_for_object_pointers=False)
# smaller memory modules for random tiny models: one memory-attention and one perceiver layer, 16 + 16 latents
TINY_MEMORY = dict(
    RELEASED_MEMORY, memory_attention_num_layers=1, memory_attention_mlp_hidden_size=256, perceiver_resampler_num_layers=1,
    perceiver_resampler_num_latents=16, perceiver_resampler_num_latents_2d=16, perceiver_resampler_mlp_intermediate_size=128,
)  # fmt: skip


def edgetam_video_config(config: EdgeTamConfig, **memory):
    """An ``EdgeTamVideoConfig`` around an image model's config: the same encoder, prompt encoder and
    decoder; memory modules as wide as the neck, the memory attention's rotary grid = the embedding
    grid, the perceiver's 2D latents one per window of the grid; ``memory`` overrides fields
    (default: the released ones)."""
    from transformers import EdgeTamVideoConfig

    width, image_size = config.vision_config.fpn_hidden_size, config.prompt_encoder_config.image_size
    if width % VIDEO_MEMORY_WIDTH or width <= VIDEO_MEMORY_WIDTH:
        raise SamtuneError(f"an EdgeTAM video model needs a neck width that is a multiple of {VIDEO_MEMORY_WIDTH} above it (this model: {width}).")
    fields = dict(RELEASED_MEMORY, memory_attention_hidden_size=width, memory_encoder_hidden_size=width, mask_downsampler_embed_dim=width,
                  memory_fuser_embed_dim=width, memory_fuser_intermediate_dim=4 * width, memory_encoder_output_channels=VIDEO_MEMORY_WIDTH,
                  perceiver_resampler_hidden_size=VIDEO_MEMORY_WIDTH)  # fmt: skip
    fields.update(memory)
    grid, windows = image_size // EMBEDDING_STRIDE, math.isqrt(fields.get("perceiver_resampler_num_latents_2d", 256))
    if grid % windows:
        raise SamtuneError(f"model.image_size={image_size}: EdgeTAM's spatial perceiver splits the {grid}×{grid} embedding grid into "
                           f"{windows}×{windows} windows; use a multiple of {EMBEDDING_STRIDE * windows} px for memory propagation, or eval.propagation=box.")  # fmt: skip
    fields.update(memory_attention_rope_feat_sizes=[grid, grid], memory_attention_rope_k_sizes=[windows, windows])
    vision = EdgeTamVisionConfig.from_dict(config.vision_config.to_dict())
    vision.backbone_config = RepViTTimmConfig.of(layout_of(config))
    return EdgeTamVideoConfig(
        vision_config=vision, prompt_encoder_config=config.prompt_encoder_config.to_dict(),
        mask_decoder_config=config.mask_decoder_config.to_dict(), image_size=image_size, **fields,
    )  # fmt: skip
