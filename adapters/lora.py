"""What gets trained: LoRA adapters through peft (presets or a regex, optionally some blocks only),
the mask decoder, or everything; and the parameter accounting users compare with papers.

In the default ``lora`` mode the image and prompt encoders stay frozen, LoRA matrices go into the
encoder's fused ``attn.qkv`` projections (SAMed, Zhang & Liu 2023, used rank 4 on q and v inside
qkv), and the mask decoder is trained in full and saved with the adapter (peft
``modules_to_save``), so one standard peft folder holds everything that changed. When a preset puts
LoRA into the decoder itself, the decoder is adapted only through LoRA.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import SamModel

from samtune import SamtuneError

LoraPreset = Literal[
    "encoder_qkv", "encoder_qkv_proj", "encoder_all_linear", "decoder_attention", "encoder_qkv+decoder_attention"
]
TrainMode = Literal["lora", "decoder_only", "full"]

# Module-name regexes (full match) on transformers' SamModel.
_ENCODER_BLOCK = r"vision_encoder\.layers\.\d+\."
_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?"
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)\.(?:q|k|v|out)_proj"
)
PRESETS: dict[str, str] = {
    "encoder_qkv": _ENCODER_BLOCK + r"attn\.qkv",
    "encoder_qkv_proj": _ENCODER_BLOCK + r"attn\.(?:qkv|proj)",
    "encoder_all_linear": _ENCODER_BLOCK + r"(?:attn\.(?:qkv|proj)|mlp\.lin[12])",
    "decoder_attention": _DECODER_ATTENTION,
}
PRESETS["encoder_qkv+decoder_attention"] = f"(?:{PRESETS['encoder_qkv']})|(?:{PRESETS['decoder_attention']})"
ENCODER_QKV = PRESETS["encoder_qkv"]
DECODER_MODULE = "mask_decoder"
_BLOCK_INDEX = re.compile(r"vision_encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    preset: str = "encoder_qkv"
    target_modules: str | None = None  # a regex that replaces the preset
    blocks: tuple[int, ...] | None = None  # encoder blocks that get LoRA; negative = from the end


def select_lora_modules(model: SamModel, settings: LoraSettings) -> list[str]:
    """Names of the Linear modules that get LoRA; an error if there are none."""
    if settings.target_modules is None and settings.preset not in PRESETS:
        close = difflib.get_close_matches(settings.preset, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SamtuneError(f"adapter.lora.preset={settings.preset!r} is unknown{hint} (known: {', '.join(PRESETS)})")
    pattern = settings.target_modules or PRESETS[settings.preset]
    what = f"adapter.lora.target_modules={pattern!r}" if settings.target_modules else f"adapter.lora.preset={settings.preset!r}"
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SamtuneError(f"{what}: not a valid regular expression ({exc}).") from None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and regex.fullmatch(n)]
    if settings.blocks is not None:
        depth = len(model.vision_encoder.layers)
        wanted = set()
        for b in settings.blocks:
            if not -depth <= b < depth:
                raise SamtuneError(f"adapter.lora.blocks: block {b} does not exist; the encoder has {depth} blocks (0..{depth - 1}).")
            wanted.add(b % depth)
        names = [n for n in names if not (m := _BLOCK_INDEX.match(n)) or int(m.group(1)) in wanted]
    if not names:
        raise SamtuneError(
            f"{what}{f' with blocks {list(settings.blocks)}' if settings.blocks is not None else ''} matches no Linear "
            "module of the model; module names look like 'vision_encoder.layers.0.attn.qkv' or "
            "'mask_decoder.transformer.layers.0.self_attn.q_proj'."
        )
    return names


def apply_lora(model: SamModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with LoRA; only LoRA weights (and the mask decoder, unless LoRA adapts it) train."""
    names = select_lora_modules(model, settings)
    decoder_has_lora = any(n.startswith(DECODER_MODULE + ".") for n in names)
    if settings.blocks is None:
        target = settings.target_modules or PRESETS[settings.preset]
    else:  # exact names: a regex with the block filter folded in, readable in adapter_config.json
        target = "|".join(re.escape(n) for n in names)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        modules_to_save=None if decoder_has_lora else [DECODER_MODULE],
        bias="none",
    )
    return get_peft_model(model, config)


def prepare_trainable(model: SamModel, mode: str, settings: LoraSettings):
    """Set what trains for ``train.mode``; returns the model to optimise (a PeftModel for ``lora``)."""
    if mode == "lora":
        return apply_lora(model, settings)
    model.requires_grad_(mode == "full")
    if mode == "decoder_only":
        model.mask_decoder.requires_grad_(True)
    elif mode != "full":
        raise SamtuneError(f"train.mode={mode!r}: use one of {', '.join(get_args(TrainMode))}.")
    return model


def count_parameters(model) -> dict[str, int]:
    """Trainable and total parameter counts, per component (logged and saved in metrics.json)."""
    counts = dict.fromkeys(
        ("encoder_lora", "decoder_lora", "mask_decoder", "image_encoder", "prompt_encoder", "trainable", "total"), 0
    )
    seen = set()
    for name, param in model.named_parameters():
        if ".original_module." in name or id(param) in seen:  # peft's frozen copy; tied weights once
            continue
        seen.add(id(param))
        n = param.numel()
        counts["total"] += n
        if not param.requires_grad:
            continue
        counts["trainable"] += n
        if "lora_" in name:
            counts["encoder_lora" if "vision_encoder" in name else "decoder_lora"] += n
        elif DECODER_MODULE in name:
            counts["mask_decoder"] += n
        elif "vision_encoder" in name:
            counts["image_encoder"] += n
        else:
            counts["prompt_encoder"] += n  # prompt encoder and the shared positional encoding
    return counts
