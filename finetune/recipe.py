"""The recipe schema: the single source of truth for YAML keys, CLI overrides and the README table.

A field here is a YAML key (``train.lr``), a command-line override (``samtune train recipe.yaml
train.lr=3e-4``) and a row of the README's recipe table (``samtune recipe-keys`` prints it). Validation
collects every problem and raises once, naming the file, key path, value, expectation and the
closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from samtune import SamtuneError
from samtune.adapters.lora import LoraPreset


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Section):
    kind: Literal["cityscapes", "nifti"] = Field(description="dataset format: `cityscapes` (leftImg8bit/gtFine tree) or `nifti` (nnU-Net v2 or MSD dataset folder)")
    root: str = Field(description="dataset folder (relative paths are relative to the current directory)")
    generate_demo: bool = Field(False, description="when `root` does not exist, generate the synthetic demo dataset of this `kind` there")
    train_split: str = Field("train", description="Cityscapes split used for training")
    val_split: str = Field("val", description="Cityscapes split used for validation")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="NIfTI: fraction of cases (patients) held out for validation, seeded by `seed`")
    window_hu: tuple[float, float] = Field((-160.0, 240.0), description="NIfTI CT intensity window [low, high] in HU, scaled to 0-255 (default: abdomen W400/L40)")
    classes: Optional[list[str]] = Field(None, description="class names to train and evaluate on (default: all classes of the dataset)")
    min_pixels: int = Field(10, ge=1, description="smallest object, in pixels of the original image/slice, that becomes a prompted sample")


class ModelSection(_Section):
    name: str = Field("tiny", description="registry name: `tiny`, `sam-vit-base`, `sam-vit-large`, `sam-vit-huge`, `medsam-vit-base`")
    checkpoint: Optional[str] = Field(None, description="official SAM/MedSAM `.pth`, Hugging Face folder or hub id (default: the name's hub id; random init for `tiny`)")
    image_size: Optional[int] = Field(None, ge=32, description="model input size in px, longest side (default: the model's own, 1024 for SAM, 128 for `tiny`)")
    init_seed: int = Field(0, description="seed of the random initialisation of `tiny` (the base an adapter is loaded onto)")


class LoraSection(_Section):
    preset: LoraPreset = Field("encoder_qkv", description="where LoRA goes: `encoder_qkv` (fused q,k,v of every encoder block, as SAMed), `encoder_qkv_proj`, `encoder_all_linear` (qkv, proj, MLP), `decoder_attention` (mask-decoder attention q/k/v/out), `encoder_qkv+decoder_attention`")
    target_modules: Optional[str] = Field(None, description="regex (full match on module names) used instead of the preset, e.g. `.*vision_encoder\\.layers\\.\\d+\\.attn\\.qkv`")
    blocks: Optional[list[int]] = Field(None, description="restrict encoder LoRA to these block indexes; negative counts from the end (`[-4, -3, -2, -1]` = last 4)")
    rank: int = Field(4, ge=1, description="LoRA rank r")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")


class AdapterSection(_Section):
    lora: LoraSection = Field(default_factory=LoraSection)


class TrainSection(_Section):
    mode: Literal["lora", "decoder_only", "full"] = Field("lora", description="`lora`: frozen encoders + LoRA + trained mask decoder; `decoder_only`: frozen encoders, mask decoder trained; `full`: every weight trained")
    gradient_checkpointing: bool = Field(False, description="recompute image-encoder block activations in the backward pass (less memory, ~30% more time)")
    steps: int = Field(500, ge=1, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="prompted samples per step")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine decay to 0")
    eval_every: int = Field(100, ge=1, description="evaluate on the validation split every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="write loss and lr to TensorBoard every N steps")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    device: str = Field("auto", description="`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`")


class PromptsSection(_Section):
    box_jitter_px: float = Field(5.0, ge=0, description="box prompt: each edge moved outward by uniform 0..jitter_px, in model input px")


class LossSection(_Section):
    dice_weight: float = Field(1.0, ge=0, description="weight of the Dice loss")
    focal_weight: float = Field(20.0, ge=0, description="weight of the focal loss (SAM paper: 20 focal : 1 Dice)")


class EvalSection(_Section):
    batch_size: int = Field(16, ge=1, description="prompted samples per evaluation batch")
    max_samples: Optional[int] = Field(None, ge=1, description="evaluate on at most N validation samples (a fixed, seeded subset)")


class OutputSection(_Section):
    dir: str = Field("runs/run", description="run folder: recipe.yaml, checkpoints/, metrics.json, tensorboard/")


class Recipe(_Section):
    seed: int = Field(0, description="seed for data order, prompt jitter and the train/val split")
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    train: TrainSection = Field(default_factory=TrainSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    loss: LossSection = Field(default_factory=LossSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)


def apply_overrides(raw: dict, overrides: list[str], source: str = "command line") -> dict:
    """Set ``key.path=value`` pairs on a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise SamtuneError(f"{source}: override {item!r} is not of the form key.path=value (e.g. train.lr=3e-4).")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _section_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean `{'.'.join(str(p) for p in loc[:-1] + (close[0],))}`?" if close else ""
        return f"`{path}`: unknown key{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing":
        return f"`{path}`: required key is missing"
    shown = err.get("input")
    shown = repr(shown) if not isinstance(shown, dict) else "{...}"
    return f"`{path}` = {shown}: {err['msg']}"


def validate_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise SamtuneError(f"{source}: a recipe must be a YAML mapping of sections (data:, model:, train: ...).")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise SamtuneError(
            f"{source}: {len(lines)} problem{'s' if len(lines) > 1 else ''} in the recipe:\n  - "
            + "\n  - ".join(lines)
            + "\n(`samtune recipe-keys` lists every key with its meaning.)"
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; errors name the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise SamtuneError(f"{path}: recipe file not found.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SamtuneError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return validate_recipe(raw, source)


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def recipe_table() -> str:
    """Markdown table of every recipe key: the README's recipe section is generated from this."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            default = f"`{default}`" if default != "required" else "*required*"
            rows.append(f"| `{prefix}{name}` | {default} | {field.description} |")

    walk(Recipe, "")
    return "\n".join(rows)
