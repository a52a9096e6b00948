"""SAM model registry: named factories that build a Hugging Face ``transformers`` SamModel.

``build_sam("tiny")`` gives a small randomly initialised SAM for tests and the offline demo;
``sam-vit-base|large|huge`` and ``medsam-vit-base`` load weights from a local Hugging Face folder,
a hub id (when online) or an official ``.pth`` file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from samtune import SamtuneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamVariant:
    name: str
    description: str
    default_image_size: int
    hub_id: str | None  # Hugging Face hub id with the pretrained weights, if any
    official_variant: str | None  # "vit_b" | "vit_l" | "vit_h": key shapes of official .pth files
    make_config: Callable[[int], SamConfig] | None  # random-init config at an image size


_REGISTRY: dict[str, SamVariant] = {}


def register_model(variant: SamVariant) -> SamVariant:
    if variant.name in _REGISTRY:
        raise ValueError(f"model {variant.name!r} registered twice")
    _REGISTRY[variant.name] = variant
    return variant


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_variant(name: str) -> SamVariant:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SamtuneError(f"unknown model name {name!r}; known: {', '.join(list_models())}.{hint}")
    return _REGISTRY[name]


def make_tiny_config(image_size: int = 128) -> SamConfig:
    """A 4-block, 96-wide SAM with a 16×16 token grid at any image size (patch = image_size/16).

    Keeping the grid fixed keeps the cost per image fixed (≈0.16 s per batch of 8 for a LoRA
    training step on 2 CPU cores), so tests and the demo can pick the image size their data needs.
    """
    if image_size % 16 or image_size < 32:
        raise SamtuneError(f"model.image_size={image_size}: the tiny model needs a multiple of 16, at least 32")
    out_channels = 64
    vision = SamVisionConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        mlp_dim=384,
        image_size=image_size,
        patch_size=image_size // 16,
        output_channels=out_channels,
        global_attn_indexes=[1, 3],
        window_size=8,
        num_pos_feats=out_channels // 2,  # the prompt encoder's positional embedding is 2×this wide
        initializer_range=0.02,  # transformers' SAM default (1e-10) assumes weights get loaded
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=out_channels, image_size=image_size, patch_size=image_size // 16, mask_input_channels=16
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=out_channels, num_hidden_layers=2, num_attention_heads=4, mlp_dim=256, iou_head_hidden_dim=64
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


register_model(
    SamVariant("tiny", "random-init 4-block SAM for tests and the offline demo", 128, None, None, make_tiny_config)
)
register_model(SamVariant("sam-vit-base", "SAM ViT-B (Kirillov et al., 2023)", 1024, "facebook/sam-vit-base", "vit_b", None))
register_model(SamVariant("sam-vit-large", "SAM ViT-L", 1024, "facebook/sam-vit-large", "vit_l", None))
register_model(SamVariant("sam-vit-huge", "SAM ViT-H", 1024, "facebook/sam-vit-huge", "vit_h", None))
register_model(
    SamVariant("medsam-vit-base", "MedSAM ViT-B (Ma et al., 2024)", 1024, "wanglab/medsam-vit-base", "vit_b", None)
)


def build_sam(
    name: str,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    init_seed: int = 0,
) -> SamModel:
    """Build a SamModel by registry ``name``.

    ``checkpoint``: an official SAM/MedSAM ``.pth`` (or ``.safetensors`` with official keys), a local
    Hugging Face folder, or a hub id; ``None`` uses the variant's hub id (or random init for
    ``tiny``, seeded by ``init_seed`` so the same base model can be rebuilt to load an adapter).
    """
    variant = get_variant(name)
    size = image_size or variant.default_image_size
    if checkpoint is None and variant.make_config is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(init_seed)
        try:
            model = SamModel(variant.make_config(size))
            _init_random_sam(model)
        finally:
            torch.random.set_rng_state(generator_state)
        model.eval()
        return model
    source = str(checkpoint) if checkpoint is not None else variant.hub_id
    path = Path(source)
    if path.suffix in {".pth", ".pt", ".bin", ".safetensors"} and path.is_file():
        from samtune.adapters.official import load_official_into_hf

        model = load_official_into_hf(path, image_size=size, expected_variant=variant.official_variant)
    elif path.is_dir() or not path.suffix:
        model = _load_hf(source, name, path)
        if model.config.vision_config.image_size != size:
            model = resize_hf_model(model, size)
    else:
        raise SamtuneError(
            f"model.checkpoint={source!r} does not exist or is not a .pth/.pt/.safetensors file or a "
            "Hugging Face model folder; check the path (relative paths are relative to the current directory)."
        )
    model.eval()
    return model


def resize_hf_model(model: SamModel, image_size: int) -> SamModel:
    """The same weights at another input size: position tables interpolated (see official.py)."""
    from samtune.adapters.official import resize_position_tables

    config = model.config
    config.vision_config.image_size = image_size
    config.prompt_encoder_config.image_size = image_size
    config.prompt_encoder_config.image_embedding_size = image_size // config.vision_config.patch_size
    state = resize_position_tables(model.state_dict(), config)
    with torch.device("meta"):
        resized = SamModel(config)
    resized.load_state_dict(state, strict=True, assign=True)
    resized.tie_weights()
    return resized


@torch.no_grad()
def _init_random_sam(model: SamModel) -> None:
    """Initialisation that a random SAM can learn from (transformers' defaults assume loaded weights).

    The random Fourier positional encoding gets unit-scale frequencies as in the official SAM's
    PositionEmbeddingRandom (transformers draws them with std hidden_size/2, which makes the
    encoding of neighbouring pixels unrelated, so box prompts could not be localised), and the
    encoder's absolute position embedding a ViT-style std of 0.02 instead of zeros.
    """
    model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)
    if model.vision_encoder.pos_embed is not None:
        torch.nn.init.trunc_normal_(model.vision_encoder.pos_embed, std=0.02)


def _load_hf(source: str, name: str, path: Path) -> SamModel:
    if path.is_dir() and not (path / "config.json").is_file():
        raise SamtuneError(f"{path}: not a Hugging Face model folder (no config.json).")
    try:
        return SamModel.from_pretrained(source)
    except OSError as exc:  # offline, unknown hub id, or missing weight files
        raise SamtuneError(
            f"could not load SAM weights for model.name={name!r} from {source!r}: {exc}\n"
            "Set model.checkpoint to a local Hugging Face folder or an official .pth file "
            "(e.g. sam_vit_b_01ec64.pth), or run online so the hub id can be downloaded."
        ) from None
