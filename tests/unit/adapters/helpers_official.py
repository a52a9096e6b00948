"""Test-only access to Meta's reference SAM implementation (PyPI `segment-anything==1.0`).

The package's `__init__` imports its predictor and automatic mask generator, which import
torchvision; torchvision is not installed beside this torch (and must not be). Only
`segment_anything.modeling` is needed (pure torch), so an empty parent package is registered in
`sys.modules` first and the submodule is imported on its own.

Install the reference with:  .venv/bin/pip install segment-anything==1.0 --no-deps
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import partial

import pytest
import torch

_PACKAGE = "segment_anything"
_INSTALL_HINT = "install the test reference with: .venv/bin/pip install segment-anything==1.0 --no-deps"


def import_official_modeling() -> types.ModuleType:
    """Return `segment_anything.modeling` without running the torchvision-importing package init.

    Skips the calling test when the reference package is not installed.
    """
    if f"{_PACKAGE}.modeling" in sys.modules:
        return sys.modules[f"{_PACKAGE}.modeling"]
    spec = importlib.util.find_spec(_PACKAGE) if _PACKAGE not in sys.modules else None
    if _PACKAGE not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"segment_anything is not installed; {_INSTALL_HINT}")
        # An empty namespace stands in for the real package: submodules resolve through __path__,
        # and the real __init__ (predictor -> torchvision) never runs.
        parent = types.ModuleType(_PACKAGE)
        parent.__path__ = list(spec.submodule_search_locations)
        parent.__file__ = None
        sys.modules[_PACKAGE] = parent
    try:
        return importlib.import_module(f"{_PACKAGE}.modeling")
    except ImportError as exc:  # a partial or incompatible install
        pytest.skip(f"segment_anything.modeling failed to import ({exc}); {_INSTALL_HINT}")


def build_official_sam(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    num_multimask_outputs: int = 3,
) -> torch.nn.Module:
    """Build the reference `Sam` the way `segment_anything.build_sam._build_sam` does, sizes configurable.

    Defaults are the official ones (ViT-B is `build_official_sam(768, 12, 12, (2, 5, 8, 11))`).
    Returned in eval mode with the module's own (mostly zero/one) initialisation.
    """
    modeling = import_official_modeling()
    grid = image_size // patch_size  # image-embedding side in tokens
    image_encoder = modeling.ImageEncoderViT(
        depth=encoder_depth,
        embed_dim=encoder_embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=encoder_num_heads,
        patch_size=patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(encoder_global_attn_indexes),
        window_size=window_size,
        out_chans=prompt_embed_dim,
    )
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=num_multimask_outputs,
        transformer=modeling.TwoWayTransformer(
            depth=decoder_depth,
            embedding_dim=prompt_embed_dim,
            mlp_dim=decoder_mlp_dim,
            num_heads=decoder_num_heads,
        ),
        transformer_dim=prompt_embed_dim,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    sam = modeling.Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def perturb_parameters(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter and persistent float buffer so nothing is zero or one.

    Zero-initialised tables (pos_embed, rel_pos_*) would otherwise hide a wrong mapping.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():  # views: in-place edits reach the module
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * std)
    return module

