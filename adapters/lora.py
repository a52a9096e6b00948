"""LoRA adapters on SAM through peft, and the parameter accounting users compare with papers.

The image encoder and prompt encoder stay frozen; LoRA matrices are added to the encoder's fused
``attn.qkv`` projections (SAMed, Zhang & Liu 2023, used rank 4 on q and v inside qkv), and the
mask decoder is trained in full and saved with the adapter (peft ``modules_to_save``), so one
standard peft folder holds everything that changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import SamModel

from samtune import SamtuneError

# Regex on module names of transformers' SamModel: every encoder block's fused qkv Linear.
ENCODER_QKV = r".*vision_encoder\.layers\.\d+\.attn\.qkv"
DECODER_MODULE = "mask_decoder"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: str = ENCODER_QKV


def apply_lora(model: SamModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with LoRA; only LoRA weights and the mask decoder stay trainable."""
    pattern = re.compile(settings.target_modules)
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        raise SamtuneError(
            f"adapter.lora.target_modules={settings.target_modules!r} matches no module of the model; "
            f"the encoder's attention projections are named like 'vision_encoder.layers.0.attn.qkv'."
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=[DECODER_MODULE],
        bias="none",
    )
    return get_peft_model(model, config)


def count_parameters(model) -> dict[str, int]:
    """Trainable and total parameter counts, per component (what gets logged and saved)."""
    counts = {"encoder_lora": 0, "mask_decoder": 0, "trainable": 0, "total": 0}
    for name, param in model.named_parameters():
        if ".original_module." in name:  # peft's frozen copy of a modules_to_save module
            continue
        n = param.numel()
        counts["total"] += n
        if not param.requires_grad:
            continue
        counts["trainable"] += n
        if "lora_" in name and "vision_encoder" in name:
            counts["encoder_lora"] += n
        elif DECODER_MODULE in name:
            counts["mask_decoder"] += n
    return counts
