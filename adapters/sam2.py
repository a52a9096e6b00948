"""SAM 2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024) as a model family,
through Hugging Face ``transformers.Sam2Model`` (the image model: no memory modules).

Variants: ``sam2-hiera-tiny | sam2-hiera-small | sam2-hiera-base-plus | sam2-hiera-large`` (SAM 2.1
weights by default: hub ids ``facebook/sam2.1-hiera-*``; SAM 2.0 files load the same way, the image
model's keys did not change), ``medsam2`` (MedSAM2, Ma et al. 2025: a fine-tuned SAM 2.1 Hiera-T
run at 512 px; ``model.checkpoint: MedSAM2_latest.pt``) and ``sam2-tiny-random`` (random init,
2.0 M parameters, 0.3 M of them Hiera, for tests and offline runs).

Shapes. The Hiera encoder (``vision_encoder.backbone``: patch stride 4, four stages, each halving
the grid) and its FPN neck give three maps of width D (256 for every released model) at strides 4,
8 and 16. ``encode_images`` returns the stride-16 map plus ``no_memory_embedding`` as
``image_embeddings`` (B×D×S/16×S/16, what SAM 2's image predictor adds on a frame without memory)
and the two finer maps after the mask decoder's 1×1 projections ``conv_s0``/``conv_s1`` as
``high_res_features`` (B×D/8×S/4×S/4, B×D/4×S/8×S/8). Those projections belong to the mask
decoder (they train with it) but run at encoding, as in the official code and transformers: the
projected maps are 8× and 4× smaller than the raw ones, which matters once they are repeated per
prompt. ``decode_prompts`` gives N×M×S/4×S/4 low-res logits and N×M IoU like SAM.

Preprocessing differs from SAM v1: the image is resized to an S×S square (aspect ratio not kept,
no padding) and normalised with the ImageNet mean/std (sam2/utils/transforms.py: ``Resize((S, S))``
on the 0-1 float image, antialiased bilinear, then ``Normalize``). ``SquareResizeTransform`` does
exactly that with ``F.interpolate(antialias=True)`` (what torchvision's tensor Resize calls), so
``resized_shape`` is (S, S) and the base class's ``logits_to_original`` (crop nothing, resize the
S×S logits to H×W) is the official post-processing; no override is needed.

Architecture as data (Hiera layouts, configs): adapters/sam2_config.py.

Decisions:
- Object score: SAM 2's decoder also predicts whether the object is present (``object_score_logits``).
  samtune ignores it in training and prediction, as the official image predictor does
  (SAM2ImagePredictor never gates masks with it; only the video tracker, SAM2Base._forward_sam_heads,
  replaces masks of absent objects). An empty mask is learnt from the mask logits themselves.
- Single-mask output: transformers' and the official image predictor's decoder, in eval mode, may
  replace the single-mask token's output by the best multimask output when the former is
  "unstable" (``dynamic_multimask_via_stability``). Training optimises the single-mask token (the
  fallback is off in train mode), so samtune switches the fallback off on the models it builds and
  evaluates what was trained. ``config.json`` keeps the official setting, so an exported folder
  behaves like the official model elsewhere.
- Export: ``hf`` only (a ``Sam2Model.from_pretrained`` folder, LoRA merged). ``sam-pth`` is SAM v1's
  key layout; an official SAM 2 ``.pt`` would need the video memory modules that the image model
  does not have (the official loader is strict); ONNX is not written for SAM 2's three-map encoder
  output (adapters/export.py exports SamModel's signature).

Official checkpoints (``sam2.1_hiera_tiny.pt`` ..., ``MedSAM2_latest.pt``: ``{"model": state_dict}``
of the sam2 package's ``SAM2Base``) are read with ``torch.load(weights_only=True)`` and converted
in memory (``official_to_hf``, adapters/sam2_checkpoints.py): the image encoder, prompt encoder and mask decoder keys are renamed
to transformers' (the mapping follows transformers' convert_sam2_to_hf.py), and the video-only keys
(memory attention, memory encoder, object pointers, ``mask_downsample``, ``maskmem_tpos_enc``,
``no_mem_pos_enc``, ``no_obj_ptr``, ``no_obj_embed_spatial``) are left out.

Video / volumes: ``video_model_from(image_model, official)`` (adapters/sam2_video.py) builds transformers'
``Sam2VideoModel`` (memory attention across frames) from the same weights: every image-model
module has the same name in both classes, and the memory modules come from the official file
(``official_to_hf(..., video=True)`` maps all of its keys).

Reference implementation for the tests: ``sam2==1.1.0`` on PyPI is a source distribution only
(its setup.py builds a CUDA extension unless ``SAM2_BUILD_CUDA=0``, and it requires torchvision and
hydra); ``SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0`` gives the pure
Python package. Its ``sam2/__init__`` imports hydra, so the tests import ``sam2.modeling`` under an
empty parent package (tests/unit/adapters/test_sam2.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam2Config, Sam2Model

from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.catalog import ModelVariant, register_family, register_model
from samtune.adapters.family import ImageEmbeddings, PromptTokenFamily
from samtune.adapters.sam2_checkpoints import load_official_sam2
from samtune.adapters.sam2_config import (
    HIERA,
    make_tiny_sam2_config,
    sam2_config,
    same_positional_tables,
    single_mask_token_only,
    with_image_size,
)
from samtune.adapters.sam2_video import video_model_from, video_model_from_folder
from samtune.errors import SamtuneError

# ImageNet statistics on 0-1 RGB, as SAM 2 normalises (sam2/utils/transforms.py, SAM2Transforms)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- preprocessing -----------------------------------------------------------------------------


class SquareResizeTransform:
    """``transform(image=H×W×3 RGB or H×W grey (0-255), mask=H×W)`` -> {"image": S×S×3 float32,
    "mask": S×S}: SAM 2's square resize (aspect ratio not kept, nothing padded) and ImageNet
    normalisation. The image is resized as float (the official pipeline resizes the 0-1 tensor,
    not a rounded uint8 image); the label map with nearest neighbour at pixel centres (OpenCV's
    INTER_NEAREST_EXACT, as adapters/preprocess.py, by index: any dtype, bool included)."""

    def __init__(self, image_size: int, pixel_mean: tuple[float, ...] = IMAGENET_MEAN, pixel_std: tuple[float, ...] = IMAGENET_STD):
        self.image_size = image_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)  # on 0-1 values

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """The whole S×S input is image: every original size maps to (S, S)."""
        return self.image_size, self.image_size

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        size = self.image_size
        planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        planes = planes[None] if image.ndim == 2 else planes.permute(2, 0, 1)  # a grey slice is resized once
        if tuple(image.shape[:2]) != (size, size):
            planes = F.interpolate(planes[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            mask = mask[_nearest_centres(mask.shape[0], size)][:, _nearest_centres(mask.shape[1], size)]
        mean = torch.tensor(self.pixel_mean).view(3, 1, 1) * 255.0
        std = torch.tensor(self.pixel_std).view(3, 1, 1) * 255.0
        chw = ((planes.expand(3, -1, -1) - mean) / std).numpy()
        return {"image": chw.transpose(1, 2, 0), "mask": mask}  # S×S×3 view of the 3×S×S buffer


def _nearest_centres(n: int, size: int) -> np.ndarray:
    """Source index of each of ``size`` output pixels: the one holding the output pixel's centre."""
    return np.minimum(((np.arange(size) + 0.5) * (n / size)).astype(np.int64), n - 1)


