"""EdgeTAM (Zhou et al., "EdgeTAM: On-Device Track Anything Model", CVPR 2025) as a model family,
through transformers' ``EdgeTamModel`` (the image model) and ``EdgeTamVideoModel`` (memory propagation).

EdgeTAM is SAM 2 with a RepViT-M1 encoder (4.7 M parameters, in place of Hiera; adapters/repvit.py,
plugged in without timm: adapters/edgetam_config.py) under SAM 2's FPN neck, prompt encoder and mask
decoder, and a 2D spatial perceiver that compresses the memories its video tracker attends to. The image
model is SAM 2's in everything but the encoder, so the family is ``Sam2Family``: the same square resize
and ImageNet normalisation, ``encode_images`` (stride-16 map + ``no_memory_embedding``, the two finer
maps through the decoder's ``conv_s0``/``conv_s1``), prompt and class decoding, the single-mask token
without the stability fallback; only the encoder's module names, loading and the video model differ.

Variants: ``edgetam`` (the released model, 1024 px, 9.1 M parameters; weights from a transformers
folder or hub id, by default ``yonigozlan/EdgeTAM-hf``, the checkpoint transformers' EdgeTAM configs
name, or the official ``edgetam.pt`` from huggingface.co/facebook/EdgeTAM) and ``edgetam-tiny-random``
(random init, 1.8 M parameters, for tests and offline runs).

LoRA. RepViT has no Linear layer and no self-attention: its token mixers are depthwise convolutions
(which peft's LoRA cannot merge: groups > 1) and its only attention is squeeze-and-excitation's channel
attention on every other block. The encoder roles are therefore 1×1 convolutions of the RepViT blocks:
``encoder_attention`` = SE's squeeze ``se.fc1``, ``encoder_attention_out`` = its excitation ``se.fc2``,
``encoder_mlp`` = the channel mixer's ``conv1.c``/``conv2.c`` (``lora_module_types`` lets LoRA wrap
Conv2d). The layers between stages (``stages_i.downsample``) get no role, as Hiera's skip projection in
SAM 2. ``adapter.lora.blocks`` counts RepViT blocks across stages (RepViT-M1: 2 + 2 + 14 + 2 = 20).

Weights. A transformers folder or hub repo (saved from ``EdgeTamModel`` or ``EdgeTamVideoModel``: the
image modules have the same names) is read with samtune's backbone config and loaded strictly; the
memory modules of a video folder are left to ``video_model``. The official ``edgetam.pt``
(``{"model": state_dict}`` of the EdgeTAM repository's ``SAM2Base``) is read with
``torch.load(weights_only=True)`` and converted in memory as SAM 2's files are
(adapters/sam2_checkpoints.py), its encoder ``image_encoder.trunk.body.*`` (the official ``TimmBackbone``
holds timm's model as ``body``) becoming ``vision_encoder.backbone.timm_model.*`` (transformers'
convert_edgetam_to_hf.py does the same); the memory modules, the spatial perceiver among them, are left
out. That layout is taken from those two sources and checked on a key list made from them, not on the
released file (not downloadable here).

Memory propagation (``video_model``): ``EdgeTamVideoModel`` around the image model's own modules (LoRA
merged; shared, so BatchNorm folded for prediction stays folded) and the memory modules of a transformers
folder or hub repo saved from ``EdgeTamVideoModel``, or at random init for random variants. The official file's memory modules are not converted (their layout,
RoPE memory attention and perceiver with fused k/v, is not verified here): with ``edgetam.pt`` as base
weights, propagation is by box.

Export: ``hf`` only (a transformers ``EdgeTamModel`` folder, LoRA merged, loadable by transformers where
timm is installed, and by samtune as ``model.checkpoint``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import EdgeTamConfig, EdgeTamModel

from samtune.adapters.catalog import ModelVariant, register_family, register_model
from samtune.adapters.checkpoint_files import CheckpointError, load_exactly, load_part, load_state_dict_file
from samtune.adapters.edgetam_config import (
    REPVIT_ARCHITECTURES,
    TINY_MEMORY,
    config_from_dict,
    edgetam_config,
    edgetam_video_config,
    layout_of,
    make_tiny_edgetam_config,
    single_mask_token_only,
    with_image_size,
)
from samtune.adapters.family import CLASS_PROMPTS
from samtune.adapters.sam2 import _DECODER_ATTENTION, Sam2Family
from samtune.adapters.sam2_checkpoints import is_video_only_hf, official_to_hf
from samtune.adapters.sam2_config import same_positional_tables
from samtune.errors import SamtuneError

_ENCODER = r"vision_encoder\.backbone\.timm_model\."
_ENCODER_BLOCK = _ENCODER + r"stages_\d+\.blocks\.\d+\."
OFFICIAL_FILE = "edgetam.pt, from huggingface.co/facebook/EdgeTAM"


@register_family
class EdgeTamFamily(Sam2Family):
    """SAM 2's image family with RepViT's encoder modules (see the module docstring)."""

    name = "edgetam"
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"se\.fc1",  # squeeze-and-excitation: the channel attention
        "encoder_attention_out": _ENCODER_BLOCK + r"se\.fc2",
        "encoder_mlp": _ENCODER_BLOCK + r"channel_mixer\.conv[12]\.c",
        "decoder_attention": _DECODER_ATTENTION,
    }
    lora_module_types = (torch.nn.Linear, torch.nn.Conv2d)
    encoder_block = re.compile(_ENCODER + r"stages_(\d+)\.blocks\.(\d+)\.")
    export_formats = ("hf",)

    display_name = "EdgeTAM"  # build() is Sam2Family's, through these hooks

    @staticmethod
    def _random_model(config) -> EdgeTamModel:
        model = EdgeTamModel(config)
        init_random(model)
        single_mask_token_only(model)
        return model

    @staticmethod
    def _official_file(variant: ModelVariant) -> str:
        return OFFICIAL_FILE

    @staticmethod
    def _load_official(path: Path, config, name: str) -> EdgeTamModel:
        return load_official_edgetam(path, config, name)

    @staticmethod
    def _load_folder(source: str, name: str, path: Path, image_size: int) -> EdgeTamModel:
        return load_folder(local_folder(source, name), image_size)

    @staticmethod
    def _config_of(variant: ModelVariant, image_size: int) -> EdgeTamConfig:
        if variant.make_config is not None:
            return variant.make_config(image_size)
        return edgetam_config(image_size, REPVIT_ARCHITECTURES[variant.official_variant])

    def load_full(self, folder) -> EdgeTamModel:
        return load_folder(Path(folder), None)

    def video_model(self, model, variant: ModelVariant, checkpoint: str | None):
        """Memory modules from a transformers folder or hub repo saved from ``EdgeTamVideoModel``, or
        at random init for random variants (propagation then only shows that the path runs)."""
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            return video_model_from(model, memory=None, **(TINY_MEMORY if variant.make_config is not None else {}))
        if Path(source).is_file():
            raise SamtuneError(
                f"model.checkpoint={source!r}: samtune converts the official EdgeTAM file for the image model only; memory propagation reads "
                "the memory modules from transformers' EdgeTAM (model.checkpoint: a folder or hub id saved from EdgeTamVideoModel, e.g. "
                "yonigozlan/EdgeTAM-hf). Set that, or eval.propagation=box."
            )
        return video_model_from_folder(model, local_folder(source, variant.name))

    def encoder_depth(self, model) -> int:
        return sum(layout_of(_edgetam_config(model)).depths)

    def block_index(self, module_name: str, model=None) -> int | None:
        """Global index of RepViT block (stage s, block j): the blocks of earlier stages come first."""
        m = self.encoder_block.search(module_name)
        if m is None:
            return None
        if model is None:
            raise ValueError("EdgeTamFamily.block_index needs the model (its stage depths)")
        return sum(layout_of(_edgetam_config(model)).depths[: int(m[1])]) + int(m[2])

    def prompt_dim(self, model) -> int:
        return _edgetam_config(model).prompt_encoder_config.hidden_size

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_hf, merge_model

        if fmt not in self.export_formats:
            raise SamtuneError(f"--format {fmt!r}: an EdgeTAM model exports hf (a transformers EdgeTamModel folder, LoRA merged; "
                               "transformers loads it where timm is installed, samtune as model.checkpoint).")  # fmt: skip
        return export_hf(merge_model(model), Path(out))


@torch.no_grad()
def init_random(model: EdgeTamModel) -> None:
    """Initialisation a random EdgeTAM can learn from: one Fourier matrix for image and prompts
    (``same_positional_tables``), and RepViT's BatchNorm statistics from one batch of random pixels
    with unit scales. Training from scratch normalises with batch statistics; samtune's RepViT always
    uses the stored ones (adapters/repvit.py), which at their defaults (0, 1) let the features fade
    stage by stage (std 0.12 -> 0.002 over the tiny model's four stages, and the residual MLPs, whose
    BN scale timm starts at 0, would carry nothing, nor would LoRA on them)."""
    same_positional_tables(model)
    encoder = model.vision_encoder.backbone.timm_model
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batch
        norm.weight.fill_(1.0)
    torch.nn.Module.train(encoder)  # batch statistics for once (RepViTFeatures.train keeps BatchNorm frozen)
    encoder(torch.randn(4, 3, 2 * encoder.layout.stride, 2 * encoder.layout.stride))
    encoder.eval()
    for norm in norms:
        norm.momentum = 0.1


def _edgetam_config(model) -> EdgeTamConfig:
    config = getattr(model, "config", None)  # a PeftModel forwards .config to the base model
    if not isinstance(config, EdgeTamConfig):
        raise TypeError(f"expected a transformers EdgeTamModel (or a peft model around one), got {type(model).__name__}")
    return config


# --- weights ---------------------------------------------------------------------------------------


def is_video_only_edgetam(key: str) -> bool:
    """An EdgeTamVideoModel key that EdgeTamModel does not have: SAM 2's memory modules and the perceiver."""
    return is_video_only_hf(key) or key.startswith("spatial_perceiver.")


