"""MobileSAM (Zhang et al., "Faster Segment Anything: Towards Lightweight SAM for Mobile
Applications", 2023) as a model family: SAM's prompt encoder and mask decoder (transformers'
``SamModel``) with the ViT image encoder replaced by TinyViT-5M (samtune.adapters.tiny_vit),
distilled from SAM ViT-H; 1024 px input, B×256×64×64 image embeddings like SAM.

The model is a ``transformers.SamModel`` whose ``vision_encoder`` is a TinyViT returning what
SamModel reads from its own encoder (``output[0]`` / ``.last_hidden_state``, B×256×g×g), so
everything after the encoder — prompts, decoder, ``SamFamily``'s encode/decode — is SAM's.
``config.vision_config`` no longer describes the encoder (it keeps the image size, the stride as
``patch_size`` and the positional-encoding width that the prompt encoder reads, with zero ViT
blocks); the TinyViT layout is stored as ``config.tiny_vit`` (written to config.json), from which
``load_full`` rebuilds the model. transformers' ``SamModel.from_pretrained`` cannot rebuild it.

Weights: ``model.checkpoint: mobile_sam.pt`` (the official file, MobileSAM repository
``weights/mobile_sam.pt``; keys ``image_encoder.*`` / ``prompt_encoder.*`` / ``mask_decoder.*``)
is read without executing code (``torch.load(weights_only=True)`` or safetensors): the encoder
keys change prefix (``image_encoder.`` -> ``vision_encoder.``), TinyViT's unused ImageNet
classifier (``image_encoder.norm_head.*``, ``image_encoder.head.*``) is dropped, and the prompt
encoder / mask decoder go through the SAM key conversion (samtune.adapters.official_keys).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

from samtune.adapters.catalog import ModelVariant, register_family, register_model
from samtune.adapters.checkpoint_files import CheckpointError, load_exactly, load_state_dict_file
from samtune.adapters.family import CLASS_PROMPTS, ModelFamily
from samtune.adapters.sam import _DECODER_ATTENTION, SamFamily
from samtune.adapters.tiny_vit import TinyViT, TinyViTConfig
from samtune.errors import SamtuneError

ENCODER_PREFIX = "image_encoder."  # official MobileSAM
HF_ENCODER_PREFIX = "vision_encoder."  # SamModel
# TinyViT's ImageNet classifier, saved in mobile_sam.pt but never run by MobileSAM
_CLASSIFIER_KEYS = ("norm_head.weight", "norm_head.bias", "head.weight", "head.bias")
_CLASSIFIER_CLASSES = 1000  # the reference builds TinyViT with num_classes=1000: its strict load wants these shapes
_TIED = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")

TINY_VIT_5M = TinyViTConfig()  # MobileSAM's encoder (mobile_sam.build_sam.build_sam_vit_t)
# A 4-stage TinyViT of ~0.2 M parameters for tests and the demo; windows chosen so that at 64 and
# 128 px both whole-window and padded stages occur.
TINY_VIT_TEST = TinyViTConfig(
    embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), window_sizes=(4, 4, 8, 4), out_chans=64,
)  # fmt: skip

_ENCODER_BLOCK = r"vision_encoder\.layers\.\d+\.blocks\.\d+\."


class SamTinyViT(TinyViT):
    """TinyViT answering as SamModel's ``vision_encoder``: ``output[0]`` = B×C×g×g embeddings."""

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamVisionEncoderOutput:  # kwargs: SamModel's output flags
        return SamVisionEncoderOutput(last_hidden_state=super().forward(pixel_values))

    def get_input_embeddings(self):  # SamModel.get_input_embeddings delegates here
        return self.patch_embed


