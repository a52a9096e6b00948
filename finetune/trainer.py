"""The fine-tuning loop: recipe -> data -> SAM + LoRA -> AdamW steps -> evaluations -> files.

Files of a run (``output.dir``): ``recipe.yaml`` (resolved), ``checkpoints/{last,best}/`` (peft
adapter folders), ``metrics.json`` (final model; ``baseline`` = before fine-tuning), ``tensorboard/``.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from samtune import SamtuneError
from samtune.adapters.lora import count_parameters, prepare_trainable
from samtune.datasets import sample as S
from samtune.files import write_atomic, write_json_atomic
from samtune.finetune.checkpoints import save_checkpoint
from samtune.finetune.data import build_datasets
from samtune.finetune.evaluation import evaluate, uses_box
from samtune.finetune.interaction import run_rounds
from samtune.finetune.losses import make_mask_loss
from samtune.finetune.metrics import format_table
from samtune.finetune.recipe import Recipe, dump_recipe
from samtune.finetune.runtime import (
    autocast, build_base_model, check_writable, image_size_of, model_family, resolve_device, seed_everything,
)  # fmt: skip

log = logging.getLogger(__name__)


def evaluate_with_recipe(model, family, val_set, recipe: Recipe, device: torch.device, desc: str = "eval") -> dict:
    """Evaluation as the recipe prescribes it (prompts, rounds, precision): the same call during
    training and in `samtune evaluate`, so both give the same numbers."""
    with autocast(device, recipe.train.precision):
        return evaluate(model, family, val_set, recipe, device, desc)


def train_step(model, family, batch: dict, recipe: Recipe, optimizer, use_box: bool, click_generator, loss_fn, step: int = 0) -> torch.Tensor:
    """One optimiser step on a batch already on the model's device: prompt rounds, loss, backward,
    update. Returns the loss (detached from nothing: the caller logs ``loss.item()``)."""
    device = batch[S.IMAGE].device
    with autocast(device, recipe.train.precision):
        _, loss = run_rounds(model, family, batch, recipe.prompts, batch[S.IMAGE].shape[-1], use_box, click_generator, loss_fn, recipe.loss.iou_weight)
    if not torch.isfinite(loss):
        raise SamtuneError(f"loss became {loss.item()} at step {step}; lower train.lr (now {recipe.train.lr}).")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


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
    first = "box" if uses_box(recipe) else f"{p.positive_points}+/{p.negative_points}- point"
    rounds = f" + {p.corrective_rounds} corrective clicks" if p.corrective_rounds else ""
    return f"{first} prompts from ground truth{rounds}, per {p.per}"


def train(recipe: Recipe) -> dict:
    """Run one fine-tuning; returns the final metrics (also written to ``metrics.json``)."""
    out = check_writable(recipe.output.dir)
    recipe_yaml = dump_recipe(recipe)
    write_atomic(out / "recipe.yaml", recipe_yaml)
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    image_size = image_size_of(recipe)
    family = model_family(recipe)
    if recipe.train.precision == "bf16" and device.type == "cpu":
        log.warning("train.precision=bf16 on the CPU is slow on most processors; running it anyway")

    data = build_datasets(recipe, family.make_transform(image_size))
    train_set, val_set = data.train, data.val
    log.info("training on %d images/slices with objects; validating on %d prompted objects", len(train_set), len(val_set))
    base = build_base_model(recipe)
    if recipe.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_trainable(base, family, recipe.train.mode, recipe.adapter.lora).to(device)
    params = count_parameters(model, family)
    log.info(
        "parameters (%s): %s trainable of %s total — %s",
        recipe.train.mode, f"{params['trainable']:,}", f"{params['total']:,}",
        ", ".join(f"{k} {v:,}" for k, v in params.items() if v and k not in ("trainable", "total")),
    )

    # LoRA's B starts at zero, the rest at the base weights: this is the model before fine-tuning.
    def run_eval(desc: str) -> dict:
        return evaluate_with_recipe(model, family, val_set, recipe, device, desc)

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
        loss = train_step(model, family, batch, recipe, optimizer, use_box, click_generator, loss_fn, step)
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
        skipped_cases=data.skipped,
        device=str(device),
    )
    write_json_atomic(out / "metrics.json", result)
    print(format_table({"before fine-tuning": baseline, f"after {recipe.train.steps} steps": metrics}, title=f"validation, {describe_prompts(recipe)}"))
    if "volume" in metrics:
        print(describe_volume(metrics))
    print(f"mIoU {baseline['miou']:.3f} -> {metrics['miou']:.3f} ({metrics['miou'] - baseline['miou']:+.3f}); files in {out}")
    return result