# --- the family --------------------------------------------------------------------------------

_ENCODER_BLOCK = r"vision_encoder\.backbone\.blocks\.\d+\."
_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?"
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)\.(?:q|k|v|o)_proj"
)


@register_family
class Sam2Family(PromptTokenFamily):
    """SAM 2's image model. LoRA roles name the Linear layers of the Hiera blocks (the fused
    ``attn.qkv``, ``attn.proj``, ``mlp.proj_in/out``; the ``proj`` skip projection of a stage's
    first block is no role) and the two-way transformer's q/k/v/o projections.
    ``adapter.lora.blocks`` counts Hiera blocks across stages (Hiera-T: 12, S: 16, B+: 24, L: 48).
    ``no_memory_embedding`` (added to the image embeddings) counts as image encoder and stays
    frozen except in ``full`` mode; the image model has no memory modules."""

    name = "sam2"
    image_encoder = "vision_encoder"
    mask_decoder = "mask_decoder"
    prompt_modules = ("prompt_encoder", "shared_image_embedding")
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"attn\.qkv",  # q, k, v fused in one Linear
        "encoder_attention_out": _ENCODER_BLOCK + r"attn\.proj",
        "encoder_mlp": _ENCODER_BLOCK + r"mlp\.proj_(?:in|out)",
        "decoder_attention": _DECODER_ATTENTION,
    }
    encoder_block = re.compile(r"vision_encoder\.backbone\.blocks\.(\d+)\.")
    attention_kinds = ("sdpa",)  # transformers' SDPA path (Sam2Model's default)
    export_formats = ("hf",)

    def build(self, variant: ModelVariant, checkpoint: str | None, image_size: int, init_seed: int) -> Sam2Model:
        """A random variant at random init (seeded), else the official file (``*.pt``), a
        transformers folder or a hub id; what differs between SAM 2 and EdgeTAM are the hooks below."""
        if checkpoint is None and variant.make_config is not None:
            with torch.random.fork_rng():
                torch.manual_seed(init_seed)
                return self._random_model(variant.make_config(image_size))
        config = self._config_of(variant, image_size)
        source, official = checkpoint if checkpoint is not None else variant.hub_id, self._official_file(variant)
        if source is None:
            raise SamtuneError(f"model.name={variant.name!r} has no download: set model.checkpoint to its official weights file ({official}), "
                               f"or a transformers {self.display_name} folder.")  # fmt: skip
        path = Path(source)
        if path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
            if not path.is_file():
                raise CheckpointError(f"model.checkpoint={source!r}: no such file; check the path (relative paths are relative to the current "
                                      f"directory) or download {official} first.")  # fmt: skip
            return self._load_official(path, config, variant.name)
        if path.is_file():
            raise SamtuneError(f"model.checkpoint={source!r} is not an official {self.display_name} file or a Hugging Face model folder; "
                               f"point it at {official} or a folder with config.json and model.safetensors.")  # fmt: skip
        return self._load_folder(source, variant.name, path, image_size)  # a folder, or a hub id (facebook/sam2.1-hiera-tiny has a "suffix")

    display_name = "SAM 2"

    @staticmethod
    def _random_model(config) -> Sam2Model:
        model = Sam2Model(config)
        _init_random(model)
        single_mask_token_only(model)
        return model

    @staticmethod
    def _official_file(variant: ModelVariant) -> str:
        return _OFFICIAL_FILES.get(variant.name, "the official .pt file (e.g. sam2.1_hiera_tiny.pt)")

    @staticmethod
    def _load_official(path: Path, config, name: str) -> Sam2Model:
        return load_official_sam2(path, config, name)

    @staticmethod
    def _load_folder(source: str, name: str, path: Path, image_size: int) -> Sam2Model:
        return _load_hf(source, name, path, image_size)

    def video_model(self, model, variant: ModelVariant, checkpoint: str | None):
        """Memory modules from the official file (``model.checkpoint: *.pt``), from a Hugging Face
        folder or hub id saved from ``Sam2VideoModel``, or at random init for random variants
        (then propagation shows only that the path runs: an untrained memory carries nothing)."""
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            if variant.make_config is None:
                raise SamtuneError(f"model.name={variant.name!r}: memory propagation needs its official weights file; set model.checkpoint "
                                   f"({_OFFICIAL_FILES.get(variant.name, 'the .pt file')}).")  # fmt: skip
            return video_model_from(model)
        if Path(source).is_file():
            return video_model_from(model, Path(source))
        return video_model_from_folder(model, source)

    @staticmethod
    def _config_of(variant: ModelVariant, image_size: int) -> Sam2Config:
        if variant.make_config is not None:
            return variant.make_config(image_size)
        return sam2_config(image_size, HIERA[variant.official_variant])

    def load_full(self, folder) -> Sam2Model:
        model = _from_pretrained(str(folder))
        single_mask_token_only(model)
        return model

    def encoder_depth(self, model) -> int:
        return sum(_sam2_config(model).vision_config.backbone_config.blocks_per_stage)

    def make_transform(self, image_size: int) -> SquareResizeTransform:
        return SquareResizeTransform(image_size)

    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        # Not Sam2Model.get_image_embeddings: it runs under no_grad, which would cut the gradient to the encoder's LoRA.
        fpn = model.vision_encoder(pixel_values).fpn_hidden_states  # strides 4, 8, 16
        decoder = model.mask_decoder
        image = fpn[2] + model.no_memory_embedding.reshape(1, -1, 1, 1)
        return ImageEmbeddings(image, (decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])))

    @staticmethod
    def _forward_embeddings(embeddings):
        return [*embeddings.high_res_features, embeddings.image_embeddings]

    def prompt_dim(self, model) -> int:
        return _sam2_config(model).prompt_encoder_config.hidden_size

    @staticmethod
    def _decode(model, embeddings, sparse, dense, multimask_output):
        """B×P×T×C sparse and B×C×g×g dense prompts on ``embeddings`` -> B×P×M×s×s, B×P×M."""
        image = embeddings.image_embeddings
        positions = model.get_image_wide_positional_embeddings().repeat(image.shape[0], 1, 1, 1)
        low_res, iou = model.mask_decoder(
            image_embeddings=image, image_positional_embeddings=positions, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask_output, high_resolution_features=list(embeddings.high_res_features),
        )[:2]  # fmt: skip
        return low_res, iou

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_hf, merge_model

        if fmt not in self.export_formats:
            raise SamtuneError(
                f"--format {fmt!r}: a SAM 2 model exports hf (a transformers Sam2Model folder, LoRA merged). sam-pth is "
                "SAM v1's layout, and an official SAM 2 .pt also holds the video memory modules, which the image model does not have."
            )
        return export_hf(merge_model(model), Path(out))

    def component_of(self, parameter_name: str) -> str:
        if parameter_name.endswith("no_memory_embedding"):  # added to the encoder's output
            return "image_encoder"
        return super().component_of(parameter_name)