def mobile_sam_config(image_size: int, encoder: TinyViTConfig = TINY_VIT_5M, **decoder) -> SamConfig:
    """A SamConfig for a TinyViT encoder at ``image_size`` px; prompt encoder and mask decoder are
    SAM's (the sizes of every released SAM: 256 wide = the encoder's ``out_chans``, 2 two-way
    layers, 8 heads, MLP 2048, IoU head 3×256) unless ``decoder`` overrides SamMaskDecoderConfig fields."""
    stride = encoder.stride
    if image_size % stride or image_size < 2 * stride:
        raise SamtuneError(f"model.image_size={image_size}: a TinyViT encoder needs a multiple of {stride}, at least {2 * stride}")
    dim = encoder.out_chans  # D: image embeddings, prompt tokens and decoder share one width
    vision = SamVisionConfig(
        hidden_size=encoder.embed_dims[-1], num_hidden_layers=0, num_attention_heads=encoder.num_heads[-1],
        image_size=image_size, patch_size=stride, output_channels=dim, num_pos_feats=dim // 2,
        use_abs_pos=False, use_rel_pos=False, global_attn_indexes=[], layer_norm_eps=1e-6, initializer_range=0.02,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=dim, image_size=image_size, patch_size=stride, mask_input_channels=16, layer_norm_eps=1e-6)
    # the official two-way transformer's LayerNorms use torch's default eps (see official_config)
    decoder_fields = dict(hidden_size=dim, num_hidden_layers=2, num_attention_heads=8, mlp_dim=2048, iou_head_depth=3, iou_head_hidden_dim=256, layer_norm_eps=1e-5)
    decoder_fields.update(decoder)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=SamMaskDecoderConfig(**decoder_fields))
    config.tiny_vit = encoder.to_dict()  # saved in config.json; load_full rebuilds the encoder from it
    return config


def make_tiny_mobile_config(image_size: int = 128) -> SamConfig:
    """``mobile-sam-tiny``: the small TinyViT above with the decoder of the ``tiny`` SAM (64 wide)."""
    return mobile_sam_config(image_size, TINY_VIT_TEST, mlp_dim=256, iou_head_hidden_dim=64, num_attention_heads=4, layer_norm_eps=1e-6)


def _encoder_config(config: SamConfig) -> TinyViTConfig:
    layout = getattr(config, "tiny_vit", None)
    if not layout:
        raise SamtuneError("this SamConfig has no `tiny_vit` entry: it is not a MobileSAM (TinyViT) model")
    return TinyViTConfig(**layout)


def _with_image_size(config: SamConfig, image_size: int) -> SamConfig:
    """The same architecture at another input size (TinyViT has no position table to resize)."""
    fields = ("num_hidden_layers", "num_attention_heads", "mlp_dim", "iou_head_depth", "iou_head_hidden_dim", "layer_norm_eps")
    return mobile_sam_config(image_size, _encoder_config(config), **{k: getattr(config.mask_decoder_config, k) for k in fields})


def assemble(config: SamConfig, meta: bool = False) -> SamModel:
    """A SamModel with a TinyViT ``vision_encoder`` (random init). ``meta``: prompt encoder and
    decoder without storage, for weights loaded with ``assign=True`` (the TinyViT is built on the
    CPU: its bias-index buffers are not in any state dict)."""
    if meta:
        with torch.device("meta"):
            model = SamModel(config)  # vision_config has no ViT blocks: a patch embedding and a neck, replaced below
    else:
        model = SamModel(config)
    model.vision_encoder = SamTinyViT(_encoder_config(config))
    return model


def _load_into(model: SamModel, state: dict, source: str, named=lambda k: k) -> SamModel:
    """Strict load (tied positional matrix filled from either copy); errors name keys via ``named``."""
    state = dict(state)
    for a, b in (_TIED, _TIED[::-1]):
        if a not in state and b in state:
            state[a] = state[b]
    load_exactly(model, state, source, "the MobileSAM model", "Use an unmodified mobile_sam.pt (or a folder written by samtune for the same model.name).",
                 named=named, tie=True)  # fmt: skip
    return model.eval()


