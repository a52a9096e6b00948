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
from samtune.datasets import semantic as SEM
from samtune.datasets.semantic import collate_semantic
from samtune.files import write_atomic, write_json_atomic
from samtune.finetune.checkpoints import save_checkpoint
from samtune.finetune.data import build_datasets
from samtune.finetune.evaluation import evaluate_all, uses_box
from samtune.finetune.interaction import run_rounds
from samtune.finetune.volume_metrics import per_case_rows
from samtune.finetune.automatic import class_logits
from samtune.finetune.losses import AutomaticLoss, make_mask_loss
from samtune.finetune.metrics import format_table
from samtune.finetune.recipe import Recipe, dump_recipe
from samtune.finetune.runtime import (
    autocast, build_base_model, check_writable, image_size_of, model_family, resolve_device, seed_everything,
)  # fmt: skip

log = logging.getLogger(__name__)


def evaluate_with_recipe(model, family, data, recipe: Recipe, device: torch.device, desc: str = "eval", predictions=None) -> dict:
    """Evaluation as the recipe prescribes it (prompted and/or semantic, by ``task``; prompts,
    rounds, precision): the same call during training and in `samtune evaluate`."""
    with autocast(device, recipe.train.precision):
        return evaluate_all(model, family, data, recipe, device, desc, predictions)


def train_step(model, family, batch: dict, recipe: Recipe, optimizer, use_box: bool, click_generator, loss_fn, step: int = 0) -> torch.Tensor:
    """One optimiser step on a batch already on the model's device: prompt rounds, loss, backward,
    update. Returns the loss (detached from nothing: the caller logs ``loss.item()``)."""
    device = batch[S.IMAGE].device
    with autocast(device, recipe.train.precision):
        _, loss = run_rounds(model, family, batch, recipe.prompts, batch[S.IMAGE].shape[-1], use_box, click_generator, loss_fn, recipe.loss.iou_weight)
    return _update(loss, optimizer, recipe, step, "prompted")


def _update(loss: torch.Tensor, optimizer, recipe: Recipe, step: int, path: str) -> torch.Tensor:
    """Backward and optimiser step, refusing a non-finite loss before it reaches the weights."""
    if not torch.isfinite(loss):
        raise SamtuneError(f"loss became {loss.item()} at step {step} ({path} path); lower train.lr (now {recipe.train.lr}).")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def automatic_step(model, family, batch: dict, recipe: Recipe, optimizer, loss_fn, step: int = 0) -> torch.Tensor:
    """One optimiser step of the automatic path: every class prompt on every image of the batch."""
    device = batch[SEM.IMAGE].device
    with autocast(device, recipe.train.precision):
        logits = class_logits(model, family, batch[SEM.IMAGE])
    return _update(loss_fn(logits, batch[SEM.LABELS]), optimizer, recipe, step, "automatic")


def describe_volume(metrics: dict, label: str = "per case, 3D") -> str:
    """A summary line and one line per class of the per-case 3D metrics of volumetric data."""
    volume = metrics["volume"]
    lines = [f"{label}: mean Dice {volume['mdice']:.3f}, HD95 {volume['mhd95_mm']:.1f} mm, "
             f"NSD@{volume['nsd_tolerance_mm']:g}mm {volume['mnsd']:.3f}"]  # fmt: skip
    for name, c in volume["per_class"].items():
        undefined = f" (HD95 undefined in {c['hd95_undefined']})" if c["hd95_undefined"] else ""
        lines.append(f"  {name}: Dice {c['dice']:.3f}, HD95 {c['hd95_mm']:.1f} mm, NSD {c['nsd']:.3f}, {c['cases']} cases{undefined}")
    return "\n".join(lines)


def describe_prompts(recipe: Recipe) -> str:
    p = recipe.prompts
    first = f"tight box (jitter {recipe.eval.box_jitter_px:g} px)" if uses_box(recipe) else f"{p.positive_points}+/{p.negative_points}- point"
    rounds = f" + {p.corrective_rounds} corrective clicks" if p.corrective_rounds else ""
    return f"{first} prompts from ground truth{rounds}, per {p.per}"


