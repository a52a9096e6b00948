"""SAM 3's architecture as one ``torch.nn.Module`` for samtune (see adapters/sam3.py for the family):
one vision encoder shared by the concept detector and the SAM 2-style tracker, as in the release.

transformers ships the parts in three classes: ``Sam3Model`` (detector: vision encoder with its
own neck, CLIP text encoder, DETR encoder/decoder, presence token, mask head), ``Sam3TrackerModel``
(prompt encoder + mask decoder, with its own copy of the vision encoder) and ``Sam3VideoModel``
(both, sharing the ViT: the tracker reads it through a second neck, ``tracker_neck``). The
released ``facebook/sam3`` folder is a ``Sam3VideoModel`` (transformers' conversion_mapping.py
loads ``Sam3TrackerModel`` from it by renaming ``detector_model.vision_encoder.backbone`` and
``tracker_neck``). ``Sam3Segmenter`` holds each weight once, under top-level names the family
seam asks for:

    vision_encoder.backbone      the ViT (detector_model.vision_encoder.backbone)
    vision_encoder.neck          the detector's neck (detector_model.vision_encoder.neck)
    vision_encoder.tracker_neck  the tracker's neck (tracker_neck)
    text_encoder                 CLIP text encoder (detector_model.text_encoder), frozen
    detector.*                   text_projection, geometry_encoder, detr_encoder, detr_decoder,
                                 mask_head (= mask_decoder), dot_product_scoring (detector_model.*), and
                                 samtune's class_projection (no released weight, see below)
    prompt_encoder, shared_image_embedding, mask_decoder, no_memory_embedding  (tracker_model.*)

``released_key`` / ``samtune_key`` map between the two layouts; the tracker's memory modules
(``tracker_model.memory_*`` ...) belong to the video tracker (adapters/sam3_video.py).

Both necks have four levels (strides 14/4, 14/2, 14 and 28 px); like transformers' Sam3Model and
Sam3VideoModel, samtune runs the first three only (the 28 px level is never read).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, PreTrainedModel, Sam3VideoConfig
from transformers.models.sam3.modeling_sam3 import (
    Sam3DetrDecoder,
    Sam3DetrEncoder,
    Sam3DotProductScoring,
    Sam3GeometryEncoder,
    Sam3MaskDecoder,
    Sam3ViTEmbeddings,
    Sam3ViTLayer,
    Sam3ViTModel,
    Sam3VisionNeck,
)
from transformers.models.sam3_tracker.modeling_sam3_tracker import (
    Sam3TrackerMaskDecoder,
    Sam3TrackerPositionalEmbedding,
    Sam3TrackerPromptEncoder,
)

NECK_LEVELS = 3  # of the four: strides 14/4, 14/2, 14 px (the 28 px level is never read)


class Sam3VisionTrunk(nn.Module):
    """The ViT and its two necks: B×3×S×S -> (detector maps, their sine position encodings,
    tracker maps), three levels each, B×D×4g×4g, B×D×2g×2g, B×D×g×g with g = S/14."""

    def __init__(self, vision_config):
        super().__init__()
        self.patch_size = vision_config.backbone_config.patch_size
        self.backbone = Sam3ViTModel(vision_config.backbone_config)
        self.neck = Sam3VisionNeck(vision_config)
        self.tracker_neck = Sam3VisionNeck(vision_config)

    def forward(self, pixel_values: torch.Tensor):
        hidden = self.backbone(pixel_values).last_hidden_state  # B×g²×W
        b, g = hidden.shape[0], pixel_values.shape[-1] // self.patch_size
        spatial = hidden.view(b, g, g, -1).permute(0, 3, 1, 2)
        detector = [layer(spatial) for layer in self.neck.fpn_layers[:NECK_LEVELS]]
        positions = [self.neck.position_encoding(f.shape, f.device, f.dtype) for f in detector]
        tracker = [layer(spatial) for layer in self.tracker_neck.fpn_layers[:NECK_LEVELS]]
        return detector, positions, tracker


class Sam3Detector(nn.Module):
    """SAM 3's concept detector without its encoders (child names as in ``Sam3Model``, except
    ``mask_head`` for its ``mask_decoder``: peft picks ``modules_to_save`` by the last name, and the
    tracker's ``mask_decoder`` trains on its own): a concept
    prompt (B×T×C tokens, the text encoder's projected features or samtune's class prompts) on the
    detector neck's maps -> per-query scores B×Q, presence logits B×1, query masks B×Q×4g×4g.

    The same computation as ``Sam3Model.forward`` with ``text_embeds`` and no box exemplar
    (tests/unit/adapters/test_sam3.py compares them); written out because ``Sam3Model`` cannot be
    built without its own vision and text encoders. ``class_projection`` (C -> the tracker's width,
    identity at init when both are equal) is samtune's: it carries a class prompt into the tracker's
    sparse prompt for corrections (adapters/sam3.py)."""

    def __init__(self, config, tracker_width: int):
        super().__init__()
        for sub in (config.geometry_encoder_config, config.detr_encoder_config, config.detr_decoder_config, config.mask_decoder_config):
            sub._attn_implementation = config._attn_implementation
        width = config.detr_encoder_config.hidden_size
        self.text_projection = nn.Linear(config.text_config.hidden_size, width)
        self.geometry_encoder = Sam3GeometryEncoder(config.geometry_encoder_config)  # box exemplars: loaded, unused by samtune
        self.detr_encoder = Sam3DetrEncoder(config.detr_encoder_config)
        self.detr_decoder = Sam3DetrDecoder(config.detr_decoder_config)
        self.mask_head = Sam3MaskDecoder(config.mask_decoder_config)  # Sam3Model's mask_decoder (renamed: below)
        self.dot_product_scoring = Sam3DotProductScoring(config)
        self.class_projection = nn.Linear(width, tracker_width)

    def forward(self, features: list[torch.Tensor], positions: list[torch.Tensor], prompt: torch.Tensor, prompt_mask: torch.Tensor | None = None):
        encoded = self.detr_encoder(vision_features=[features[-1]], text_features=prompt, vision_pos_embeds=[positions[-1]], text_mask=prompt_mask)
        decoded = self.detr_decoder(
            vision_features=encoded.last_hidden_state, text_features=encoded.text_features, vision_pos_encoding=encoded.pos_embeds_flattened,
            text_mask=prompt_mask, spatial_shapes=encoded.spatial_shapes,
        )  # fmt: skip
        scores = self.dot_product_scoring(decoder_hidden_states=decoded.intermediate_hidden_states, text_features=encoded.text_features,
                                          text_mask=prompt_mask)[-1, ..., 0]  # fmt: skip
        masks = self.mask_head(decoder_queries=decoded.intermediate_hidden_states[-1], backbone_features=list(features),
                                  encoder_hidden_states=encoded.last_hidden_state, prompt_features=prompt, prompt_mask=prompt_mask).pred_masks  # fmt: skip
        return scores, decoded.presence_logits[-1], masks  # B×Q, B×1, B×Q×4g×4g


class Sam3Segmenter(PreTrainedModel):
    """SAM 3 image model: shared vision encoder, concept detector, tracker prompt encoder and mask
    decoder, text encoder (module docstring). ``config`` is a ``Sam3VideoConfig`` (detector and
    tracker configs), as the released folder's."""

    config_class = Sam3VideoConfig
    base_model_prefix = "sam3_segmenter"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: Sam3VideoConfig):
        super().__init__(config)
        detector, tracker = config.detector_config, config.tracker_config
        tracker.mask_decoder_config._attn_implementation = config._attn_implementation
        detector._attn_implementation = config._attn_implementation
        self.vision_encoder = Sam3VisionTrunk(detector.vision_config)
        self.text_encoder = CLIPTextModelWithProjection(detector.text_config)
        self.detector = Sam3Detector(detector, tracker.prompt_encoder_config.hidden_size)
        self.shared_image_embedding = Sam3TrackerPositionalEmbedding(tracker.prompt_encoder_config)
        self.prompt_encoder = Sam3TrackerPromptEncoder(tracker.prompt_encoder_config)
        self.mask_decoder = Sam3TrackerMaskDecoder(tracker.mask_decoder_config)
        self.no_memory_embedding = nn.Parameter(torch.zeros(1, 1, detector.vision_config.fpn_hidden_size))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Sam3ViTEmbeddings):  # as Sam3PreTrainedModel._init_weights
            module.position_embeddings.normal_(std=self.config.initializer_range)
        elif isinstance(module, Sam3ViTLayer):
            module.position_ids.copy_(module.precompute_positions(module.config, module.window_size))
        elif isinstance(module, Sam3TrackerPositionalEmbedding):
            module.positional_embedding.normal_(std=module.scale)
        elif isinstance(module, Sam3Detector):
            identity_projection(module.class_projection)
        elif module is self:
            self.no_memory_embedding.zero_()

    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """1×C×g×g Fourier features of the grid cells' centres (``Sam3TrackerModel``'s)."""
        size = self.prompt_encoder.image_embedding_size
        table = self.shared_image_embedding.positional_embedding
        grid = torch.ones(size, device=table.device, dtype=table.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / size[0]
        x = (grid.cumsum(dim=1) - 0.5) / size[1]
        return self.shared_image_embedding(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def forward(self, pixel_values: torch.Tensor):
        """The three feature lists of ``Sam3VisionTrunk`` (decoding is the family's: adapters/sam3.py)."""
        return self.vision_encoder(pixel_values)


@torch.no_grad()
def identity_projection(linear: nn.Linear) -> None:
    """Identity (zero bias) where input and output widths agree; else PyTorch's default init."""
    if linear.in_features == linear.out_features:
        linear.weight.copy_(torch.eye(linear.in_features, dtype=linear.weight.dtype))
        linear.bias.zero_()


# --- the released key layout ---------------------------------------------------------------------

# samtune prefix -> released (Sam3VideoModel) prefix, first match wins
_LAYOUT = (
    ("vision_encoder.backbone.", "detector_model.vision_encoder.backbone."),
    ("vision_encoder.neck.", "detector_model.vision_encoder.neck."),
    ("vision_encoder.tracker_neck.", "tracker_neck."),
    ("text_encoder.", "detector_model.text_encoder."),
    ("detector.mask_head.", "detector_model.mask_decoder."),
    ("detector.", "detector_model."),
    ("prompt_encoder.", "tracker_model.prompt_encoder."),
    ("mask_decoder.", "tracker_model.mask_decoder."),
    ("shared_image_embedding.", "tracker_model.shared_image_embedding."),
    ("no_memory_embedding", "tracker_model.no_memory_embedding"),
)
SAMTUNE_ONLY = ("detector.class_projection.",)  # no released weight: initialised by samtune


def released_key(key: str) -> str | None:
    """A ``Sam3Segmenter`` key in the released layout (None: samtune's own)."""
    if key.startswith(SAMTUNE_ONLY):
        return None
    return next(rel + key[len(own) :] for own, rel in _LAYOUT if key.startswith(own))


def samtune_key(key: str) -> str | None:
    """A released key in ``Sam3Segmenter``'s layout (None: the video model's memory modules)."""
    return next((own + key[len(rel) :] for own, rel in _LAYOUT if key.startswith(rel)), None)