def official_to_hf(sd: dict, config: SamConfig) -> tuple[dict, list[str]]:
    """Official MobileSAM keys -> SamModel keys: (converted dict, keys that map to nothing)."""
    from samtune.adapters.official_keys import _convert_official

    encoder = {HF_ENCODER_PREFIX + k[len(ENCODER_PREFIX):]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    for key in _CLASSIFIER_KEYS:
        encoder.pop(HF_ENCODER_PREFIX + key, None)
    rest, unknown = _convert_official({k: v for k, v in sd.items() if not k.startswith(ENCODER_PREFIX)}, config)
    return {**encoder, **rest}, unknown


def hf_to_official(hf_sd: dict) -> dict:
    """SamModel (TinyViT) state dict -> the official MobileSAM layout, with a neutral ImageNet
    classifier (ones/zeros: never run) so that ``mobile_sam``'s strict ``load_state_dict`` accepts it."""
    from samtune.adapters.official_keys import hf_to_official_state_dict

    encoder = {ENCODER_PREFIX + k[len(HF_ENCODER_PREFIX):]: v for k, v in hf_sd.items() if k.startswith(HF_ENCODER_PREFIX)}
    out = hf_to_official_state_dict({k: v for k, v in hf_sd.items() if not k.startswith(HF_ENCODER_PREFIX)})
    width = encoder[ENCODER_PREFIX + "neck.0.weight"].shape[1]  # (256, C_last, 1, 1)
    encoder[ENCODER_PREFIX + "norm_head.weight"] = torch.ones(width)
    encoder[ENCODER_PREFIX + "norm_head.bias"] = torch.zeros(width)
    encoder[ENCODER_PREFIX + "head.weight"] = torch.zeros(_CLASSIFIER_CLASSES, width)
    encoder[ENCODER_PREFIX + "head.bias"] = torch.zeros(_CLASSIFIER_CLASSES)
    return {**encoder, **out}


def load_official_mobile_sam(path_or_sd, image_size: int = 1024, encoder: TinyViTConfig = TINY_VIT_5M) -> SamModel:
    """An official MobileSAM checkpoint (path or state dict) -> SamModel with TinyViT, eval mode."""
    from samtune.adapters.official_keys import _BACKWARD, _rename

    source = "<state dict>" if isinstance(path_or_sd, Mapping) else str(path_or_sd)
    if isinstance(path_or_sd, Mapping):  # copies: the model adopts these tensors (assign=True)
        sd = {k: v.detach().clone() for k, v in path_or_sd.items()}
    else:
        sd = load_state_dict_file(path_or_sd)
    if ENCODER_PREFIX + "patch_embed.proj.weight" in sd:
        raise CheckpointError(f"{source}: this is a SAM ViT checkpoint, not MobileSAM; use model.name: sam-vit-base/large/huge for it.")
    if ENCODER_PREFIX + "patch_embed.seq.0.c.weight" not in sd:
        raise CheckpointError(
            f"{source}: no TinyViT patch embedding ('image_encoder.patch_embed.seq.0.c.weight') among {len(sd)} keys "
            f"(first: {list(sd)[:3]}); this is not a MobileSAM checkpoint. Use the official mobile_sam.pt."
        )
    config = mobile_sam_config(image_size, encoder)
    hf_sd, unknown = official_to_hf(sd, config)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) that are not MobileSAM's: {unknown[:12]}. Use an unmodified mobile_sam.pt.")

    def official_name(key: str) -> str:
        if key.startswith(HF_ENCODER_PREFIX):
            return ENCODER_PREFIX + key[len(HF_ENCODER_PREFIX):]
        return _rename(key, _BACKWARD) or key

    return _load_into(assemble(config, meta=True), hf_sd, source, official_name)