def print_results(columns: dict[str, dict], recipe: Recipe) -> None:
    """The prompted and semantic tables (and per-case 3D lines) of one or more evaluations, each
    part labelled with its protocol."""
    last = list(columns.values())[-1]
    if "prompted" in last:
        print(format_table({k: m["prompted"] for k, m in columns.items()}, title=f"PROMPTED validation: {describe_prompts(recipe)}"))
        if "volume" in last["prompted"]:
            print(describe_volume(last["prompted"], "prompted, per case 3D (unprompted slices count as empty)"))
    if "semantic" in last:
        print(format_table(
            {k: m["semantic"] for k, m in columns.items()},
            title=f"SEMANTIC validation (no prompts; every pixel, void excluded; background below p={recipe.automatic.threshold:g})",
        ))  # fmt: skip
        if "volume" in last["semantic"]:
            print(describe_volume(last["semantic"], "semantic, per case 3D (whole predicted volumes)"))


def write_per_case(metrics: dict, out) -> None:
    """``<out>/per_case.csv``: the per-case 3D scores (semantic when there, else prompted)."""
    import csv
    import io

    part = next((metrics[k] for k in ("semantic", "prompted") if k in metrics and "volume" in metrics[k]), None)
    if part is None:
        return
    rows = per_case_rows(part["volume"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "class", "dice", "hd95_mm", "nsd"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "per_case.csv", buffer.getvalue())


def json_ready(metrics: dict) -> dict:
    """Metrics without what JSON cannot hold (the semantic label volumes)."""
    out = dict(metrics)
    if "semantic" in out:
        out["semantic"] = {k: v for k, v in out["semantic"].items() if k != "label_volumes"}
    return out


def _loader(dataset, recipe: Recipe, collate, seed: int):
    """Batches of ``dataset`` drawn with replacement, enough for every step, in a seeded order."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=recipe.train.steps * recipe.train.batch_size,
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return iter(DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=recipe.train.num_workers, drop_last=True))  # fmt: skip


def _class_weights(recipe: Recipe, space) -> torch.Tensor | None:
    weights = recipe.automatic.class_weights
    if not weights:
        return None
    unknown = [n for n in weights if n not in space.names]
    if unknown:
        raise SamtuneError(f"automatic.class_weights: {unknown} are not classes of this dataset ({', '.join(space.names)}).")
    return torch.tensor([float(weights.get(n, 1.0)) for n in space.names])


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
    if data.train is not None:
        log.info("prompted: training on %d images/slices with objects; validating on %d prompted objects", len(data.train), len(data.val))
    if data.train_semantic is not None:
        log.info("automatic: %d classes (%s); training on %d images/slices, validating on %d", len(data.space.ids),
                 ", ".join(data.space.names), len(data.train_semantic), len(data.val_semantic))  # fmt: skip
    base = build_base_model(recipe)
    if recipe.task != "promptable":
        family.add_class_prompts(base, len(data.space.ids), recipe.automatic.tokens, seed=recipe.seed)
    if recipe.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_trainable(base, family, recipe.train.mode, recipe.adapter.lora).to(device)
    params = count_parameters(model, family)
    log.info(
        "parameters (%s): %s trainable of %s total — %s",
        recipe.train.mode, f"{params['trainable']:,}", f"{params['total']:,}",
        ", ".join(f"{k} {v:,}" for k, v in params.items() if v and k not in ("trainable", "total")),
    )
    automatic_tokens = recipe.automatic.tokens if recipe.task != "promptable" else 0
    classes = {"task": recipe.task, "tokens": automatic_tokens, "label_space": data.space.to_dict()}

    # LoRA's B starts at zero, the rest at the base weights: this is the model before fine-tuning
    # (for the automatic path: the base with untrained class prompts).
    def run_eval(desc: str) -> dict:
        return evaluate_with_recipe(model, family, data, recipe, device, desc)

    baseline = run_eval("eval (before)")
    log.info("before fine-tuning: %s mIoU %.4f", baseline["headline"], baseline["miou"])

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.train.warmup_steps, recipe.train.steps)
    loss_fn = make_mask_loss(recipe.loss.dice_weight, recipe.loss.focal_weight)
    click_generator = torch.Generator(device=device).manual_seed(recipe.seed + 1)
    prompt_rng = np.random.default_rng(recipe.seed)
    task_rng = np.random.default_rng([recipe.seed, 7])
    prompted = _loader(data.train, recipe, S.collate_samples, recipe.seed) if data.train is not None else None
    automatic = None
    if data.train_semantic is not None:
        automatic = _loader(data.train_semantic, recipe, collate_semantic, recipe.seed + 2)
        automatic_loss = AutomaticLoss(recipe.loss.dice_weight, recipe.loss.focal_weight, _class_weights(recipe, data.space)).to(device)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    best = {"miou": -math.inf, "step": 0}
    history = []
    metrics = baseline
    started = time.perf_counter()
    model.train()
    progress = tqdm(range(1, recipe.train.steps + 1), desc="train", unit="step")
    for step in progress:
        auto = prompted is None or (automatic is not None and task_rng.random() < recipe.automatic.ratio)
        batch = next(automatic if auto else prompted)
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        if auto:
            loss = automatic_step(model, family, batch, recipe, optimizer, automatic_loss, step)
        else:
            use_box = bool(prompt_rng.random() < recipe.prompts.box_probability)
            loss = train_step(model, family, batch, recipe, optimizer, use_box, click_generator, loss_fn, step)
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", path="auto" if auto else "prompt")
        if step % recipe.train.log_every == 0 or step == 1:
            writer.add_scalar(f"train/loss_{'automatic' if auto else 'prompted'}", loss.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
        if step % recipe.train.eval_every == 0 or step == recipe.train.steps:
            metrics = run_eval(f"eval @ {step}")
            for part in ("prompted", "semantic"):
                if part in metrics:
                    writer.add_scalar(f"val_{part}/miou", metrics[part]["miou"], step)
                    writer.add_scalar(f"val_{part}/mdice", metrics[part]["mdice"], step)
                    for name, c in metrics[part]["per_class"].items():
                        writer.add_scalar(f"val_{part}_iou/{name}", c["iou"], step)
            entry = {"step": step, "miou": metrics["miou"], "mdice": metrics["mdice"], "loss": loss.item()}
            entry.update({f"{part}_miou": metrics[part]["miou"] for part in ("prompted", "semantic") if part in metrics})
            history.append(entry)
            state = {"step": step, "headline": metrics["headline"], "miou": metrics["miou"], "mdice": metrics["mdice"]}
            save_checkpoint(model, out / "checkpoints" / "last", recipe_yaml, state, classes)
            if metrics["miou"] > best["miou"]:
                best = {"miou": metrics["miou"], "step": step}
                save_checkpoint(model, out / "checkpoints" / "best", recipe_yaml, state, classes)
            progress.write(f"step {step}: val {metrics['headline']} mIoU {metrics['miou']:.4f} (best {best['miou']:.4f} @ {best['step']})")
    writer.flush()
    writer.close()

    result = json_ready(metrics)
    result.update(
        task=recipe.task,
        step=recipe.train.steps,
        checkpoint=str(out / "checkpoints" / "last"),
        best={"step": best["step"], "miou": best["miou"], "checkpoint": str(out / "checkpoints" / "best")},
        baseline=_summary(baseline),
        miou_gain=metrics["miou"] - baseline["miou"],
        history=history,
        parameters=params,
        train_seconds=round(time.perf_counter() - started, 1),
        skipped_cases=data.skipped,
        device=str(device),
    )
    write_json_atomic(out / "metrics.json", result)
    write_per_case(metrics, out)
    print_results({"before fine-tuning": baseline, f"after {recipe.train.steps} steps": metrics}, recipe)
    print(f"{metrics['headline']} mIoU {baseline['miou']:.3f} -> {metrics['miou']:.3f} ({metrics['miou'] - baseline['miou']:+.3f}); files in {out}")
    return result


def _summary(metrics: dict) -> dict:
    """The baseline as metrics.json keeps it: per part, the per-class table and the means."""
    keep = ("per_class", "miou", "mdice", "miou_per_sample", "mdice_per_sample", "pixel_accuracy")
    out = {part: {k: metrics[part][k] for k in keep if k in metrics[part]} for part in ("prompted", "semantic") if part in metrics}
    out.update(headline=metrics["headline"], miou=metrics["miou"], mdice=metrics["mdice"])
    return out
