"""Key maps between Meta's official SAM state dicts and Hugging Face `transformers.SamModel`, both directions.

One rule table serves both directions; the depth-dependent MLP heads and the tied positional-encoding
matrix are mapped in code, and the pixel_mean/pixel_std constants SamModel does not hold are dropped
(with a warning when they differ from SAM's default). Shape letters: D = prompt/decoder width.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch

from samtune.adapters.checkpoint_files import CheckpointError
from samtune.constants import PIXEL_MEAN, PIXEL_STD

# Normalisation constants (0-255 scale) that some exports carry; the official module keeps them as
# non-persistent buffers and SamModel has none: its image processor normalises instead.
_PIXEL_KEYS = {"pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD}
_PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"  # (2, D/2) random Fourier features
_PE_HF_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


# --- Key mapping: one table serves both directions; `{slot}` placeholders become named regex groups ---

_SLOTS = {
    "i": r"\d+", "n": r"[1-4]", "wb": r"weight|bias", "rel": r"rel_pos_h|rel_pos_w", "lin": r"qkv|proj",
    "mlp": r"lin1|lin2", "proj": r"q_proj|k_proj|v_proj|out_proj",
    "xattn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image",
    "emb": r"not_a_point_embed|no_mask_embed|iou_token|mask_tokens",
}
_RULES = [  # (official, SamModel)
    ("image_encoder.patch_embed.proj.{wb}", "vision_encoder.patch_embed.projection.{wb}"),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{i}.norm{n}.{wb}", "vision_encoder.layers.{i}.layer_norm{n}.{wb}"),
    ("image_encoder.blocks.{i}.attn.{rel}", "vision_encoder.layers.{i}.attn.{rel}"),
    ("image_encoder.blocks.{i}.attn.{lin}.{wb}", "vision_encoder.layers.{i}.attn.{lin}.{wb}"),
    ("image_encoder.blocks.{i}.mlp.{mlp}.{wb}", "vision_encoder.layers.{i}.mlp.{mlp}.{wb}"),
    # neck = Sequential(conv1x1, LN2d, conv3x3, LN2d); the convs have no bias
    ("image_encoder.neck.0.weight", "vision_encoder.neck.conv1.weight"),
    ("image_encoder.neck.1.{wb}", "vision_encoder.neck.layer_norm1.{wb}"),
    ("image_encoder.neck.2.weight", "vision_encoder.neck.conv2.weight"),
    ("image_encoder.neck.3.{wb}", "vision_encoder.neck.layer_norm2.{wb}"),
    ("prompt_encoder.point_embeddings.{i}.weight", "prompt_encoder.point_embed.{i}.weight"),
    ("prompt_encoder.{emb}.weight", "prompt_encoder.{emb}.weight"),
    # mask_downscaling = Sequential(conv, LN2d, GELU, conv, LN2d, GELU, conv): the GELUs (2, 5) hold nothing
    ("prompt_encoder.mask_downscaling.0.{wb}", "prompt_encoder.mask_embed.conv1.{wb}"),
    ("prompt_encoder.mask_downscaling.1.{wb}", "prompt_encoder.mask_embed.layer_norm1.{wb}"),
    ("prompt_encoder.mask_downscaling.3.{wb}", "prompt_encoder.mask_embed.conv2.{wb}"),
    ("prompt_encoder.mask_downscaling.4.{wb}", "prompt_encoder.mask_embed.layer_norm2.{wb}"),
    ("prompt_encoder.mask_downscaling.6.{wb}", "prompt_encoder.mask_embed.conv3.{wb}"),
    ("mask_decoder.{emb}.weight", "mask_decoder.{emb}.weight"),
    ("mask_decoder.transformer.layers.{i}.{xattn}.{proj}.{wb}",
     "mask_decoder.transformer.layers.{i}.{xattn}.{proj}.{wb}"),
    ("mask_decoder.transformer.layers.{i}.norm{n}.{wb}", "mask_decoder.transformer.layers.{i}.layer_norm{n}.{wb}"),
    ("mask_decoder.transformer.layers.{i}.mlp.{mlp}.{wb}", "mask_decoder.transformer.layers.{i}.mlp.{mlp}.{wb}"),
    ("mask_decoder.transformer.{xattn}.{proj}.{wb}", "mask_decoder.transformer.{xattn}.{proj}.{wb}"),
    ("mask_decoder.transformer.norm_final_attn.{wb}", "mask_decoder.transformer.layer_norm_final_attn.{wb}"),
    # output_upscaling = Sequential(convT, LN2d, GELU, convT, GELU)
    ("mask_decoder.output_upscaling.0.{wb}", "mask_decoder.upscale_conv1.{wb}"),
    ("mask_decoder.output_upscaling.1.{wb}", "mask_decoder.upscale_layer_norm.{wb}"),
    ("mask_decoder.output_upscaling.3.{wb}", "mask_decoder.upscale_conv2.{wb}"),
]
# The MLP heads are depth-dependent, so they are mapped in code: official MLP(layers.0 .. layers.L-1)
# == SamFeedForward(proj_in, layers.0 .. layers.L-3, proj_out).
_MLP_HEADS = r"mask_decoder\.(?P<head>output_hypernetworks_mlps\.\d+|iou_prediction_head)\."


def _compile(template: str) -> re.Pattern:
    """'a.{i}.b' -> regex with a named group per slot (each slot at most once per template)."""
    regex = re.escape(template)
    for slot, pattern in _SLOTS.items():
        regex = regex.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{pattern})")
    return re.compile(regex)


_FORWARD = [(_compile(official), hf) for official, hf in _RULES]
_BACKWARD = [(_compile(hf), official) for official, hf in _RULES]


def _rename(key: str, table) -> str | None:
    for pattern, target in table:
        if m := pattern.fullmatch(key):
            return target.format(**m.groupdict())
    return None


def _mlp_depths(sd: Mapping, layer_regex: str) -> dict[str, int]:
    """MLP head name -> number of linear layers, counted from the keys present."""
    counts: dict[str, int] = {}
    for key in sd:
        if m := re.fullmatch(_MLP_HEADS + layer_regex, key):
            counts[m["head"]] = counts.get(m["head"], 0) + 1
    return {head: n // 2 for head, n in counts.items()}  # a weight and a bias per linear


def official_to_hf_state_dict(sd, config) -> dict:
    """Rename an official state dict to `SamModel` keys. Tensors are shared, not copied.

    Raises CheckpointError listing every key that maps to nothing; only the pixel_mean/pixel_std
    normalisation constants are dropped (SamModel does not hold them).
    """
    hf, unknown = _convert_official(sd, config)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} key(s) with no SamModel counterpart: {unknown[:12]}. The file is not a plain "
            f"SAM/MedSAM checkpoint (extra modules, e.g. adapters?); strip them or export plain SAM weights."
        )
    return hf


def _convert_official(sd: Mapping, config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(SamModel-keyed dict, official keys that map to nothing)."""
    hf: dict[str, torch.Tensor] = {}
    unknown = []
    depths = _mlp_depths(sd, r"layers\.\d+\.(weight|bias)")
    depths["iou_prediction_head"] = config.mask_decoder_config.iou_head_depth
    for key, value in sd.items():
        if key in _PIXEL_KEYS:
            _warn_on_custom_normalisation(key, value)
        elif key == _PE_KEY:  # one buffer -> two tied SamModel parameters (point prompts, image-wide PE)
            hf.update(dict.fromkeys(_PE_HF_KEYS, value))
        elif m := re.fullmatch(_MLP_HEADS + r"layers\.(?P<l>\d+)\.(?P<wb>weight|bias)", key):
            layer, last = int(m["l"]), depths[m["head"]] - 1
            part = "proj_in" if layer == 0 else "proj_out" if layer == last else f"layers.{layer - 1}"
            hf[f"mask_decoder.{m['head']}.{part}.{m['wb']}"] = value
        elif (new := _rename(key, _FORWARD)) is not None:
            hf[new] = value
        else:
            unknown.append(key)
    return hf, unknown


