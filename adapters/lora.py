"""What gets trained: LoRA adapters through peft (by role, or a regex, optionally in some encoder
blocks only), the mask decoder, or everything; and the parameter accounting users compare with papers.

In the default ``lora`` mode the image and prompt encoders stay frozen, LoRA matrices go into the
encoder's attention input projections (SAM's fused ``attn.qkv``; SAMed, Zhang & Liu 2023, used
rank 4 on q and v inside qkv), and the mask decoder is trained in full and saved with the adapter
(peft ``modules_to_save``), so one standard peft folder holds everything that changed. When LoRA
goes into the decoder itself, the decoder is adapted only through LoRA.

Settings arrive as the recipe's ``adapter.lora`` section (``LoraOptions`` names what is read);
module names come from the model family (``samtune.adapters.family``), never from here.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

from peft import LoraConfig, PeftModel, get_peft_model

from samtune.adapters.family import ModelFamily
from samtune.constants import LORA_PRESETS, LORA_ROLES, TRAIN_MODES
from samtune.errors import SamtuneError
from samtune.suggest import did_you_mean


class LoraOptions(Protocol):
    """What is read of the recipe's ``adapter.lora`` section (samtune.finetune.recipe.LoraSection)."""

    preset: str
    target_modules: str | None  # a regex that replaces the preset
    blocks: Sequence[int] | None  # encoder blocks that get LoRA; negative = from the end
    rank: int
    alpha: float
    dropout: float


def preset_roles(preset: str) -> tuple[str, ...]:
    """A preset name, or roles joined by ``+``, as roles (``encoder_qkv`` -> ``encoder_attention``)."""
    if preset in LORA_PRESETS:
        return LORA_PRESETS[preset]
    names = list(dict.fromkeys([*LORA_PRESETS, *LORA_ROLES]))
    roles = []
    for part in preset.split("+"):
        if part not in names:
            raise SamtuneError(f"adapter.lora.preset={preset!r}: {part!r} is not a preset or role; {did_you_mean(part, names)}(known: {', '.join(names)})")
        roles.extend(LORA_PRESETS.get(part, (part,)))
    return tuple(dict.fromkeys(roles))


def _pattern(family: ModelFamily, options: LoraOptions) -> tuple[str, str]:
    """(module-name regex, the recipe key it comes from)."""
    if options.target_modules is None:
        return family.lora_patterns(preset_roles(options.preset)), f"adapter.lora.preset={options.preset!r}"
    return options.target_modules, f"adapter.lora.target_modules={options.target_modules!r}"


def select_lora_modules(model, family: ModelFamily, options: LoraOptions) -> list[str]:
    """Names of the modules that get LoRA (of the family's ``lora_module_types``: Linear layers, and
    for EdgeTAM's RepViT also 1×1 convolutions); an error if there are none."""
    pattern, what = _pattern(family, options)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SamtuneError(f"{what}: not a valid regular expression ({exc}).") from None
    kinds = family.lora_module_types
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and regex.fullmatch(n)]
    if options.blocks is not None:
        depth = family.encoder_depth(model)
        wanted = set()
        for b in options.blocks:
            if not -depth <= b < depth:
                raise SamtuneError(f"adapter.lora.blocks: block {b} does not exist; the encoder has {depth} blocks (0..{depth - 1}).")
            wanted.add(b % depth)
        names = [n for n in names if (block := family.block_index(n, model)) is None or block in wanted]
    if not names:
        example = next((n for n, m in model.named_modules() if isinstance(m, kinds)), "?")
        raise SamtuneError(
            f"{what}{f' with blocks {list(options.blocks)}' if options.blocks is not None else ''} matches no {'/'.join(k.__name__ for k in kinds)} "
            f"module of the model; module names look like {example!r} (roles: {', '.join(family.lora_roles)})."
        )
    return names


def apply_lora(model, family: ModelFamily, options: LoraOptions) -> PeftModel:
    """Wrap ``model`` with LoRA; only LoRA weights (and the mask decoder, unless LoRA adapts it) train."""
    names = select_lora_modules(model, family, options)
    decoder_has_lora = any(n.startswith(family.mask_decoder + ".") for n in names)
    if options.blocks is None:
        target = _pattern(family, options)[0]
    else:  # exact names: a regex with the block filter folded in, readable in adapter_config.json
        target = "|".join(re.escape(n) for n in names)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target,
        modules_to_save=[m for m in family.trainable_modules("lora", model) if not (decoder_has_lora and m == family.mask_decoder)] or None,
        bias="none",
    )
    return get_peft_model(model, config)


def prepare_trainable(model, family: ModelFamily, mode: str, options: LoraOptions):
    """Set what trains for ``train.mode``; returns the model to optimise (a PeftModel for ``lora``)."""
    if mode == "lora":
        return apply_lora(model, family, options)
    if mode not in TRAIN_MODES:
        raise SamtuneError(f"train.mode={mode!r}: {did_you_mean(mode, TRAIN_MODES)}(use one of {', '.join(TRAIN_MODES)})")
    model.requires_grad_(False)
    for name in family.trainable_modules(mode, model):
        model.get_submodule(name).requires_grad_(True)
    return model


def count_parameters(model, family: ModelFamily) -> dict[str, int]:
    """Trainable and total parameter counts, per component (logged and saved in metrics.json)."""
    counts = dict.fromkeys(
        ("encoder_lora", "decoder_lora", "mask_decoder", "class_prompts", "image_encoder", "prompt_encoder", "trainable", "total"), 0
    )
    seen = set()
    for name, param in model.named_parameters():
        if ".original_module." in name or id(param) in seen:  # peft's frozen copy; tied weights once
            continue
        seen.add(id(param))
        n = param.numel()
        counts["total"] += n
        if param.requires_grad:
            counts["trainable"] += n
            counts[family.component_of(name)] += n
    return counts
