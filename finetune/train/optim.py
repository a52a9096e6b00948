"""The optimiser and learning-rate schedule of a recipe: AdamW with one parameter group per kind of
trained weight (LoRA, fully trained modules, class prompts; ``train.lr*``), linear warm-up, then
cosine, poly (SAMed: lr · (1 - t)^0.9) or constant.

Schedules come from transformers (``get_cosine_schedule_with_warmup``,
``get_polynomial_decay_schedule_with_warmup``, ``get_constant_schedule_with_warmup``): the
well-kept implementations, stepped once per optimiser step.
"""

from __future__ import annotations

import torch

from samtune.adapters.family import CLASS_PROMPTS
from samtune.finetune.recipe import TrainSection


def parameter_groups(model, train: TrainSection) -> list[dict]:
    """Trainable parameters grouped by learning rate; empty groups are left out."""
    decoder_lr = train.lr_decoder or train.lr
    lrs = {"lora": train.lr, "modules": decoder_lr, "class_prompts": train.lr_class_prompts or decoder_lr}
    groups: dict[str, list] = {name: [] for name in lrs}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "lora" if "lora_" in name else "class_prompts" if f"{CLASS_PROMPTS}." in name else "modules"
        groups[kind].append(param)
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def build_optimizer(model, train: TrainSection) -> torch.optim.AdamW:
    groups = parameter_groups(model, train)
    # fused on CUDA: one kernel for every parameter instead of a loop of small ones (the update is
    # the same AdamW); the CPU keeps the default so that CPU runs stay bit-reproducible as tested
    fused = bool(groups) and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None)


def build_scheduler(optimizer, train: TrainSection):
    from transformers import (
        get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup,
    )  # fmt: skip

    if train.schedule == "poly":
        # lr_end=0 for every group: transformers scales each group's own initial lr by the same factor
        return get_polynomial_decay_schedule_with_warmup(optimizer, train.warmup_steps, train.steps, lr_end=0.0, power=train.poly_power)
    if train.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, train.warmup_steps)
    return get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.steps)
