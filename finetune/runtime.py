"""What every command needs before work starts: the device, seeds, the base model of a recipe,
and a run folder that can be written.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from samtune import SamtuneError
from samtune.adapters.family import ModelFamily
from samtune.adapters.registry import build_model, family_of, get_variant
from samtune.finetune.recipe import Recipe

log = logging.getLogger(__name__)


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


# CPU flags of a native bfloat16 matrix multiply: x86 AMX and AVX-512 BF16 (Intel from Cooper Lake and
# Sapphire Rapids, AMD from Zen 4), Arm's BF16 extension (Graviton 3, Neoverse V1 on); without them
# oneDNN emulates bfloat16 in float32 and autocast costs time (measured: docs/howto/predict.md)
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: torch's own query (``torch.cpu.get_capabilities``, in recent releases) where it
    exists, with the ``flags`` (x86) / ``Features`` (Arm) line of /proc/cpuinfo (Linux)."""
    flags: set[str] = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        flags |= {name for name, value in capabilities().items() if value is True}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
                break
    except OSError:  # not Linux
        pass
    return frozenset(flags)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (CUDA: Ampere on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & BF16_CPU_FLAGS)
    return False  # mps: float32 (bfloat16 only from macOS 14; not measured)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as run on ``device``: ``auto`` -> ``bf16`` where the device has native bfloat16
    matmul (``native_bf16``), else ``fp32``; any other value as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def check_precision(precision: str, device: torch.device) -> str:
    """``resolve_precision``, logged; a warning where bf16 is asked for on a CPU that would emulate it."""
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        log.warning("train.precision=bf16 on a CPU without native bfloat16 matmul (no amx_bf16 / avx512_bf16 / Arm bf16 flag) is "
                    "slower than fp32 (14x for MobileSAM here); running it anyway (train.precision=auto picks fp32 on this CPU)")
    resolved = resolve_precision(precision, device)
    log.info("precision: %s (train.precision=%s on %s)", resolved, precision, device)
    return resolved


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``train.precision: bf16`` (or ``auto`` on a device with native bfloat16);
    no loss scaling needed, unlike float16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def inference_model(model, family: ModelFamily, precision: str = "fp32"):
    """A copy of ``model`` arranged for prediction (eval mode, no gradients), the numbers unchanged up to
    float rounding (max |logit difference| 5e-8 on MobileSAM; measured in docs/howto/predict.md):

    - LoRA merged into the weights (peft ``merge_and_unload``): one matmul per layer instead of three;
    - every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` folded into that
      convolution (TinyViT's ConvBN: one pass over the feature map fewer);
    - 4-D weights in channels-last order (oneDNN's native convolution layout: no reordering per call);
    - ``precision="int8"``: also the image encoder's Linear layers quantised (``quantize_encoder``),
      which does change the numbers.

    ``model`` itself is not modified (a server may go on using it)."""
    from samtune.adapters.export import merge_model

    ready = merge_model(model)  # a deep copy when there is LoRA to merge
    if ready is model:
        ready = copy.deepcopy(model)
    fold_batch_norms(ready)
    ready.to(memory_format=torch.channels_last)
    if precision == "int8":
        quantize_encoder(ready, family)
    return ready.eval().requires_grad_(False)


def fold_batch_norms(model) -> int:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential`` into
    the convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``), replacing it by Identity, in
    place; returns how many. Only Sequential: there the order of children is the order they run."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, torch.nn.Sequential):
            continue
        names = list(module._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if type(conv) is torch.nn.Conv2d and type(bn) is torch.nn.BatchNorm2d and bn.track_running_stats and not bn.training:
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = torch.nn.Identity()
                folded += 1
    return folded


def quantize_encoder(model, family: ModelFamily) -> None:
    """``samtune predict --precision int8``: the image encoder's Linear layers in int8 with dynamic
    activation scales (``torch.ao.quantization.quantize_dynamic``, CPU only), in place. Merge LoRA
    first: peft's wrappers would be quantised piece by piece. Changes the numbers (agreement with
    float32 measured in docs/howto/predict.md)."""
    for name, module in model.named_modules():
        if name == family.image_encoder or name.endswith("." + family.image_encoder):
            with warnings.catch_warnings():  # torch's notices that torch.ao moves to torchao: not the user's to act on
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            return
    raise SamtuneError(f"--precision int8: no module {family.image_encoder!r} in the model.")


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
