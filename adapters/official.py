"""Meta's official SAM checkpoints -> Hugging Face `transformers.SamModel`: variant checks and the loader.

Reads `sam_vit_{b,l,h}_*.pth` and MedSAM's `medsam_vit_b.pth` (the key layout of the `segment_anything`
package's `Sam.state_dict()`), checks the encoder against the configured variant and loads strictly, using
`checkpoint_files` (reading), `official_config` (config from shapes), `official_keys` (key maps, both
directions) and `position_tables` (image-size change), whose public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import transformers

from samtune.adapters.checkpoint_files import CheckpointError, load_exactly, load_state_dict_file
from samtune.adapters.official_config import (
    HF_MODEL_NAMES,
    OFFICIAL_VARIANTS,
    _encoder_width_depth,
    guess_official_variant,
    hf_config_from_official,
)
from samtune.adapters.official_keys import _BACKWARD, _convert_official, _rename, hf_to_official_state_dict, official_to_hf_state_dict
from samtune.adapters.position_tables import resize_position_tables

__all__ = [
    "HF_MODEL_NAMES",
    "OFFICIAL_VARIANTS",
    "CheckpointError",
    "check_architecture",
    "guess_official_variant",
    "hf_config_from_official",
    "hf_to_official_state_dict",
    "load_official_into_hf",
    "load_state_dict_file",
    "official_to_hf_state_dict",
    "resize_position_tables",
]


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
    # reported under the checkpoint's (official) names, the ones the user finds in their file
    load_exactly(model, hf_sd, source, "the inferred SamModel", "Use an unmodified official SAM/MedSAM checkpoint "
                 "(merge or strip extra modules such as adapters first).", unknown=unknown, named=lambda k: _rename(k, _BACKWARD) or k, tie=True)  # fmt: skip
    return model.eval()