def _sam2_config(model) -> Sam2Config:
    config = getattr(model, "config", None)  # a PeftModel forwards .config to the base model
    if not isinstance(config, Sam2Config):
        raise TypeError(f"expected a transformers Sam2Model (or a peft model around one), got {type(model).__name__}")
    return config


@torch.no_grad()
def _init_random(model: Sam2Model) -> None:
    """Initialisation a random SAM 2 can learn from: one Fourier matrix for image and prompts
    (``same_positional_tables``) and ViT-style position embeddings (std 0.02; transformers and the
    official Hiera start them at zero, which only loaded weights overwrite)."""
    same_positional_tables(model)
    backbone = model.vision_encoder.backbone
    torch.nn.init.trunc_normal_(backbone.pos_embed, std=0.02)
    torch.nn.init.trunc_normal_(backbone.pos_embed_window, std=0.02)


def _from_pretrained(source: str, config: Sam2Config | None = None) -> Sam2Model:
    """``Sam2Model.from_pretrained`` (a folder or hub repo saved from Sam2Model, or from Sam2VideoModel:
    the memory weights are then not loaded). Class prompts in a samtune folder are loaded by the caller."""
    model = Sam2Model.from_pretrained(source, config=config) if config is not None else Sam2Model.from_pretrained(source)
    return model.eval()


