"""Resize a `SamModel` state dict's position tables to a new input image size.

Shape letters: C = encoder width, g = image_size / patch_size (token-grid side).
"""

from __future__ import annotations

import torch.nn.functional as F


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
