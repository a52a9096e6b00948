"""What every command needs before work starts: the device, seeds, the base model of a recipe,
and a run folder that can be written.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from samtune import SamtuneError
from samtune.adapters.family import ModelFamily
from samtune.adapters.registry import build_model, family_of, get_variant
from samtune.finetune.recipe import Recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":  # CUDA, else Apple's Metal (mps), else the CPU
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SamtuneError(f"train.device={name!r}: CUDA is not available on this machine; use auto or cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SamtuneError("train.device='mps': Apple's Metal backend is not available here (macOS with Apple silicon only); use auto or cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SamtuneError(f"train.device={name!r}: not a device; use auto, cpu, cuda or cuda:N.") from None


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``train.precision: bf16`` (no loss scaling needed, unlike float16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(recipe: Recipe) -> int:
    return recipe.model.image_size or get_variant(recipe.model.name).default_image_size


def model_family(recipe: Recipe) -> ModelFamily:
    return family_of(recipe.model.name)


def build_base_model(recipe: Recipe):
    """The recipe's base model (``model.*``): what an adapter folder is loaded onto."""
    model = build_model(recipe.model.name, recipe.model.checkpoint, image_size=image_size_of(recipe), init_seed=recipe.model.init_seed)
    # recorded by peft as adapter_config.json's base_model_name_or_path
    model.name_or_path = recipe.model.checkpoint or recipe.model.name
    family_of(recipe.model.name).set_attention(model, recipe.model.attention)
    return model


def compile_encoder(model, family: ModelFamily) -> None:
    """``train.compile``: compile the image encoder in place (``nn.Module.compile``: parameter names,
    LoRA wrappers and saved files stay as they are). The encoder is where the time goes; the
    decoder runs a variable number of prompts and rounds, which would make it recompile."""
    for name, module in model.named_modules():
        if name == family.image_encoder or name.endswith("." + family.image_encoder):
            module.compile()
            return
    raise SamtuneError(f"train.compile: no module {family.image_encoder!r} in the model.")


def check_writable(folder: str | Path, key: str = "output.dir") -> Path:
    """Create ``folder`` and prove it can be written, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".samtune-write-test-"):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        owner = ""
        if folder.exists() and not os.access(folder, os.W_OK):
            owner = " (the folder exists but this user may not write to it)"
        raise SamtuneError(f"{key}={str(folder)!r}: cannot write there: {why}{owner}. Choose another folder, e.g. {key}=runs/my_run.") from None
    return folder