@register_family
class MobileSamFamily(SamFamily):
    """SAM's prompting, decoding, class prompts and preprocessing; TinyViT's encoder modules.

    LoRA roles name the Linear layers of the TinyViT blocks (stages 1..; the MBConv stage 0 has
    none). ``adapter.lora.blocks`` counts those attention blocks from 0 across stages (MobileSAM:
    2 + 6 + 2 = 10 blocks); ``encoder_depth`` is that count.
    """

    name = "mobile_sam"
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"attn\.qkv",  # q, k, v fused in one Linear, per head
        "encoder_attention_out": _ENCODER_BLOCK + r"attn\.proj",
        "encoder_mlp": _ENCODER_BLOCK + r"mlp\.fc[12]",
        "decoder_attention": _DECODER_ATTENTION,
    }
    encoder_block = re.compile(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    attention_kinds = ("sdpa",)  # TinyViT's attention with its bias table through F.scaled_dot_product_attention
    export_formats = ("sam-pth", "onnx")

    def set_attention(self, model, kind: str) -> None:
        ModelFamily.set_attention(self, model, kind)

    def build(self, variant: ModelVariant, checkpoint: str | None, image_size: int, init_seed: int) -> SamModel:
        encoder = TINY_VIT_5M if variant.make_config is None else _encoder_config(variant.make_config(image_size))
        if checkpoint is None:
            if variant.make_config is None:
                raise SamtuneError(
                    f"model.name={variant.name!r} has no download: set model.checkpoint to the official MobileSAM weights "
                    "(mobile_sam.pt, from the MobileSAM repository's weights/ folder)."
                )
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(init_seed)
            try:
                model = assemble(variant.make_config(image_size))
                with torch.no_grad():  # unit-scale Fourier features, as SamFamily's random init (sam._init_random_sam)
                    model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)
            finally:
                torch.random.set_rng_state(generator_state)
            return model
        path = Path(checkpoint)
        if path.suffix in {".pth", ".pt", ".bin", ".safetensors"} and path.is_file():
            return load_official_mobile_sam(path, image_size, encoder)
        if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return self._load_folder(path, image_size)
        raise SamtuneError(
            f"model.checkpoint={checkpoint!r} does not exist or is not a .pt/.pth/.safetensors file (the official "
            "mobile_sam.pt) or a whole-model folder written by samtune; check the path (relative paths are relative "
            "to the current directory)."
        )

    def load_full(self, folder) -> SamModel:
        return self._load_folder(Path(folder), None)

    def _load_folder(self, folder: Path, image_size: int | None) -> SamModel:
        """A ``save_pretrained`` folder (config.json with ``tiny_vit`` + model.safetensors): the
        architecture is rebuilt from the config, then the weights load strictly. Class prompts in
        the file are left to the caller (finetune.checkpoints adds the module first)."""
        from safetensors.torch import load_file

        try:
            config = SamConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise SamtuneError(f"{folder}: config.json cannot be read as a SamConfig ({exc}).") from None
        if not getattr(config, "tiny_vit", None):
            raise SamtuneError(f"{folder}: config.json has no `tiny_vit` entry: this folder holds a SAM ViT model, not MobileSAM; load it with a sam model.name.")
        if image_size is not None and image_size != config.vision_config.image_size:
            config = _with_image_size(config, image_size)
        state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith(CLASS_PROMPTS + ".")}
        return _load_into(assemble(config, meta=True), state, str(folder / "model.safetensors"))

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_onnx, merge_model

        if fmt not in self.export_formats:
            raise SamtuneError(
                f"--format {fmt!r}: a MobileSAM model exports {', '.join(self.export_formats)} (sam-pth: the official "
                "mobile_sam.pt layout; onnx: encoder + decoder). transformers' SamConfig cannot describe the TinyViT "
                "encoder, so there is no SamModel.from_pretrained folder (hf)."
            )
        out = Path(out)
        merged = merge_model(model)
        if fmt == "sam-pth":
            if out.suffix not in {".pth", ".pt"}:
                raise SamtuneError(f"--out {out}: an official MobileSAM checkpoint is a .pt/.pth file, e.g. --out organ_mobile_sam.pt.")
            state = hf_to_official({k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()})
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, out)
            return [out]
        try:
            import onnx  # noqa: F401  (the exporter needs it)
        except ImportError:
            raise SamtuneError("--format onnx needs the onnx extra: pip install 'samtune[onnx]'.") from None
        return export_onnx(merged, out)

    # --- encoder blocks ---
    def encoder_depth(self, model) -> int:
        """Number of TinyViT attention blocks (stage 0 is MBConv: none)."""
        return sum(_tiny_vit_of(model).config.depths[1:])

    def block_index(self, module_name: str, model=None) -> int | None:
        """Global index of the attention block (stage s, block j): blocks of earlier stages come
        first, so it needs the model's stage depths."""
        m = self.encoder_block.search(module_name)
        if m is None or int(m.group(1)) == 0:
            return None
        if model is None:
            raise ValueError("MobileSamFamily.block_index needs the model (its stage depths)")
        depths = _tiny_vit_of(model).config.depths
        return sum(depths[1 : int(m.group(1))]) + int(m.group(2))


def _tiny_vit_of(model) -> TinyViT:
    found = next((m for m in model.modules() if isinstance(m, TinyViT)), None)
    if found is None:
        raise TypeError(f"expected a MobileSAM model (SamModel with a TinyViT vision_encoder), got {type(model).__name__}")
    return found


register_model(ModelVariant("mobile-sam", "mobile_sam", "MobileSAM: TinyViT-5M encoder distilled from SAM ViT-H (Zhang et al., 2023); set model.checkpoint: mobile_sam.pt", 1024, None, "tiny_vit_5m",
                            licence="Apache-2.0 (LICENSE of ChaoningZhang/MobileSAM)"))
register_model(ModelVariant("mobile-sam-tiny", "mobile_sam", "random-init small MobileSAM (TinyViT) for tests and the offline demo", 128, None, None, make_tiny_mobile_config,
                            licence="none: random initialisation"))
