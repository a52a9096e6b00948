"""The recipe schema: the single source of truth for YAML keys, CLI overrides and the recipe-keys table
(docs/reference/recipe_keys.md).

A field here is a YAML key (``train.lr``), a command-line override (``samtune train recipe.yaml
train.lr=3e-4``) and a row of the recipe-keys table (``samtune recipe-keys`` prints it). Validation
collects every problem and raises once, naming the file, key path, value, expectation and the
closest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from samtune import SamtuneError
from samtune.constants import LORA_PRESETS, LORA_ROLES, TASKS, TRAIN_MODES
from samtune.datasets.formats import DataSectionBase, all_formats, kinds_with_key
from samtune.schema import Section as _Section
from samtune.suggest import closest, did_you_mean


class _OverrideLoader(yaml.SafeLoader):
    """YAML for override values, without timestamps: `output.dir=2024-01-05` stays text."""


_OverrideLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _data_union():
    """``data:`` is one of the registered formats' sections, told apart by ``kind``."""
    sections = tuple(fmt.section for fmt in all_formats().values())
    return Annotated[Union[sections], Field(discriminator="kind")]  # noqa: UP007 (a runtime tuple)


DataSection = _data_union()


class ModelSection(_Section):
    name: str = Field("tiny", description="registry name: `tiny`, `sam-vit-base`, `sam-vit-large`, `sam-vit-huge`, `medsam-vit-base`, `mobile-sam` (TinyViT encoder; `model.checkpoint: mobile_sam.pt`), `mobile-sam-tiny`, `sam2-hiera-tiny|small|base-plus|large` (SAM 2.1), `medsam2` (`model.checkpoint: MedSAM2_latest.pt`, 512 px), `sam2-tiny-random`, `sam3` (SAM 3: Hugging Face folder or hub `facebook/sam3`, 1008 px), `sam3-tiny-random`, `edgetam` (EdgeTAM: RepViT encoder, `edgetam.pt` or a Hugging Face folder, 1024 px), `edgetam-tiny-random`, `tiny-pretrained` (`tiny` pretrained on generated shapes, shipped with samtune)")
    checkpoint: Optional[str] = Field(None, description="official SAM/MedSAM `.pth`, Hugging Face folder or hub id (default: the name's hub id; random init for `tiny`)")
    image_size: Optional[int] = Field(None, ge=32, description="model input size in px, longest side for SAM (padded to a square), the square SAM 2 resizes to (default: the model's own, 1024 for SAM, 128 for `tiny`)")
    init_seed: int = Field(0, description="seed of the random initialisation of `tiny` (the base an adapter is loaded onto)")
    attention: Literal["sdpa", "fused_relpos", "eager"] = Field("sdpa", description="image-encoder attention: `sdpa` (PyTorch's fused attention with the relative-position bias as a mask), `fused_relpos` (the bias folded into the query·key product: no N×N mask, so flash kernels apply), `eager` (plain matmuls); the same numbers up to rounding")


class LoraSection(_Section):
    preset: str = Field("encoder_qkv", description="where LoRA goes, by role: `encoder_attention` (= `encoder_qkv`: the attention's q,k,v projections of every encoder block, as SAMed), `encoder_attention_out`, `encoder_mlp`, `decoder_attention` (mask-decoder attention q/k/v/out), or roles joined by `+`; also `encoder_qkv_proj` (attention + its output), `encoder_all_linear` (attention, output, MLP)")
    target_modules: Optional[str] = Field(None, description="regex (full match on module names) used instead of the preset, e.g. `.*vision_encoder\\.layers\\.\\d+\\.attn\\.qkv`")
    blocks: Optional[list[int]] = Field(None, description="restrict encoder LoRA to these block indexes; negative counts from the end (`[-4, -3, -2, -1]` = last 4)")
    rank: int = Field(4, ge=1, description="LoRA rank r")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        names = list(dict.fromkeys([*LORA_PRESETS, *LORA_ROLES]))
        unknown = [part for part in value.split("+") if part not in names]
        if value not in LORA_PRESETS and unknown:
            raise ValueError(f"{unknown[0]!r} is not a preset or role; {did_you_mean(unknown[0], names)}(known: {', '.join(names)})")
        return value


class AdapterSection(_Section):
    lora: LoraSection = Field(default_factory=LoraSection)