def _load_hf(source: str, name: str, path: Path, image_size: int) -> Sam2Model:
    if path.is_dir() and not (path / "config.json").is_file():
        raise SamtuneError(f"{path}: not a Hugging Face model folder (no config.json).")
    if path.is_absolute() and not path.exists():  # never a hub id
        raise SamtuneError(f"model.checkpoint={source!r}: no such folder; check the path, or set an official .pt file (e.g. sam2.1_hiera_tiny.pt).")
    try:
        config = with_image_size(Sam2Config.from_pretrained(source), image_size)
        model = _from_pretrained(source, config)
    except OSError as exc:  # offline, unknown hub id, or missing weight files
        raise SamtuneError(
            f"could not load SAM 2 weights for model.name={name!r} from {source!r}: {exc}\n"
            "Set model.checkpoint to a local Hugging Face folder (e.g. a `huggingface-cli download "
            f"{source}` copy) or an official .pt file (e.g. sam2.1_hiera_tiny.pt), or run online so the hub id can be downloaded."
        ) from None
    single_mask_token_only(model)
    return model


_OFFICIAL_FILES = {
    "sam2-hiera-tiny": "sam2.1_hiera_tiny.pt",
    "sam2-hiera-small": "sam2.1_hiera_small.pt",
    "sam2-hiera-base-plus": "sam2.1_hiera_base_plus.pt",
    "sam2-hiera-large": "sam2.1_hiera_large.pt",
    "medsam2": "MedSAM2_latest.pt, from the MedSAM2 release (huggingface.co/wanglab/MedSAM2)",
}

_SAM2_LICENCE = "Apache-2.0 (LICENSE of facebookresearch/sam2, which covers the released checkpoints)"
register_model(ModelVariant("sam2-hiera-tiny", "sam2", "SAM 2.1 Hiera-T (Ravi et al., 2024)", 1024, "facebook/sam2.1-hiera-tiny", "hiera_tiny", licence=_SAM2_LICENCE))
register_model(ModelVariant("sam2-hiera-small", "sam2", "SAM 2.1 Hiera-S", 1024, "facebook/sam2.1-hiera-small", "hiera_small", licence=_SAM2_LICENCE))
register_model(ModelVariant("sam2-hiera-base-plus", "sam2", "SAM 2.1 Hiera-B+", 1024, "facebook/sam2.1-hiera-base-plus", "hiera_base_plus", licence=_SAM2_LICENCE))
register_model(ModelVariant("sam2-hiera-large", "sam2", "SAM 2.1 Hiera-L", 1024, "facebook/sam2.1-hiera-large", "hiera_large", licence=_SAM2_LICENCE))
# MedSAM2 runs at 512 px (its sam2.1_hiera_t512.yaml: image_size 512)
register_model(ModelVariant("medsam2", "sam2", "MedSAM2 (Ma et al., 2025): SAM 2.1 Hiera-T fine-tuned on 3D medical images; set model.checkpoint: MedSAM2_latest.pt", 512, None, "hiera_tiny"))
register_model(ModelVariant("sam2-tiny-random", "sam2", "random-init small SAM 2 (Hiera) for tests and offline runs", 128, None, None, make_tiny_sam2_config,
                            licence="none: random initialisation"))