def local_folder(source: str, name: str) -> Path:
    """A local Hugging Face folder, or a hub repo's config and weights downloaded into the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SamtuneError(f"{path}: not a Hugging Face model folder (no config.json).")
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:  # never a hub id
        raise SamtuneError(f"model.checkpoint={source!r}: no such folder; check the path, or set the official {OFFICIAL_FILE}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except Exception as exc:  # offline, unknown repo, no network: every way a download fails is this one message
        raise SamtuneError(
            f"could not load EdgeTAM weights for model.name={name!r} from {source!r}: {type(exc).__name__}: {exc}\n"
            f"Set model.checkpoint to a local Hugging Face folder (e.g. a `huggingface-cli download {source}` copy) or the official "
            f"{OFFICIAL_FILE}, or run online so the hub id can be downloaded."
        ) from None


def read_folder(folder: Path) -> tuple[dict, dict]:
    """(config.json as a dict, every tensor of model.safetensors or of its shards)."""
    values = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_state_dict_file(folder / name))
    return values, state


def load_folder(folder: Path, image_size: int | None) -> EdgeTamModel:
    """A transformers EdgeTAM folder (image or video model; a samtune export or full-mode checkpoint)
    -> EdgeTamModel, eval mode, every image-model weight from the folder. Class prompts of a samtune
    folder are left to the caller (finetune.checkpoints adds the module first)."""
    values, state = read_folder(folder)
    config = config_from_dict(values)
    if image_size is not None:
        config = with_image_size(config, image_size)
    state = {k: v for k, v in state.items() if not is_video_only_edgetam(k) and not k.startswith(CLASS_PROMPTS + ".")}
    with torch.device("meta"):
        model = EdgeTamModel(config)
    load_exactly(model, state, str(folder), "transformers' EdgeTamModel of its config.json",
                 "Use a folder saved from transformers' EdgeTamModel / EdgeTamVideoModel or written by samtune.")  # fmt: skip
    single_mask_token_only(model)
    return model.eval()


def official_to_hf_edgetam(sd: dict) -> tuple[dict, list[str], list[str]]:
    """Official EdgeTAM keys -> EdgeTamModel keys: (converted, memory keys left out, keys that map to nothing)."""
    body = "image_encoder.trunk.body."
    renamed = {("image_encoder.trunk.timm_model." + k[len(body):] if k.startswith(body) else k): v for k, v in sd.items()}
    perceiver = [k for k in renamed if k.startswith("spatial_perceiver.")]
    hf, left_out, unknown = official_to_hf({k: v for k, v in renamed.items() if k not in perceiver})
    return hf, left_out + perceiver, unknown


def load_official_edgetam(path_or_sd, config: EdgeTamConfig, variant_name: str = "") -> EdgeTamModel:
    """The official edgetam.pt (path, or a state dict) -> EdgeTamModel of ``config``, eval mode, strictly."""
    source = "<state dict>" if isinstance(path_or_sd, dict) else str(path_or_sd)
    sd = {k: v.detach().clone() for k, v in path_or_sd.items()} if isinstance(path_or_sd, dict) else load_state_dict_file(path_or_sd)
    stem = sd.get("image_encoder.trunk.body.stem.conv2.c.weight")  # (width, width / 2, 3, 3)
    if stem is None:
        if "image_encoder.trunk.patch_embed.proj.weight" in sd:
            raise CheckpointError(f"{source}: this is a SAM 2 checkpoint (Hiera encoder), not EdgeTAM; use a sam2-hiera-* model.name for it.")
        if "image_encoder.patch_embed.proj.weight" in sd or "image_encoder.patch_embed.seq.0.c.weight" in sd:
            raise CheckpointError(f"{source}: this is a SAM (v1) or MobileSAM checkpoint, not EdgeTAM; use a sam-vit-*, medsam-vit-base or mobile-sam model.name.")
        raise CheckpointError(f"{source}: no RepViT stem ('image_encoder.trunk.body.stem.conv2.c.weight') among {len(sd)} keys "
                              f"(first: {list(sd)[:3]}); this is not an official EdgeTAM checkpoint. Use {OFFICIAL_FILE}.")  # fmt: skip
    width = layout_of(config).embed_dims[0]
    if stem.shape[0] != width:
        raise CheckpointError(f"{source}: the encoder is a RepViT {stem.shape[0]} wide; model.name={variant_name!r} is {width} wide. "
                              "Use model.name: edgetam for the released weights.")  # fmt: skip
    hf, _memory, unknown = official_to_hf_edgetam(sd)
    with torch.device("meta"):
        model = EdgeTamModel(config)
    load_exactly(model, hf, source, f"the EdgeTAM image model of model.name={variant_name!r} (transformers key names)",
                 f"Use an unmodified {OFFICIAL_FILE}.", unknown=unknown)  # fmt: skip
    single_mask_token_only(model)
    return model.eval()


# --- the video tracker -----------------------------------------------------------------------------

# EdgeTamModel's top-level modules; EdgeTamVideoModel has each under the same name, with the same code
IMAGE_MODULES = ("vision_encoder", "prompt_encoder", "mask_decoder", "shared_image_embedding", "no_memory_embedding")


def video_model_from(image_model, memory: dict | None = None, **fields):
    """``EdgeTamVideoModel`` around an image model (LoRA merged first), eval mode: its image modules
    *are* the image model's (shared, not copied), so whatever prediction arranged in them (BatchNorm
    folded into RepViT's convolutions, channels-last weights: finetune.runtime.inference_model) holds
    in the tracker too; the memory modules come from ``memory`` (transformers' keys), or stay at random
    init when it is None. ``fields``: the memory-module config (``edgetam_video_config``)."""
    from transformers import EdgeTamVideoModel

    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    video = EdgeTamVideoModel(edgetam_video_config(image.config, **fields))  # on the CPU: its rotary tables are buffers no state dict holds
    extra = {k.split(".")[0] for k in image.state_dict()} - {*IMAGE_MODULES, CLASS_PROMPTS}
    if extra:
        raise SamtuneError(f"the image model has modules EdgeTAM's video model has no place for: {sorted(extra)}.")
    for name in IMAGE_MODULES:
        setattr(video, name, getattr(image, name))
    if memory is not None:
        load_part(video, memory, is_video_only_edgetam, "this EdgeTAM video model")
    return video.eval()


def video_model_from_folder(image_model, folder: Path):
    """``video_model_from`` with the memory modules (and their config) of a folder saved from
    ``EdgeTamVideoModel``; a folder of the image model has none, which is an error rather than a
    silently random memory."""
    from transformers import EdgeTamVideoConfig, PreTrainedConfig

    values, state = read_folder(folder)
    memory = {k: v for k, v in state.items() if is_video_only_edgetam(k)}
    if values.get("model_type") != "edgetam_video" or not memory:
        raise SamtuneError(f"{folder}: holds no memory modules (model_type {values.get('model_type')!r}): it was saved from the image model. "
                           "Set model.checkpoint to a folder or hub id saved from EdgeTamVideoModel, or use eval.propagation=box.")  # fmt: skip
    # what the folder says of its memory modules; the sizes tied to the input size are computed
    sized = {"vision_config", "prompt_encoder_config", "mask_decoder_config", "image_size", "memory_attention_rope_feat_sizes", "memory_attention_rope_k_sizes"}
    names = set(EdgeTamVideoConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__) - sized
    return video_model_from(image_model, memory, **{k: v for k, v in values.items() if k in names})


register_model(ModelVariant("edgetam", "edgetam", "EdgeTAM (Zhou et al., 2025): SAM 2 with a RepViT-M1 encoder and a spatial-perceiver memory", 1024,
                            "yonigozlan/EdgeTAM-hf", "repvit_m1", licence="Apache-2.0 (LICENSE of facebookresearch/EdgeTAM)"))  # fmt: skip
register_model(ModelVariant("edgetam-tiny-random", "edgetam", "random-init small EdgeTAM (RepViT) for tests and offline runs", 128, None, None,
                            make_tiny_edgetam_config, licence="none: random initialisation"))  # fmt: skip