def _warn_on_custom_normalisation(key: str, value: torch.Tensor) -> None:
    if not torch.allclose(value.flatten().float(), torch.tensor(_PIXEL_KEYS[key]), atol=1e-3):
        warnings.warn(
            f"checkpoint {key} = {value.flatten().tolist()} differs from SAM's ImageNet default; SamModel does "
            f"not store it, so set the image processor's image_mean/image_std (value/255) to match.",
            stacklevel=4,
        )


def hf_to_official_state_dict(hf_sd) -> dict:
    """Inverse of `official_to_hf_state_dict`: `SamModel.state_dict()` -> official `Sam` keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    depths = _mlp_depths(hf_sd, r"(proj_in|proj_out|layers\.\d+)\.(weight|bias)")
    tied = [hf_sd[k] for k in _PE_HF_KEYS if k in hf_sd]
    if len(tied) == 2 and not torch.equal(*tied):
        raise CheckpointError(
            f"{_PE_HF_KEYS[0]} and {_PE_HF_KEYS[1]} differ (untied during fine-tuning) but the official model "
            f"has one matrix for both. Re-tie them (model.tie_weights()) before exporting."
        )
    for key, value in hf_sd.items():
        if key.startswith("class_prompts."):  # automatic mode's learnt prompts (family.CLASS_PROMPTS): no official slot
            warnings.warn(f"{key}: the automatic mode's class prompts have no place in the official layout; "
                          "the exported file is the promptable model", stacklevel=2)
            continue
        if key in _PE_HF_KEYS:
            out[_PE_KEY] = value
        elif m := re.fullmatch(_MLP_HEADS + r"(?P<part>proj_in|proj_out|layers\.\d+)\.(?P<wb>weight|bias)", key):
            part = m["part"]
            layer = 0 if part == "proj_in" else depths[m["head"]] - 1 if part == "proj_out" else int(part[7:]) + 1
            out[f"mask_decoder.{m['head']}.layers.{layer}.{m['wb']}"] = value
        elif (new := _rename(key, _BACKWARD)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} SamModel key(s) with no official counterpart: {unknown[:12]}. Merge adapters "
            f"first (e.g. peft merge_and_unload()) and export the plain SamModel state dict."
        )
    return out