class TrainSection(_Section):
    mode: Literal[TRAIN_MODES] = Field("lora", description="`lora`: frozen encoders + LoRA + trained mask decoder; `decoder_only`: frozen encoders, mask decoder trained; `full`: every weight trained")
    embedding_cache: bool = Field(False, description="`decoder_only`: compute each training image's embedding once, float16 on disk (`<cache dir>/embeddings-<key>/`, `samtune cache`), and reuse it at every step instead of running the frozen encoder; not with `augment:`")
    compile: bool = Field(False, description="`torch.compile` the image encoder (the first steps are slow while it compiles; for long GPU runs)")
    gradient_checkpointing: bool = Field(False, description="recompute image-encoder block activations in the backward pass: less memory, more time (figures in docs/explanation/measured.md)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`bf16`: autocast the forward passes to bfloat16 (weights and optimiser stay float32); `auto`: bf16 where the device multiplies bfloat16 natively (CUDA GPUs from Ampere on, CPUs with AMX or AVX-512 BF16, Arm BF16), else `fp32`; for training, evaluation and prediction")
    steps: int = Field(500, ge=1, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="prompted samples per step")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate (of the LoRA weights, and of everything else unless set below)")
    lr_decoder: Optional[float] = Field(None, gt=0, description="peak learning rate of the fully trained modules (mask decoder; with `train.mode: full` everything but LoRA); default `train.lr`")
    lr_class_prompts: Optional[float] = Field(None, gt=0, description="peak learning rate of the automatic mode's class prompts; default `train.lr_decoder`, else `train.lr`")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then the schedule")
    schedule: Literal["cosine", "poly", "constant"] = Field("cosine", description="learning-rate decay after warm-up: `cosine` to 0, `poly` (1 - t)^`poly_power` to 0 (SAMed's), or `constant`")
    poly_power: float = Field(0.9, gt=0, description="exponent of the `poly` schedule")
    accumulate: int = Field(1, ge=1, description="gradient accumulation: batches per optimiser step (effective batch = `batch_size` × this); `steps` counts optimiser steps")
    clip_grad_norm: Optional[float] = Field(None, gt=0, description="clip the gradient's global L2 norm to this value before each optimiser step (default: no clipping)")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="stop when the headline validation mIoU has not improved for this many evaluations (default: run every step)")
    eval_every: int = Field(100, ge=1, description="evaluate on the validation split every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="write loss and lr to TensorBoard every N steps")
    image_every: Optional[int] = Field(None, ge=0, description="draw a few fixed validation samples (prediction, ground-truth outline, prompt; semantic: prediction beside ground truth) into TensorBoard's Images tab every N steps (default: at every evaluation; 0: never)")
    save_every: Optional[int] = Field(None, ge=1, description="write the training state for `samtune train --resume` every N steps (`<output.dir>/states/`; default: at every evaluation)")
    keep_states: int = Field(2, ge=1, description="training states kept (the newest); `checkpoints/best` and `last` are kept apart")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    device: str = Field("auto", description="`auto` (CUDA, else Apple's `mps`, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`")


class PromptsSection(_Section):
    per: Literal["class", "component", "instance"] = Field("class", description="one prompted object per class present (`class`), per connected component of each class (`component`), or per annotated instance (`instance`: data with instances, `cityscapes` *_gtFine_instanceIds.png and `coco`; classes without instances, e.g. Cityscapes stuff, stay one object per class)")
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
    bce_weight: float = Field(0.0, ge=0, description="weight of the binary cross-entropy per mask / class (SAMed: 0.2 CE + 0.8 Dice, focal 0; MedSAM: 1 Dice + 1 BCE)")
    iou_weight: float = Field(1.0, ge=0, description="weight of the MSE between the IoU head's prediction and the actual IoU (SAM paper: 1)")
    resolution: Literal["input", "low_res"] = Field("input", description="where the prompted masks' training loss is computed: `input` (every predicted mask upsampled to the model input, S×S) or `low_res` (the mask decoder's own S/4 × S/4 output against the ground truth area-averaged to it, as SAMed; 16× fewer pixels, for large inputs and many prompts per image). The automatic mode's class masks are always scored at S/4 × S/4 (K masks per image: their upsampling dominated a step)")


class AutomaticSection(_Section):
    ratio: float = Field(0.5, ge=0, le=1, description="`task: both`: fraction of training steps that train the automatic path (the others train prompts), drawn per step with the recipe's seed")
    tokens: int = Field(2, ge=1, le=16, description="learnt prompt tokens per class (the class prompt the decoder reads instead of a box's two corner tokens)")
    threshold: float = Field(0.5, gt=0, lt=1, description="fusion into one label map: each pixel takes the class of highest probability, or background when no class reaches this probability")
    init: Literal["random", "text"] = Field("random", description="how class prompts start: `random` = N(0, 1) tokens (seeded by `seed`); `text` = the family's text encoder read on each class name (families with a text encoder: sam3), then trained the same way")
    class_weights: Optional[dict[str, float]] = Field(None, description="weight of each class in the automatic loss, by class name (default 1 each), e.g. `{kidney_left: 2.0}`")
    corrective_rounds: int = Field(0, ge=0, description="training: rounds after the class masks of a batch that each add one click from every class mask's error region and decode class prompt + clicks + the previous logits as mask prompt (corrections that start from the automatic result); their loss is added to the class loss. 0 = class prompts alone")
    classes_per_step: Optional[int] = Field(None, ge=1, description="training: decode and score at most N class prompts per automatic step: the classes present in the batch first (a random N of them if more), then absent ones drawn at random (they learn to stay empty); the others are left out of that step's loss. Faster but not free: on the 19-class Cityscapes demo N=12 cost 1.61× a promptable step instead of 2.01× for mIoU 0.302 vs 0.327, N=8 1.40× for 0.163 (docs/explanation/automatic_mode.md); null = every class every step")

    @model_validator(mode="after")
    def _subset_without_corrections(self):
        if self.classes_per_step is not None and self.corrective_rounds:
            raise ValueError("automatic.classes_per_step with automatic.corrective_rounds > 0: the corrective rounds start from every "
                             "class mask; set one of them (classes_per_step: null or corrective_rounds: 0)")
        return self

    @field_validator("class_weights")
    @classmethod
    def _positive(cls, value):
        bad = {k: v for k, v in (value or {}).items() if not v >= 0}
        if bad:
            raise ValueError(f"class weights must be >= 0, got {bad}")
        return value


class EvalSection(_Section):
    batch_size: int = Field(16, ge=1, description="prompted samples (or images, semantic) per evaluation batch")
    max_samples: Optional[int] = Field(None, ge=1, description="evaluate on at most N validation samples (a fixed, seeded subset; prompted evaluation only, per-case 3D metrics then need the semantic path)")
    box_jitter_px: float = Field(0.0, ge=0, description="prompted evaluation: box edges moved outward by uniform 0..N px (input px, seeded per sample); 0 = the tight box of the ground truth")
    volume_mode: Literal["slices", "propagate", "interactive"] = Field("slices", description="volumes (NIfTI): `slices` = every slice holding an organ gets its own prompt (the prompted evaluation); `propagate` = also one tight box per organ and case, on the slice where the organ is largest, carried through the volume (`eval.propagation`) and scored per case in 3D (`propagated` in metrics.json); `interactive` = also the CVPR 2025 interactive 3D challenge's protocol: per organ and case a box (or, with class prompts, the automatic result), then 5 clicks at the centre of the largest 3D error, Dice/NSD after each and their AUC (`interactive` in metrics.json)")
    propagation: Literal["auto", "memory", "box"] = Field("auto", description="how `eval.volume_mode: propagate` and `samtune predict` with a prompt on one slice follow an organ through the volume: `memory` = SAM 2's video tracker (slices as frames, memory attention; SAM 2 families), `box` = slice by slice from the box of the previous slice's mask (every family), `auto` = memory where the family and checkpoint have it, else box (with a warning)")
    save_predictions: bool = Field(False, description="semantic evaluation: write each validation image's label map into `<out>/predictions/` (Cityscapes: `*_gtFine_labelIds.png` at the original resolution, named like the ground truth, and with instanceIds the instance evaluator's files in `<out>/instances/{prompted,automatic}/`; NIfTI: one label volume per case)")


class OutputSection(_Section):
    dir: str = Field("runs/run", description="run folder: recipe.yaml, checkpoints/, metrics.json, tensorboard/")


class Recipe(_Section):
    seed: int = Field(0, description="seed for data order, prompt jitter and the train/val split")
    task: Literal[TASKS] = Field("promptable", description="`promptable`: boxes/clicks from the user; `automatic`: every class of an image with no input (one learnt prompt per class, fused into a label map); `both`: one checkpoint that does both (steps mixed by `automatic.ratio`)")
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    train: TrainSection = Field(default_factory=TrainSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    augment: list[AugmentStep] = Field(default_factory=list, description="training augmentation: albumentations transforms by class name with their arguments, applied to image and label together before prompts are sampled, e.g. `[{name: HorizontalFlip, p: 0.5}, {name: Affine, rotate: [-10, 10], p: 0.5}]`")
    automatic: AutomaticSection = Field(default_factory=AutomaticSection)
    loss: LossSection = Field(default_factory=LossSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _embedding_cache_usable(self):
        if self.train.embedding_cache and self.train.mode != "decoder_only":
            raise ValueError(f"train.embedding_cache=true needs train.mode=decoder_only (now {self.train.mode!r}): only a frozen "
                             "image encoder without LoRA gives an image the same embedding at every step")  # fmt: skip
        if self.train.embedding_cache and self.augment:
            raise ValueError("train.embedding_cache=true cannot be combined with augment: (non-empty): augmentations change "
                             "the pixels at every step, so a cached embedding would be wrong; remove augment or set train.embedding_cache=false")  # fmt: skip
        return self


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


def _walk_loc(loc: tuple) -> tuple[type[BaseModel] | None, tuple]:
    """The section a pydantic error location points into, and the location as the user writes it
    (``("data", "nifti", "window_hu")`` -> NiftiData, ``("data", "window_hu")``: the kind tag is
    pydantic's, not a key)."""
    model: type[BaseModel] | None = Recipe
    shown: list = []
    for part in loc:
        if model is None or not isinstance(part, str):
            return None, tuple(shown) + (part,)
        if model is _DataHolder:  # inside data: the union tag selects the format's section
            model = all_formats()[part].section if part in all_formats() else None
            continue
        field = model.model_fields.get(part)
        shown.append(part)
        annotation = getattr(field, "annotation", None)
        if field is not None and part == "data" and model is Recipe:
            model = _DataHolder
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            model = None
    return (None if model is _DataHolder else model), tuple(shown)


class _DataHolder:
    """Marker for the discriminated ``data`` union while walking an error location."""


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    parent, shown_parent = _walk_loc(loc[:-1]) if loc else (None, ())
    path = ".".join(str(p) for p in (shown_parent + loc[-1:] if loc else ()))
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = sorted(parent.model_fields) if parent else []
        if shown_parent == ("data",):
            owners = kinds_with_key(key)
            if owners:
                kind = loc[1] if len(loc) > 2 else "?"
                return f"`{path}`: a key of data.kind={' / '.join(owners)}, not of data.kind={kind} (valid here: {', '.join(valid)})"
        match = closest(key, valid)
        hint = f"; did you mean `{'.'.join(str(p) for p in shown_parent + (match,))}`?" if match else ""
        return f"`{path}`: unknown key{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing":
        return f"`{path}`: required key is missing"
    if err["type"] == "union_tag_not_found":
        return f"`{path}.kind`: required key is missing (one of: {', '.join(all_formats())})"
    if err["type"] == "union_tag_invalid":
        tag = str(err.get("ctx", {}).get("tag"))
        return f"`{path}.kind` = {tag!r}: unknown data format; {did_you_mean(tag, all_formats())}(one of: {', '.join(all_formats())})"
    if not loc and err["type"] == "value_error":  # a rule across sections: the message names the keys
        return str(err.get("ctx", {}).get("error") or err["msg"])
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


def _rows(model: type[BaseModel], prefix: str, skip: set[str] = frozenset()) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{prefix}{name}.")
            continue
        if prefix == "" and name == "data":
            rows += _data_rows()
            continue
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        default = f"`{default}`" if default != "required" else "*required*"
        rows.append(f"| `{prefix}{name}` | {default} | {field.description} |")
    return rows


def _data_rows() -> list[str]:
    """``data.*``: the keys every format has, then each format's own, under a row naming its kind."""
    common = set(DataSectionBase.model_fields)
    first = next(iter(all_formats().values())).section
    rows = _rows(first, "data.", skip=set(first.model_fields) - common)
    rows[0] = f"| `data.kind` | *required* | {DataSectionBase.model_fields['kind'].description} |"
    for kind, fmt in all_formats().items():
        rows.append(f"| ***data.kind: {kind}*** | | {fmt.section.model_fields['kind'].description}; also: |")
        own = [n for n in fmt.section.model_fields if n not in common]
        rows += _rows(fmt.section, "data.", skip=set(fmt.section.model_fields) - set(own))
    return rows


def recipe_table() -> str:
    """Markdown table of every recipe key: docs/reference/recipe_keys.md is generated from this."""
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *_rows(Recipe, "")])
