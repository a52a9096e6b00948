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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from samtune import SamtuneError
from samtune.adapters.lora import LoraPreset


class _Section(BaseModel):
    # numbers are fine where text is expected (`model.checkpoint=2024`, `output.dir=2025`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class _OverrideLoader(yaml.SafeLoader):
    """YAML for override values, without timestamps: `output.dir=2024-01-05` stays text."""


_OverrideLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class DataSection(_Section):
    kind: Literal["cityscapes", "nifti", "folder2d"] = Field(description="dataset format: `cityscapes` (leftImg8bit/gtFine tree), `nifti` (nnU-Net v2, MSD, or images/ + labels/ NIfTI folders) or `folder2d` (images/ PNG/JPEG/TIFF + labels/ PNG label maps)")
    root: str = Field(description="dataset folder (relative paths are relative to the current directory)")
    generate_demo: bool = Field(False, description="when `root` does not exist, generate the synthetic demo dataset of this `kind` there (nifti, cityscapes)")
    train_split: str = Field("train", description="Cityscapes split used for training")
    val_split: str = Field("val", description="Cityscapes split used for validation")
    cities: Optional[list[str]] = Field(None, description="Cityscapes: train only on these cities of `train_split` (default: all)")
    val_cities: Optional[list[str]] = Field(None, description="Cityscapes: validate only on these cities of `val_split` (default: all)")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="NIfTI / folder2d: fraction of cases (patients) or images held out for validation, seeded by `seed` (without `split_file` or a val/ folder)")
    split_file: Optional[str] = Field(None, description='NIfTI / folder2d: JSON split, `{"train": [names], "val": [names]}` or nnU-Net\'s splits_final.json (list of folds, see `fold`); a relative path is looked up in the current directory, then in `root`')
    fold: int = Field(0, ge=0, description="fold of an nnU-Net splits_final.json `split_file`")
    class_names: dict[int, str] | None = Field(None, description="label value -> class name, e.g. `{1: polyp}`, for images/ + labels/ folders (replaces dataset.json's labels); default `class_<k>` for every value found")
    channel: int = Field(0, ge=0, description="NIfTI input channel: the index on the 4th axis of a multi-modal (4D) MSD image, or nnU-Net's `_000<channel>` file")
    intensity: str | tuple[float, float] | None = Field(None, description="NIfTI intensity to 0-255: `ct_abdomen` [-160, 240] HU (W400/L40), `ct_samed` [-125, 275], `ct_lung` [-1350, 150] (W1500/L-600), `ct_bone` [-500, 1300] (W1800/L400), `mr_percentile` (0.5-99.5 percentile of each volume), or [low, high]; default: `window_hu`")
    window_hu: tuple[float, float] = Field((-160.0, 240.0), description="NIfTI CT intensity window [low, high] in HU, scaled to 0-255 (default: abdomen W400/L40); used when `intensity` is not set")
    spacing_mm: tuple[float, float] | None = Field(None, description="NIfTI: resample slices in-plane to this pixel spacing [x, y] in mm (image linear, labels nearest neighbour); default: keep the scan's")
    context_slices: int = Field(0, ge=0, description="NIfTI 2.5D: 0 = the slice repeated as RGB; k = slices z-k, z, z+k as the three channels (clamped at the volume ends)")
    empty_slice_ratio: float = Field(0.0, ge=0, description="NIfTI: slices without foreground kept per slice with foreground, per case (seeded); 0 keeps none. Prompted samples need an object, so kept empty slices are counted by `samtune inspect` but not trained on")
    cache_dir: Optional[str] = Field(None, description="NIfTI preprocessing cache (memory-mapped uint8 slices + slice index), rebuilt when files or settings change; default `<root>/.samtune_cache`, or `~/.cache/samtune` when `root` is read-only")
    on_bad_case: Literal["error", "skip"] = Field("error", description="unusable case or image (unreadable, shape/affine mismatch, unknown label values, NaN, ...): `error` stops naming the file and the fix; `skip` leaves it out, logs it and lists it in `samtune inspect`")
    classes: Optional[list[str]] = Field(None, description="class names to train and evaluate on (default: all classes of the dataset)")
    min_pixels: int = Field(10, ge=1, description="smallest object, in pixels of the original image/slice, that becomes a prompted sample")

    @model_validator(mode="after")
    def _check_data(self):
        from samtune.datasets.volume import INTENSITY_PRESETS, MR_PERCENTILE

        problems = []
        presets = sorted(INTENSITY_PRESETS) + [MR_PERCENTILE]
        if isinstance(self.intensity, str) and self.intensity not in presets:
            close = difflib.get_close_matches(self.intensity, presets, n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`? " if close else ""
            problems.append(f"data.intensity={self.intensity!r} is not a preset; {hint}(presets: {', '.join(presets)}, or [low, high])")
        for key in ("intensity", "window_hu"):
            value = getattr(self, key)
            if isinstance(value, tuple) and not value[0] < value[1]:
                problems.append(f"data.{key}={list(value)}: low must be below high")
        if self.spacing_mm is not None and min(self.spacing_mm) <= 0:
            problems.append(f"data.spacing_mm={list(self.spacing_mm)}: spacings must be positive (mm)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    gradient_checkpointing: bool = Field(False, description="recompute image-encoder block activations in the backward pass: less memory, more time (figures in the README)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="`bf16`: autocast the forward passes to bfloat16 (GPUs from Ampere on; weights and optimiser stay float32)")
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
    per: Literal["class", "component"] = Field("class", description="one prompted object per class present, or per connected component of each class")
    per_image: int = Field(1, ge=1, description="training: objects prompted per image per step, sharing one image-encoder pass (batch = `train.batch_size` images × this)")
    box_probability: float = Field(1.0, ge=0, le=1, description="chance that a training step's first prompt is a box, otherwise points (SAM-Med2D: 0.5); evaluation uses the box when >= 0.5")
    box_jitter_px: float = Field(5.0, ge=0, description="box prompt: each edge moved outward by uniform 0..jitter_px, in model input px")
    box_jitter_frac: float = Field(0.0, ge=0, le=1, description="box prompt: or by up to this fraction of the box width/height (the larger of the two limits applies)")
    positive_points: int = Field(1, ge=0, description="point prompt: positive points inside the object")
    negative_points: int = Field(0, ge=0, description="point prompt: negative points outside the object, inside its box")
    point_placement: Literal["uniform", "center"] = Field("uniform", description="first positive point uniform inside the object or at its centre (distance-transform maximum)")
    corrective_rounds: int = Field(0, ge=0, description="rounds adding one click from the previous prediction's error region (SAM paper: 8)")
    mask_only_rounds: int = Field(0, ge=0, description="final rounds with no new click, only the previous logits as mask prompt (SAM paper: 2)")
    feed_mask: bool = Field(True, description="in later rounds, give the previous low-res logits as the mask prompt")

    @model_validator(mode="after")
    def _points_available(self):
        if self.box_probability < 1 and self.positive_points + self.negative_points == 0:
            raise ValueError("point prompts are used (box_probability < 1) but positive_points + negative_points is 0")
        return self


class AugmentStep(BaseModel):
    """One albumentations transform: `name` plus its keyword arguments (e.g. `p`, `limit`)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _buildable(self):
        from samtune.datasets.augment import build_transform

        build_transform(self.name, self.model_extra or {})  # raises ValueError naming what is wrong
        return self


class LossSection(_Section):
    dice_weight: float = Field(1.0, ge=0, description="weight of the Dice loss")
    focal_weight: float = Field(20.0, ge=0, description="weight of the focal loss (SAM paper: 20 focal : 1 Dice)")
    iou_weight: float = Field(1.0, ge=0, description="weight of the MSE between the IoU head's prediction and the actual IoU (SAM paper: 1)")


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
    augment: list[AugmentStep] = Field(default_factory=list, description="training augmentation: albumentations transforms by class name with their arguments, applied to image and label together before prompts are sampled, e.g. `[{name: HorizontalFlip, p: 0.5}, {name: Affine, rotate: [-10, 10], p: 0.5}]`")
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
            value = yaml.load(text, Loader=_OverrideLoader) if text.strip() else None
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
