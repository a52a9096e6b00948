"""Meta's official SAM checkpoints <-> Hugging Face `transformers.SamModel`.

Reads `sam_vit_{b,l,h}_*.pth` and MedSAM's `medsam_vit_b.pth` (the key layout of the
`segment_anything` package's `Sam.state_dict()`), infers the architecture from tensor shapes, maps
every key onto `SamModel`'s names and loads strictly. `hf_to_official_state_dict` is the inverse,
for exporting a fine-tuned model back as an official `.pth`.

Shape letters: C = encoder width, g = image_size / patch_size (token-grid side), D = prompt/decoder
width (256 in every released checkpoint).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from samtune import SamtuneError

# variant -> (encoder width, depth, heads, global-attention block indexes), as in segment_anything.build_sam
OFFICIAL_VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
HF_MODEL_NAMES = {"vit_b": "sam-vit-base", "vit_l": "sam-vit-large", "vit_h": "sam-vit-huge"}
# Normalisation constants (0-255 scale) that some exports carry; the official module keeps them as
# non-persistent buffers and SamModel has none: its image processor normalises instead.
_PIXEL_KEYS = {"pixel_mean": (123.675, 116.28, 103.53), "pixel_std": (58.395, 57.12, 57.375)}
_DECODER_HEADS = 8  # not recoverable from shapes; every released SAM decoder uses 8
_PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"  # (2, D/2) random Fourier features
_PE_HF_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


class CheckpointError(SamtuneError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the fix."""


