"""The fine-tuning loop: recipe -> data -> SAM + LoRA -> AdamW steps -> evaluations -> files.

Files of a run (``output.dir``): ``recipe.yaml`` (resolved), ``checkpoints/{last,best}/`` (peft
adapter folders), ``metrics.json`` (final model; ``baseline`` = before fine-tuning), ``tensorboard/``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from samtune import SamtuneError
from samtune.adapters.lora import LoraSettings, count_parameters, prepare_trainable
from samtune.adapters.registry import build_sam, get_variant
from samtune.datasets import sample as S
from samtune.finetune.checkpoints import load_checkpoint, save_checkpoint
from samtune.finetune.data import build_datasets
from samtune.finetune.evaluation import evaluate
from samtune.finetune.interaction import RoundSettings, run_rounds
from samtune.finetune.losses import make_mask_loss
from samtune.finetune.metrics import format_table
from samtune.finetune.recipe import Recipe, dump_recipe

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SamtuneError(f"train.device={name!r}: CUDA is not available on this machine; use auto or cpu.")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``train.precision: bf16`` (no loss scaling needed, unlike float16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(recipe: Recipe) -> int:
    return recipe.model.image_size or get_variant(recipe.model.name).default_image_size


def build_base_model(recipe: Recipe):
    model = build_sam(
        recipe.model.name, recipe.model.checkpoint, image_size=image_size_of(recipe), init_seed=recipe.model.init_seed
    )
    # recorded by peft as adapter_config.json's base_model_name_or_path
    model.name_or_path = recipe.model.checkpoint or recipe.model.name
    return model


def round_settings(recipe: Recipe) -> RoundSettings:
    p = recipe.prompts
    return RoundSettings(p.corrective_rounds, p.mask_only_rounds, p.feed_mask)


def lora_settings(recipe: Recipe) -> LoraSettings:
    lora = recipe.adapter.lora
    blocks = tuple(lora.blocks) if lora.blocks is not None else None
    return LoraSettings(lora.rank, lora.alpha, lora.dropout, lora.preset, lora.target_modules, blocks)


def evaluate_with_recipe(model, val_set, recipe: Recipe, device: torch.device, desc: str = "eval") -> dict:
    """Evaluation as the recipe prescribes it (prompts, rounds, precision): the same call during
    training and in `samtune evaluate`, so both give the same numbers."""
    with autocast(device, recipe.train.precision):
        return evaluate(
            model, val_set, recipe.eval.batch_size, device, round_settings(recipe),
            recipe.prompts.box_probability >= 0.5, recipe.seed, desc,
        )  # fmt: skip


def describe_volume(metrics: dict) -> str:
    """A summary line and one line per class of the per-case 3D metrics of volumetric data."""
    volume = metrics["volume"]
    lines = [f"per case, 3D: mean Dice {volume['mdice']:.3f}, HD95 {volume['mhd95_mm']:.1f} mm, "
             f"NSD@{volume['nsd_tolerance_mm']:g}mm {volume['mnsd']:.3f}"]  # fmt: skip
    for name, c in volume["per_class"].items():
        undefined = f" (HD95 undefined in {c['hd95_undefined']})" if c["hd95_undefined"] else ""
        lines.append(f"  {name}: Dice {c['dice']:.3f}, HD95 {c['hd95_mm']:.1f} mm, NSD {c['nsd']:.3f}, {c['cases']} cases{undefined}")
    return "\n".join(lines)


def describe_prompts(recipe: Recipe) -> str:
    p = recipe.prompts
    first = "box" if p.box_probability >= 0.5 else f"{p.positive_points}+/{p.negative_points}- point"
    rounds = f" + {p.corrective_rounds} corrective clicks" if p.corrective_rounds else ""
    return f"{first} prompts from ground truth{rounds}, per {p.per}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    tmp.replace(path)


def train(recipe: Recipe) -> dict:
    """Run one fine-tuning; returns the final metrics (also written to ``metrics.json``)."""
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_yaml = dump_recipe(recipe)
    (out / "recipe.yaml").write_text(recipe_yaml)
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    image_size = image_size_of(recipe)
    if recipe.train.precision == "bf16" and device.type == "cpu":
        log.warning("train.precision=bf16 on the CPU is slow on most processors; running it anyway")

    train_set, val_set = build_datasets(recipe, image_size)
    log.info("training on %d images/slices with objects; validating on %d prompted objects", len(train_set), len(val_set))
    base = build_base_model(recipe)
    if recipe.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_trainable(base, recipe.train.mode, lora_settings(recipe)).to(device)
    params = count_parameters(model)
    log.info(
        "parameters (%s): %s trainable of %s total — %s",
        recipe.train.mode, f"{params['trainable']:,}", f"{params['total']:,}",
        ", ".join(f"{k} {v:,}" for k, v in params.items() if v and k not in ("trainable", "total")),
    )

    # LoRA's B starts at zero, the rest at the base weights: this is the model before fine-tuning.
    rounds = round_settings(recipe)

    def run_eval(desc: str) -> dict:
        return evaluate_with_recipe(model, val_set, recipe, device, desc)

    baseline = run_eval("eval (before)")
    log.info("before fine-tuning: mIoU %.4f", baseline["miou"])

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.train.warmup_steps, recipe.train.steps)
    loss_fn = make_mask_loss(recipe.loss.dice_weight, recipe.loss.focal_weight)
    generator = torch.Generator().manual_seed(recipe.seed)
    click_generator = torch.Generator(device=device).manual_seed(recipe.seed + 1)
    prompt_rng = np.random.default_rng(recipe.seed)
    sampler = RandomSampler(train_set, replacement=True, num_samples=recipe.train.steps * recipe.train.batch_size, generator=generator)
    loader = DataLoader(
        train_set, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=S.collate_samples,
        num_workers=recipe.train.num_workers, drop_last=True,
    )  # fmt: skip

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    best = {"miou": -math.inf, "step": 0}
    history = []
    metrics = baseline
    started = time.perf_counter()
    model.train()
    progress = tqdm(loader, total=recipe.train.steps, desc="train", unit="step")
    for step, batch in enumerate(progress, start=1):
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        use_box = bool(prompt_rng.random() < recipe.prompts.box_probability)
        with autocast(device, recipe.train.precision):
            _, loss = run_rounds(model, batch, rounds, image_size, use_box, click_generator, loss_fn, recipe.loss.iou_weight)
        if not torch.isfinite(loss):
            raise SamtuneError(f"loss became {loss.item()} at step {step}; lower train.lr (now {recipe.train.lr}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % recipe.train.log_every == 0 or step == 1:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
        if step % recipe.train.eval_every == 0 or step == recipe.train.steps:
            metrics = run_eval(f"eval @ {step}")
            writer.add_scalar("val/miou", metrics["miou"], step)
            writer.add_scalar("val/mdice", metrics["mdice"], step)
            for name, c in metrics["per_class"].items():
                writer.add_scalar(f"val_iou/{name}", c["iou"], step)
            history.append({"step": step, "miou": metrics["miou"], "mdice": metrics["mdice"], "loss": loss.item()})
            state = {"step": step, "miou": metrics["miou"], "mdice": metrics["mdice"]}
            save_checkpoint(model, out / "checkpoints" / "last", recipe_yaml, state)
            if metrics["miou"] > best["miou"]:
                best = {"miou": metrics["miou"], "step": step}
                save_checkpoint(model, out / "checkpoints" / "best", recipe_yaml, state)
            progress.write(f"step {step}: val mIoU {metrics['miou']:.4f} (best {best['miou']:.4f} @ {best['step']})")
    writer.flush()
    writer.close()

    result = dict(metrics)
    result.update(
        step=recipe.train.steps,
        checkpoint=str(out / "checkpoints" / "last"),
        best={"step": best["step"], "miou": best["miou"], "checkpoint": str(out / "checkpoints" / "best")},
        baseline={k: baseline[k] for k in ("per_class", "miou", "mdice", "miou_per_sample", "mdice_per_sample")},
        miou_gain=metrics["miou"] - baseline["miou"],
        history=history,
        parameters=params,
        train_seconds=round(time.perf_counter() - started, 1),
        skipped_cases=list(getattr(train_set, "skipped", [])) + list(getattr(val_set, "skipped", [])),
        device=str(device),
    )
    write_json(out / "metrics.json", result)
    print(format_table({"before fine-tuning": baseline, f"after {recipe.train.steps} steps": metrics}, title=f"validation, {describe_prompts(recipe)}"))
    if "volume" in metrics:
        print(describe_volume(metrics))
    print(f"mIoU {baseline['miou']:.3f} -> {metrics['miou']:.3f} ({metrics['miou'] - baseline['miou']:+.3f}); files in {out}")
    return result


def evaluate_checkpoint(recipe: Recipe, checkpoint: str | Path, out_file: str | Path | None) -> dict:
    """Rebuild the base model from the recipe, load the adapter folder, evaluate on the val split."""
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    _, val_set = build_datasets(recipe, image_size_of(recipe), training=False)
    model = load_checkpoint(checkpoint, lambda: build_base_model(recipe)).to(device)
    metrics = evaluate_with_recipe(model, val_set, recipe, device)
    metrics["checkpoint"] = str(checkpoint)
    out_path = Path(out_file) if out_file else Path(recipe.output.dir) / "eval" / "metrics.json"
    write_json(out_path, metrics)
    print(format_table({Path(checkpoint).name: metrics}, title=f"validation, {describe_prompts(recipe)}"))
    if "volume" in metrics:
        print(describe_volume(metrics))
    print(f"mIoU {metrics['miou']:.3f}; written to {out_path}")
    return metrics


def export_checkpoint(recipe: Recipe, checkpoint: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Load a checkpoint on the recipe's base model and export it merged (see adapters/export.py)."""
    from samtune.adapters.export import export_model

    model = load_checkpoint(checkpoint, lambda: build_base_model(recipe))
    return export_model(model, fmt, out)
