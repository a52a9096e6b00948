"""Meta's own SAM 3 checkpoint (``sam3.pt``: ``{"model": state_dict}`` of the sam3 package) converted
in memory to the layout of transformers' ``Sam3VideoModel`` (what ``facebook/sam3`` holds and
adapters/sam3.py reads; tests/unit/adapters/data/sam3_released_shapes.json lists it).

The facts (which official name becomes which released name, which tensors are split, cut or
transposed) are those of transformers' conversion script,
``src/transformers/models/sam3_video/convert_sam3_video_to_hf.py`` in transformers' source
repository. That script is not part of the installed wheel, so samtune carries its own mapping:

- ``sam3_model.*`` is the detector (``detector_model.*``): the ViT, two FPN necks (``convs`` for the
  detector, ``sam2_convs`` for the tracker, which becomes the top-level ``tracker_neck``), the CLIP
  text encoder, the geometry encoder, the DETR encoder and decoder, dot-product scoring and the
  segmentation head, renamed component by component (``_DETECTOR``);
- ``sam2_predictor.model.*`` is the SAM 2-style tracker (``tracker_model.*``): after SAM 3's two
  own names (``transformer.encoder`` = memory attention, ``maskmem_backbone`` = memory encoder) its
  names are SAM 2's, converted by adapters/sam2_checkpoints.py ``official_to_hf``;
- then fused attention projections are split in three along the output dimension (the ViT's
  ``attn.qkv``, ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias``), the ViT's
  position table loses its first (class-token) row, and CLIP's text projection, stored as
  in×out, is transposed to ``nn.Linear``'s out×in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.sam2_checkpoints import official_to_hf

DETECTOR_PREFIX = "sam3_model."
TRACKER_PREFIX = "sam2_predictor.model."
POSITION_TABLE = "detector_model.vision_encoder.backbone.embeddings.position_embeddings"  # 1×(1+g²)×W official
TEXT_PROJECTION = "detector_model.text_encoder.text_projection.weight"  # W_text×W_out official (x @ P)

# Official buffers that the released model computes itself: the ViT's rotary tables (transformers'
# Sam3ViTRotaryEmbedding builds them at init; the conversion script lists them as expected leftovers).
NOT_CARRIED = re.compile(r"^sam3_model\.backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis$")


def _attention(official: str, released: str) -> tuple:
    """An attention module renamed, its ``out_proj`` becoming ``o_proj`` (q/k/v split later)."""
    return ((rf"{official}\.out_proj\.", rf"{released}.o_proj."), (rf"{official}\.", rf"{released}."))


def _mlp(official: str, released: str) -> tuple:
    """The official MLP's ``layers.i`` -> transformers' ``layer{i+1}``."""
    return (rf"{official}\.layers\.(\d+)\.", lambda m: f"{released}.layer{int(m[1]) + 1}."),


_NECK = (
    (r"(\d+)\.dconv_2x2(?:_0)?\.", r"\1.scale_layers.0."),  # first transposed convolution (×4 and ×2 levels)
    (r"(\d+)\.dconv_2x2_1\.", r"\1.scale_layers.2."),  # second one of the ×4 level (index 1 is the GELU)
    (r"(\d+)\.maxpool_2x2\.", r"\1.scale_layers.0."),
    (r"(\d+)\.conv_1x1\.", r"\1.proj1."),
    (r"(\d+)\.conv_3x3\.", r"\1.proj2."),
)
# (official prefix under sam3_model., released prefix, renames of the rest: first match wins, none = kept)
_DETECTOR = (
    ("backbone.vision_backbone.trunk.", "detector_model.vision_encoder.backbone.", (
        (r"pos_embed$", "embeddings.position_embeddings"),
        (r"patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"ln_pre\.", "layer_norm."),
        (r"blocks\.(\d+)\.norm(1|2)\.", r"layers.\1.layer_norm\2."),
        (r"blocks\.(\d+)\.attn\.qkv\.", r"layers.\1.attention.qkv."),
        (r"blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.o_proj."),
        (r"blocks\.(\d+)\.mlp\.fc(1|2)\.", r"layers.\1.mlp.fc\2."),
    )),
    ("backbone.vision_backbone.convs.", "detector_model.vision_encoder.neck.fpn_layers.", _NECK),
    ("backbone.vision_backbone.neck.fpn.", "detector_model.vision_encoder.neck.fpn_layers.", ()),
    ("backbone.vision_backbone.sam2_convs.", "tracker_neck.fpn_layers.", _NECK),
    ("backbone.language_backbone.encoder.", "detector_model.text_encoder.", (
        (r"token_embedding\.", "text_model.embeddings.token_embedding."),
        (r"positional_embedding$", "text_model.embeddings.position_embedding.weight"),
        (r"ln_final\.", "text_model.final_layer_norm."),
        (r"text_projection$", "text_projection.weight"),
        (r"transformer\.resblocks\.(\d+)\.attn\.", r"text_model.encoder.layers.\1.self_attn."),  # CLIP keeps out_proj
        (r"transformer\.resblocks\.(\d+)\.ln_(1|2)\.", r"text_model.encoder.layers.\1.layer_norm\2."),
        (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1."),
        (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    )),
    ("backbone.language_backbone.resizer.", "detector_model.text_projection.", ()),
    ("geometry_encoder.", "detector_model.geometry_encoder.", (
        *_attention(r"encode\.(\d+)\.cross_attn_image", r"layers.\1.cross_attn"),
        *_attention(r"encode\.(\d+)\.self_attn", r"layers.\1.self_attn"),
        (r"encode\.(\d+)\.linear(1|2)\.", r"layers.\1.mlp.fc\2."),
        (r"encode\.(\d+)\.norm(1|2|3)\.", r"layers.\1.layer_norm\2."),
        (r"img_pre_norm\.", "vision_layer_norm."),
        (r"norm\.", "prompt_layer_norm."),
        (r"encode_norm\.", "output_layer_norm."),
    )),
    ("transformer.encoder.layers.", "detector_model.detr_encoder.layers.", (
        *_attention(r"(\d+)\.cross_attn_image", r"\1.cross_attn"),
        *_attention(r"(\d+)\.self_attn", r"\1.self_attn"),
        *_attention(r"(\d+)\.cross_attn", r"\1.cross_attn"),
        (r"(\d+)\.linear(1|2)\.", r"\1.mlp.fc\2."),
        (r"(\d+)\.norm(1|2|3)\.", r"\1.layer_norm\2."),
    )),
    ("transformer.decoder.", "detector_model.detr_decoder.", (
        *_mlp("presence_token_head", "presence_head"),
        (r"presence_token_out_norm\.", "presence_layer_norm."),
        (r"norm\.", "output_layer_norm."),
        *_mlp("bbox_embed", "box_head"),
        *_mlp("instance_bbox_embed", "instance_box_head"),
        *_mlp("ref_point_head", "ref_point_head"),
        *_mlp("boxRPB_embed_x", "box_rpb_embed_x"),
        *_mlp("boxRPB_embed_y", "box_rpb_embed_y"),
        *_attention(r"layers\.(\d+)\.self_attn", r"layers.\1.self_attn"),
        *_attention(r"layers\.(\d+)\.ca_text", r"layers.\1.text_cross_attn"),
        *_attention(r"layers\.(\d+)\.cross_attn", r"layers.\1.vision_cross_attn"),
        (r"layers\.(\d+)\.linear(1|2)\.", r"layers.\1.mlp.fc\2."),
        (r"layers\.(\d+)\.norm1\.", r"layers.\1.vision_cross_attn_layer_norm."),
        (r"layers\.(\d+)\.catext_norm\.", r"layers.\1.text_cross_attn_layer_norm."),
        (r"layers\.(\d+)\.norm2\.", r"layers.\1.self_attn_layer_norm."),
        (r"layers\.(\d+)\.norm3\.", r"layers.\1.mlp_layer_norm."),
    )),
    ("dot_prod_scoring.", "detector_model.dot_product_scoring.", (
        *_mlp("prompt_mlp", "text_mlp"),
        (r"prompt_mlp\.out_norm\.", "text_mlp_out_norm."),
        (r"prompt_proj\.", "text_proj."),
        (r"hs_proj\.", "query_proj."),
    )),
    ("segmentation_head.", "detector_model.mask_decoder.", (
        (r"(?:mask_predictor\.)?mask_embed\.", "mask_embedder."),
        (r"instance_seg_head\.", "instance_projection."),
        (r"semantic_seg_head\.", "semantic_projection."),
        *_attention(r"cross_attend_prompt", "prompt_cross_attn"),
        (r"cross_attn_norm\.", "prompt_cross_attn_norm."),
    )),
)  # fmt: skip
_COMPILED = tuple((old, new, tuple((re.compile("^" + p), r) for p, r in rules)) for old, new, rules in _DETECTOR)

# SAM 3's tracker names where SAM 2's differ; the rest is SAM 2's layout (official_to_hf)
_TRACKER_RENAMES = (
    (re.compile(r"^transformer\.encoder\."), "memory_attention."),
    (re.compile(r"^maskmem_backbone\."), "memory_encoder."),
    (re.compile(r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)lin(1|2)\."), lambda m: f"{m[1]}layers.{int(m[2]) - 1}."),
)
_FUSED = re.compile(r"^(.*\.)(?:qkv\.(weight|bias)|in_proj_(weight|bias))$")


def detector_key(rest: str) -> str | None:
    """A key under ``sam3_model.`` -> its released name (None: no component of the detector)."""
    for old, new, rules in _COMPILED:
        if rest.startswith(old):
            tail = rest[len(old) :]
            for pattern, replace in rules:
                if pattern.match(tail):
                    return new + pattern.sub(replace, tail, count=1)
            return new + tail
    return None


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta's keys -> (``Sam3VideoModel``'s keys and tensors, official keys that map to nothing)."""
    released: dict[str, torch.Tensor] = {}
    tracker: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(DETECTOR_PREFIX):
            if NOT_CARRIED.match(key):
                continue
            new = detector_key(key[len(DETECTOR_PREFIX) :])
            if new is None:
                unknown.append(key)
            else:
                released[new] = value
        elif key.startswith(TRACKER_PREFIX) and not key.startswith(TRACKER_PREFIX + "image_encoder."):
            rest = key[len(TRACKER_PREFIX) :]  # (SAM 3's tracker reads the detector's ViT: it has no image_encoder)
            for pattern, replace in _TRACKER_RENAMES:
                rest = pattern.sub(replace, rest, count=1)
            tracker[rest] = value
        else:
            unknown.append(key)
    converted, _, tracker_unknown = official_to_hf(tracker, video=True)
    unknown += [TRACKER_PREFIX + k for k in tracker_unknown]
    released.update({f"tracker_model.{k}": v for k, v in converted.items()})
    released = _split_fused(released)
    if POSITION_TABLE in released:
        released[POSITION_TABLE] = released[POSITION_TABLE][:, 1:, :]  # drop the class token's row
    if TEXT_PROJECTION in released:
        released[TEXT_PROJECTION] = released[TEXT_PROJECTION].T.contiguous()
    return released, sorted(unknown)


def _split_fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused q|k|v projections (3W×… rows, in that order) -> separate q_proj, k_proj, v_proj."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _FUSED.match(key)
        if m is None:
            out[key] = value
            continue
        param = m[2] or m[3]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(value, 3, dim=0)):
            out[f"{m[1]}{name}.{param}"] = part
    return out


def official_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's SAM 3 state dict -> ``Sam3VideoModel``'s layout (module docstring); official keys that
    map to nothing are a ``CheckpointError`` naming them."""
    released, unknown = convert_official(state_dict)
    if unknown:
        raise CheckpointError(f"official SAM 3 keys that map to no weight of Sam3VideoModel ({len(unknown)}): {unknown[:20]}. "
                              "Use an unmodified sam3.pt.")  # fmt: skip
    return released
