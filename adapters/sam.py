"""SAM v1 (Kirillov et al., 2023) as a model family, through Hugging Face ``transformers.SamModel``.

Shapes in SAM's vocabulary: the image encoder (``vision_encoder``, a ViT with fused ``attn.qkv``
per block) maps B×3×S×S normalised images to B×C×g×g ``image_embeddings`` (g = S/16 for the
released models); the prompt encoder + ``mask_decoder`` map one prompt per embedding row (boxes
N×4 xyxy, points N×K×2 with labels 1/0/-1, mask prompts N×1×4g×4g logits; input px) to N×M×4g×4g
low-res logits and N×M IoU predictions (M = 3 with ``multimask_output``, else 1).

Training goes through ``vision_encoder`` directly and through ``SamModel.forward`` with
``image_embeddings``: transformers' ``get_image_embeddings`` runs under no_grad, which would cut
the gradient to the encoder's LoRA.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from samtune.adapters.catalog import ModelVariant, register_family, register_model
from samtune.adapters.family import ImageEmbeddings, PromptTokenFamily
from samtune.errors import SamtuneError

_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?"
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)\.(?:q|k|v|out)_proj"
)
_ENCODER_BLOCK = r"vision_encoder\.layers\.\d+\."


@register_family
class SamFamily(PromptTokenFamily):
    name = "sam"
    image_encoder = "vision_encoder"
    mask_decoder = "mask_decoder"
    prompt_modules = ("prompt_encoder", "shared_image_embedding")
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"attn\.qkv",  # q, k, v fused in one Linear
        "encoder_attention_out": _ENCODER_BLOCK + r"attn\.proj",
        "encoder_mlp": _ENCODER_BLOCK + r"mlp\.lin[12]",
        "decoder_attention": _DECODER_ATTENTION,
    }
    encoder_block = re.compile(r"vision_encoder\.layers\.(\d+)\.")
    attention_kinds = ("sdpa", "fused_relpos", "eager")

    def set_attention(self, model, kind: str) -> None:
        super().set_attention(model, kind)
        from samtune.adapters.attention import set_vision_attention

        set_vision_attention(model, kind)

    def build(self, variant: ModelVariant, checkpoint: str | None, image_size: int, init_seed: int) -> SamModel:
        if checkpoint is None and variant.make_config is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(init_seed)
            try:
                model = SamModel(variant.make_config(image_size))
                _init_random_sam(model)
            finally:
                torch.random.set_rng_state(generator_state)
            return model
        source = checkpoint if checkpoint is not None else variant.hub_id
        path = Path(source)
        if path.suffix in {".pth", ".pt", ".bin", ".safetensors"} and path.is_file():
            from samtune.adapters.official import load_official_into_hf

            return load_official_into_hf(path, image_size=image_size, expected_variant=variant.official_variant)
        if path.is_dir() or not path.suffix:
            model = _load_hf(source, variant.name, path)
            return resize_hf_model(model, image_size) if model.config.vision_config.image_size != image_size else model
        raise SamtuneError(
            f"model.checkpoint={source!r} does not exist or is not a .pth/.pt/.safetensors file or a "
            "Hugging Face model folder; check the path (relative paths are relative to the current directory)."
        )

    export_formats = ("hf", "sam-pth", "onnx")

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_model

        return export_model(model, fmt, out)

    def load_full(self, folder) -> SamModel:
        return SamModel.from_pretrained(str(folder))

    def encoder_depth(self, model) -> int:
        return _sam_config(model).vision_config.num_hidden_layers

    def make_transform(self, image_size: int):
        from samtune.adapters.preprocess import LongestSideTransform

        return LongestSideTransform(image_size)

    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        return ImageEmbeddings(model.vision_encoder(pixel_values)[0])

    @staticmethod
    def _forward_embeddings(embeddings):
        return embeddings.image_embeddings

    def prompt_dim(self, model) -> int:
        return _sam_config(model).prompt_encoder_config.hidden_size

    @staticmethod
    def _decode(model, embeddings, sparse, dense, multimask_output):
        """B×P×T×C sparse and B×C×g×g dense prompts on ``embeddings`` -> B×P×M×s×s, B×P×M."""
        image = embeddings.image_embeddings
        positions = model.get_image_wide_positional_embeddings().repeat(image.shape[0], 1, 1, 1)
        low_res, iou = model.mask_decoder(
            image_embeddings=image, image_positional_embeddings=positions,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
        )  # fmt: skip
        return low_res, iou


def _sam_config(model) -> SamConfig:
    config = getattr(model, "config", None)  # a PeftModel forwards .config to the base model
    if not isinstance(config, SamConfig):
        raise TypeError(f"expected a transformers SamModel (or a peft model around one), got {type(model).__name__}")
    return config


def make_tiny_config(image_size: int = 128) -> SamConfig:
    """A 4-block, 96-wide SAM with a 16×16 token grid at any image size (patch = image_size/16).

    Keeping the grid fixed keeps the cost per image fixed (≈0.16 s per batch of 8 for a LoRA
    training step on 2 CPU cores), so tests and the demo can pick the image size their data needs.
    """
    if image_size % 16 or image_size < 32:
        raise SamtuneError(f"model.image_size={image_size}: the tiny model needs a multiple of 16, at least 32")
    out_channels = 64
    vision = SamVisionConfig(
        hidden_size=96, num_hidden_layers=4, num_attention_heads=3, mlp_dim=384, image_size=image_size,
        patch_size=image_size // 16, output_channels=out_channels, global_attn_indexes=[1, 3], window_size=8,
        num_pos_feats=out_channels // 2,  # the prompt encoder's positional embedding is 2×this wide
        initializer_range=0.02,  # transformers' SAM default (1e-10) assumes weights get loaded
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=out_channels, image_size=image_size, patch_size=image_size // 16, mask_input_channels=16)
    decoder = SamMaskDecoderConfig(hidden_size=out_channels, num_hidden_layers=2, num_attention_heads=4, mlp_dim=256, iou_head_hidden_dim=64)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


_SAM_LICENCE = "Apache-2.0 (LICENSE of facebookresearch/segment-anything, which covers the released checkpoints)"
register_model(ModelVariant("tiny", "sam", "random-init 4-block SAM for tests and the offline demo", 128, None, None, make_tiny_config,
                            licence="none: random initialisation"))
# `tiny` pretrained on generated shapes (benchmarks/pretrain_tiny.py); the Hugging Face folder ships in the package
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
register_model(ModelVariant("tiny-pretrained", "sam", "the tiny SAM pretrained on generated shapes (offline demo)", 128, str(PRETRAINED_DIR / "tiny_shapes"), None,
                            licence="Apache-2.0 (samtune's own weights, made by benchmarks/pretrain_tiny.py)"))
register_model(ModelVariant("sam-vit-base", "sam", "SAM ViT-B (Kirillov et al., 2023)", 1024, "facebook/sam-vit-base", "vit_b", licence=_SAM_LICENCE))
register_model(ModelVariant("sam-vit-large", "sam", "SAM ViT-L", 1024, "facebook/sam-vit-large", "vit_l", licence=_SAM_LICENCE))
register_model(ModelVariant("sam-vit-huge", "sam", "SAM ViT-H", 1024, "facebook/sam-vit-huge", "vit_h", licence=_SAM_LICENCE))
register_model(ModelVariant("medsam-vit-base", "sam", "MedSAM ViT-B (Ma et al., 2024)", 1024, "wanglab/medsam-vit-base", "vit_b",
                            licence="Apache-2.0 (LICENSE of bowang-lab/MedSAM)"))


def resize_hf_model(model: SamModel, image_size: int) -> SamModel:
    """The same weights at another input size: position tables interpolated (see position_tables)."""
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
    if path.is_absolute() and not path.exists():  # never a hub id: a missing folder (e.g. package data not installed)
        raise SamtuneError(f"model.name={name!r}: its weights folder {path} does not exist; reinstall samtune (`pip install .`) or set model.checkpoint.")
    try:
        return SamModel.from_pretrained(source)
    except OSError as exc:  # offline, unknown hub id, or missing weight files
        raise SamtuneError(
            f"could not load SAM weights for model.name={name!r} from {source!r}: {exc}\n"
            "Set model.checkpoint to a local Hugging Face folder or an official .pth file "
            "(e.g. sam_vit_b_01ec64.pth), or run online so the hub id can be downloaded."
        ) from None