# --- Reading files ---


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (tensor-only pickle) or `.safetensors` file into a flat CPU state dict.

    Unwraps `{"model": sd}` / `{"state_dict": sd}` training wrappers and strips DDP's `module.`
    prefix. Never executes code from the file: pickles are read with `weights_only=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Check the path or download the checkpoint first.")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own (Rust) error type for bad headers/lengths
            raise _corrupt_error(path, exc) from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" not in str(exc).lower():
                raise _corrupt_error(path, exc) from exc
            culprit = re.search(r"GLOBAL (\S+)", str(exc))  # e.g. "posix.system"
            raise CheckpointError(
                f"{path}: refused: unpickling this file would execute code (it references "
                f"{culprit[1] if culprit else 'objects other than tensors'}); no code was run. Use a checkpoint "
                f"from a trusted source, or re-save only its tensors (torch.save(state_dict)) or as .safetensors."
            ) from exc
        except Exception as exc:  # truncated zip archives raise RuntimeError, short legacy pickles EOFError
            raise _corrupt_error(path, exc) from exc
    return _unwrap_state_dict(obj, path)


def _corrupt_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); the file ({path.stat().st_size} "
        f"bytes) is truncated or corrupt. Download it again and compare its size/checksum with the published one."
    )


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    wrappers = ("state_dict", "model", "model_state_dict")
    for _ in range(3):  # e.g. {"model": {"state_dict": sd}, "epoch": 3}; training scripts nest no deeper
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: holds {'an empty ' if isinstance(obj, Mapping) else 'a '}{type(obj).__name__}, not a state "
            f"dict of tensors. Point the config at the weights file (e.g. sam_vit_b_01ec64.pth)."
        )
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries that are not tensors: {not_tensors[:8]}. Save only the model's state_dict() "
            f"(or wrap it as {{'model': state_dict}})."
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


# --- Architecture inference ---


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


# --- Image-size change ---


def resize_position_tables(hf_sd, config) -> dict:
    """Fit position tables to `config.vision_config.image_size` (returns a new dict; input untouched).

    - `pos_embed` (1, g, g, C): bicubic on the token grid to g' = image_size / patch_size.
    - rel_pos_h/w of GLOBAL blocks (2g-1, C/heads): linear to 2g'-1, the same interpolation the
      official attention applies on the fly when lengths differ. Windowed blocks' tables depend on
      the window size only and stay. The prompt encoder's image embedding size (g') comes from the
      config, not from a tensor.
    Tables already at the target size stay the same tensor objects (bit-identical).
    """
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    out = dict(hf_sd)
    pos = out.get("vision_encoder.pos_embed")
    if pos is not None and tuple(pos.shape[1:3]) != (grid, grid):
        channels_first = pos.permute(0, 3, 1, 2).float()  # (1, C, g, g)
        resized = F.interpolate(channels_first, size=(grid, grid), mode="bicubic", align_corners=False)
        out["vision_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype).contiguous()
    for index in vision.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"vision_encoder.layers.{index}.attn.rel_pos_{axis}"
            table = out.get(key)
            if table is not None and table.shape[0] != 2 * grid - 1:
                # (L, c) -> (1, c, L): 1-D interpolation along the relative-offset axis
                resized = F.interpolate(table.T[None].float(), size=2 * grid - 1, mode="linear", align_corners=False)
                out[key] = resized[0].T.to(table.dtype).contiguous()
    return out


# --- Loading ---


def _canonical_variant(name: str) -> str | None:
    """'vit_b', 'sam-vit-base', 'facebook/sam-vit-base', 'medsam' -> 'vit_b'; unknown -> None."""
    key = str(name).lower().rsplit("/", 1)[-1].replace("-", "_")
    aliases = {"custom": "custom", "medsam": "vit_b"}
    for variant, hf_name in HF_MODEL_NAMES.items():
        aliases.update(dict.fromkeys((variant, hf_name.replace("-", "_"), hf_name[4:].replace("-", "_")), variant))
    return aliases.get(key)


def check_architecture(sd, expected_variant, path) -> None:
    """Raise CheckpointError when the checkpoint's encoder is not `expected_variant`.

    `expected_variant`: 'vit_b'/'vit_l'/'vit_h', a model name ('sam-vit-base',
    'facebook/sam-vit-huge'), or None/'custom' to skip the check.
    """
    if expected_variant is None:
        return
    expected = _canonical_variant(expected_variant)
    if expected is None:
        raise CheckpointError(
            f"{path}: unknown model variant {expected_variant!r}. Use one of "
            f"{', '.join(HF_MODEL_NAMES.values())} (or vit_b / vit_l / vit_h, custom)."
        )
    found = guess_official_variant(sd)
    if expected in ("custom", found):
        return
    width, depth = _encoder_width_depth(sd)
    if found == "custom":
        looks, fix = "a non-standard ViT", "Use a custom model config"
    else:
        looks, fix = f"ViT-{found[-1].upper()}", f"Use model.name: {HF_MODEL_NAMES[found]}"
    raise CheckpointError(
        f"{path}: keys look like {looks} ({width}-wide, {depth} blocks); model.name is "
        f"{HF_MODEL_NAMES[expected]}. {fix} or the matching checkpoint."
    )


def load_official_into_hf(path_or_sd, image_size=None, expected_variant=None) -> transformers.SamModel:
    """Official checkpoint (path or state dict) -> `SamModel` in eval mode, loaded strictly.

    `image_size` (pixels) trains/infers at a size other than the checkpoint's (e.g. 256 for small
    organs); position tables are interpolated. `expected_variant` guards against a config/file mix-up.
    """
    source = "<state dict>" if isinstance(path_or_sd, Mapping) else str(path_or_sd)
    if isinstance(path_or_sd, Mapping):  # copies: the model adopts these tensors (assign=True) below
        sd = {k: v.detach().clone() for k, v in path_or_sd.items()}
    else:
        sd = load_state_dict_file(path_or_sd)
    try:
        check_architecture(sd, expected_variant, source)
        config = hf_config_from_official(sd, image_size=image_size)
        hf_sd, unknown = _convert_official(sd, config)
        hf_sd = resize_position_tables(hf_sd, config)
    except CheckpointError as exc:
        raise (exc if str(exc).startswith(source) else CheckpointError(f"{source}: {exc}")) from exc.__cause__
    # Built on the meta device (no random init of up to ~640M parameters); the checkpoint tensors are adopted.
    with torch.device("meta"):
        model = transformers.SamModel(config)
    expected_keys = set(model.state_dict())
    # Reported under the checkpoint's (official) names, the ones the user finds in their file.
    missing = sorted(_rename(k, _BACKWARD) or k for k in expected_keys - hf_sd.keys())
    unexpected = sorted(unknown + [_rename(k, _BACKWARD) or k for k in hf_sd.keys() - expected_keys])
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit the inferred SamModel. Missing keys ({len(missing)}): {missing[:20]}; "
            f"unexpected keys ({len(unexpected)}): {unexpected[:20]}. Use an unmodified official SAM/MedSAM "
            f"checkpoint (merge or strip extra modules such as adapters first)."
        )
    try:
        model.load_state_dict(hf_sd, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches, e.g. a hand-edited table
        raise CheckpointError(f"{source}: tensor shapes do not fit the inferred SamModel: {exc}. "
                              f"Use an unmodified checkpoint.") from exc
    model.tie_weights()  # assign=True gave the two tied positional parameters separate objects; re-tie
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source}: no values for {left_on_meta[:10]}. Use a complete official checkpoint.")
    return model.eval()
