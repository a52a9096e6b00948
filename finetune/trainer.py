"""The fine-tuning loop: recipe -> data -> SAM + LoRA -> AdamW steps -> evaluations -> files.

Files of a run (``output.dir``): ``recipe.yaml`` (resolved), ``checkpoints/{last,best}/`` (peft
adapter folders), ``metrics.json`` (final model; ``baseline`` = before fine-tuning), ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.adapters.lora import count_parameters, prepare_trainable
from samtune.datasets import sample as S
from samtune.datasets import semantic as SEM
from samtune.datasets.semantic import collate_semantic
from samtune.files import write_atomic, write_json_atomic
from samtune.finetune.checkpoints import save_checkpoint
from samtune.finetune.data import build_datasets
from samtune.finetune.evaluation import evaluate_all
from samtune.finetune.losses import AutomaticLoss, make_mask_loss
from samtune.finetune.optim import build_optimizer, build_scheduler
from samtune.finetune.recipe import Recipe, dump_recipe
from samtune.finetune.report import report_after_run
from samtune.finetune.step import StepLoss, cached_embeddings, check_finite, wrap_data_parallel
from samtune.finetune.reporting import baseline_summary, json_ready, print_results, write_per_case
from samtune.finetune.distributed import Ranks, gather, init_from_env, main_first, mean_across_ranks, shutdown
from samtune.finetune.resume import (
    DataOrder, check_same_recipe, find_state, load_state, restore_rng_states, rng_states, save_state,
)  # fmt: skip
from samtune.finetune.runtime import (
    autocast, build_base_model, check_writable, compile_encoder, image_size_of, model_family, resolve_device, seed_everything,
)  # fmt: skip

log = logging.getLogger(__name__)


def evaluate_with_recipe(model, family, data, recipe: Recipe, device: torch.device, desc: str = "eval", predictions=None) -> dict:
    """Evaluation as the recipe prescribes it (prompted and/or semantic, by ``task``; prompts,
    rounds, precision): the same call during training and in `samtune evaluate`."""
    with autocast(device, recipe.train.precision):
        return evaluate_all(model, family, data, recipe, device, desc, predictions)


def _loader(dataset, recipe: Recipe, collate, seed: int, served: int = 0, ranks: Ranks = Ranks()):  # noqa: B008  (frozen dataclass)
    """Batches of ``dataset`` drawn with replacement, enough for every step, in a seeded order
    (``DataOrder``: RandomSampler's draws; this rank's share of them); ``served``: batches this
    rank already used (a resumed run)."""
    batch = recipe.train.batch_size
    total = recipe.train.steps * recipe.train.accumulate * batch * ranks.world
    order = DataOrder(len(dataset), total, seed, served * batch * ranks.world, batch, ranks.rank, ranks.world)
    return iter(DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=order, collate_fn=collate,
                           num_workers=recipe.train.num_workers, drop_last=True))  # fmt: skip


def _class_weights(recipe: Recipe, space) -> torch.Tensor | None:
    weights = recipe.automatic.class_weights
    if not weights:
        return None
    unknown = [n for n in weights if n not in space.names]
    if unknown:
        raise SamtuneError(f"automatic.class_weights: {unknown} are not classes of this dataset ({', '.join(space.names)}).")
    return torch.tensor([float(weights.get(n, 1.0)) for n in space.names])


def train(recipe: Recipe, resume: str | Path | None = None, resume_force: bool = False) -> dict:
    """Run one fine-tuning; returns the final metrics (also written to ``metrics.json``).
    ``resume``: "latest" (``<output.dir>/states``' newest) or a state or run folder: continue
    exactly where that state was written (``samtune.finetune.resume``). Launched by torchrun, each
    process runs this and they train as one (``samtune.finetune.distributed``)."""
    ranks, rank_device = init_from_env(recipe.train.device)
    try:
        return _train(recipe, resume, resume_force, ranks, rank_device)
    finally:
        if ranks.world > 1:
            shutdown()


def _train(recipe: Recipe, resume, resume_force: bool, ranks: Ranks, rank_device: torch.device | None) -> dict:
    out = check_writable(recipe.output.dir)
    recipe_yaml = dump_recipe(recipe)
    state_dir = None
    if resume is not None:
        state_dir = find_state(out, resume)
        check_same_recipe((state_dir / "recipe.yaml").read_text(), recipe_yaml, state_dir, resume_force)
        log.info("resuming from %s", state_dir)
    if ranks.main:
        write_atomic(out / "recipe.yaml", recipe_yaml)
    seed_everything(recipe.seed)
    device = rank_device or resolve_device(recipe.train.device)
    image_size = image_size_of(recipe)
    family = model_family(recipe)
    if recipe.train.precision == "bf16" and device.type == "cpu":
        log.warning("train.precision=bf16 on the CPU is slow on most processors; running it anyway")

    with main_first():  # rank 0 writes demo data and slice caches, the others then read them
        data = build_datasets(recipe, family.make_transform(image_size), progress=ranks.main)
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
    if recipe.train.compile:
        compile_encoder(model, family)
    params = count_parameters(model, family)
    log.info(
        "parameters (%s): %s trainable of %s total — %s",
        recipe.train.mode, f"{params['trainable']:,}", f"{params['total']:,}",
        ", ".join(f"{k} {v:,}" for k, v in params.items() if v and k not in ("trainable", "total")),
    )
    automatic_tokens = recipe.automatic.tokens if recipe.task != "promptable" else 0
    classes = {"task": recipe.task, "tokens": automatic_tokens, "label_space": data.space.to_dict()}
    if ranks.world > 1:  # same weights everywhere (built above from one seed); per-sample randomness per rank
        seed_everything(recipe.seed + 1_000 * ranks.rank)

    # LoRA's B starts at zero, the rest at the base weights: this is the model before fine-tuning
    # (for the automatic path: the base with untrained class prompts).
    def run_eval(desc: str) -> dict:
        return evaluate_with_recipe(model, family, data, recipe, device, desc)

    if state_dir is None:
        baseline = run_eval("eval (before)")
        log.info("before fine-tuning: %s mIoU %.4f", baseline["headline"], baseline["miou"])

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    loss_fn = make_mask_loss(recipe.loss.dice_weight, recipe.loss.focal_weight, recipe.loss.bce_weight)
    click_generator = torch.Generator(device=device).manual_seed(recipe.seed + 1 + 1_000 * ranks.rank)
    prompt_rng = np.random.default_rng(recipe.seed)
    task_rng = np.random.default_rng([recipe.seed, 7])
    generators = {"clicks": click_generator, "prompt": prompt_rng, "task": task_rng}
    loop = {"best": {"miou": -math.inf, "step": 0}, "history": [], "below_baseline": [], "stale": 0,
            "last_good": "no checkpoint was written yet", "served": {"prompted": 0, "automatic": 0}, "draws": 0}  # fmt: skip
    start = 1
    if state_dir is not None:  # weights, optimiser, scheduler now; random states once the loaders exist
        start_step, loop, rng_json, rng_tensors = load_state(state_dir, model, optimizer, scheduler, ranks.rank, ranks.world)
        start, baseline, metrics = start_step + 1, loop["baseline"], loop["metrics"]
    caches = {}
    if recipe.train.embedding_cache:  # decoder_only: the frozen encoder's output of each training image, once
        from samtune.finetune.embedding_cache import build_caches

        with main_first():
            caches = build_caches(recipe, family, model, data, device, progress=sys.stderr.isatty() and ranks.main)
    served = loop["served"]
    prompted = _loader(data.train, recipe, S.collate_samples, recipe.seed, served["prompted"], ranks) if data.train is not None else None
    automatic = None
    if data.train_semantic is not None:
        automatic = _loader(data.train_semantic, recipe, collate_semantic, recipe.seed + 2, served["automatic"], ranks)
        auto_loss_fn = AutomaticLoss(recipe.loss.dice_weight, recipe.loss.focal_weight, _class_weights(recipe, data.space),
                                     bce_weight=recipe.loss.bce_weight).to(device)  # fmt: skip
    if state_dir is not None:
        if data.train is not None:
            data.train.restore_draws(loop["draws"])
        restore_rng_states(rng_json, rng_tensors, generators)
    else:
        metrics = baseline

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start if state_dir is not None else None) if ranks.main else _NoWriter()
    best, history, below_baseline = loop["best"], loop["history"], loop["below_baseline"]
    last_good, stale, stopped_early = loop["last_good"], loop["stale"], None
    started = time.perf_counter()
    model.train()
    steps, accumulate = recipe.train.steps, recipe.train.accumulate
    save_every = recipe.train.save_every or recipe.train.eval_every
    interactive = sys.stderr.isatty()  # a log file gets a line every log_every steps, not redrawn bars
    progress = tqdm(range(start, steps + 1), desc="train", unit="step", disable=not (interactive and ranks.main), initial=start - 1, total=steps)
    step_loss = wrap_data_parallel(StepLoss(model, family, recipe), ranks)
    masks, window_start = 0, time.perf_counter()  # masks trained since the last log line, for masks/s
    for step in progress:
        auto = prompted is None or (automatic is not None and task_rng.random() < recipe.automatic.ratio)
        path = "automatic" if auto else "prompted"
        use_box = False if auto else bool(prompt_rng.random() < recipe.prompts.box_probability)
        optimizer.zero_grad(set_to_none=True)
        step_total = torch.zeros((), device=device)
        for micro in range(accumulate):  # gradients of `accumulate` batches summed, each scaled by 1/accumulate
            batch = {k: (v.to(device) if k != S.META else v) for k, v in next(automatic if auto else prompted).items()}
            served[path] += 1
            masks += ranks.world * (batch[SEM.LABELS].shape[0] * len(data.space.ids) if auto else batch[S.MASKS].shape[0] * batch[S.MASKS].shape[1])
            embeddings = cached_embeddings(caches, data.train_semantic if auto else data.train, batch, device)
            # DDP: gradients are averaged across ranks at the last micro-batch's backward only
            sync = ranks.world == 1 or micro == accumulate - 1
            with contextlib.nullcontext() if sync else step_loss.no_sync():
                loss = step_loss(batch, auto, use_box, click_generator, auto_loss_fn if auto else loss_fn, embeddings)
                (loss / accumulate).backward()
            step_total += loss.detach().float() / accumulate
        # checked on every rank alike (a rank that stopped alone would leave the others waiting),
        # before the optimiser step: the weights never see a non-finite gradient
        step_total = mean_across_ranks(step_total)
        check_finite(step_total, step, path, recipe, last_good)
        loss_value = step_total.item()
        if recipe.train.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.train.clip_grad_norm)
            if not torch.isfinite(grad_norm):
                raise SamtuneError(f"the gradient norm became {grad_norm.item()} at step {step} ({path} path); lower train.lr (now {recipe.train.lr}); {last_good}.")
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss_value:.4f}", path=path)
        if step % recipe.train.log_every == 0 or step == 1:
            writer.add_scalar(f"train/loss_{path}", loss_value, step)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                writer.add_scalar(f"train/lr_{group['name']}", lr, step)
            if recipe.train.clip_grad_norm is not None:
                writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            now = time.perf_counter()
            writer.add_scalar("train/masks_per_s", masks / max(now - window_start, 1e-9), step)
            masks, window_start = 0, now
            writer.add_scalar("train/peak_memory_gb", peak_memory_gb(device), step)
            if not interactive:
                log.info("%s", progress_line(step, steps, loss_value, path, scheduler.get_last_lr()[0], time.perf_counter() - started))
        image_every = recipe.train.eval_every if recipe.train.image_every is None else recipe.train.image_every
        if ranks.main and image_every and (step % image_every == 0 or step == steps):
            from samtune.finetune.overlays import log_pictures

            with autocast(device, recipe.train.precision):
                log_pictures(writer, model, family, data, recipe, device, step)
        if step % recipe.train.eval_every == 0 or step == steps:
            check_finite_weights(model, step, last_good)
            check_same_weights(model, ranks, step)
            metrics = run_eval(f"eval @ {step}")
            for part in ("prompted", "semantic"):
                if part in metrics:
                    writer.add_scalar(f"val_{part}/miou", metrics[part]["miou"], step)
                    writer.add_scalar(f"val_{part}/mdice", metrics[part]["mdice"], step)
                    for name, c in metrics[part]["per_class"].items():
                        writer.add_scalar(f"val_{part}_iou/{name}", c["iou"], step)
            entry = {"step": step, "miou": metrics["miou"], "mdice": metrics["mdice"], "loss": loss_value}
            entry.update({f"{part}_miou": metrics[part]["miou"] for part in ("prompted", "semantic") if part in metrics})
            if metrics["miou"] < baseline["miou"]:  # users often learn this only after the fact
                entry["below_baseline"] = True
                below_baseline.append(step)
                if ranks.main:
                    log.warning("step %d: validation %s mIoU %.4f is BELOW the model before fine-tuning (%.4f)", step, metrics["headline"], metrics["miou"], baseline["miou"])
            history.append(entry)
            state = {"step": step, "headline": metrics["headline"], "miou": metrics["miou"], "mdice": metrics["mdice"]}
            if ranks.main:
                save_checkpoint(model, out / "checkpoints" / "last", recipe_yaml, state, classes)
            last_good = f"the last good state is {out / 'checkpoints' / 'last'} (step {step})"
            if metrics["miou"] > best["miou"]:
                best, stale = {"miou": metrics["miou"], "step": step}, 0
                if ranks.main:
                    save_checkpoint(model, out / "checkpoints" / "best", recipe_yaml, state, classes)
            else:
                stale += 1
            if ranks.main:
                progress.write(f"step {step}: val {metrics['headline']} mIoU {metrics['miou']:.4f} (best {best['miou']:.4f} @ {best['step']})")
            patience = recipe.train.early_stop_patience
            if patience is not None and stale >= patience and step < steps:
                stopped_early = {"step": step, "patience": patience, "best_step": best["step"]}
                log.info("early stop at step %d: no better %s mIoU for %d evaluations (best %.4f @ %d)", step, metrics["headline"], patience, best["miou"], best["step"])
                break
        if step % save_every == 0 and step < steps:
            loop.update(best=best, history=history, below_baseline=below_baseline, stale=stale, last_good=last_good,
                        served=served, draws=data.train.draws if data.train is not None else 0,
                        baseline=json_ready(baseline), metrics=json_ready(metrics))  # fmt: skip
            rank_states = gather(rng_states(generators))  # every rank's random states, written by rank 0
            if ranks.main:
                save_state(out, step, model, optimizer, scheduler, loop, rank_states, recipe_yaml, recipe.train.keep_states)
    progress.close()
    writer.flush()
    writer.close()

    result = json_ready(metrics)
    result.update(
        task=recipe.task,
        step=history[-1]["step"] if history else steps,
        checkpoint=str(out / "checkpoints" / "last"),
        best={"step": best["step"], "miou": best["miou"], "checkpoint": str(out / "checkpoints" / "best")},
        baseline=baseline_summary(baseline),
        miou_gain=metrics["miou"] - baseline["miou"],
        below_baseline_at=below_baseline,
        stopped_early=stopped_early,
        history=history,
        parameters=params,
        train_seconds=round(time.perf_counter() - started, 1),
        skipped_cases=data.skipped,
        device=str(device),
        processes=ranks.world,
    )
    if not ranks.main:
        return result
    write_json_atomic(out / "metrics.json", result)
    write_per_case(metrics, out)
    report_after_run(out, device)  # report.html: tables, charts, best and worst cases (a failure is only a warning)
    print_results({"before fine-tuning": baseline, f"after {result['step']} steps": metrics}, recipe)
    print(f"{metrics['headline']} mIoU {baseline['miou']:.3f} -> {metrics['miou']:.3f} ({metrics['miou'] - baseline['miou']:+.3f}); files in {out}")
    return result


class _NoWriter:
    """TensorBoard on ranks other than 0: nothing is written."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_line(step: int, steps: int, loss: float, path: str, lr: float, elapsed: float) -> str:
    """The progress of a run as one log line (when stderr is not a terminal)."""
    rate = step / elapsed if elapsed > 0 else 0.0
    eta = (steps - step) / rate if rate else 0.0
    return f"step {step}/{steps}  loss {loss:.4f} ({path})  lr {lr:.2e}  {rate:.2f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s"


def check_finite_weights(model, step: int, last_good: str) -> None:
    """Never save NaN weights: a trained parameter that is not finite stops the run here."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise SamtuneError(f"weights became non-finite at step {step} ({name}); nothing was saved from this step; {last_good}. Lower train.lr or set train.clip_grad_norm.")


def check_same_weights(model, ranks: Ranks, step: int) -> None:
    """DDP keeps every rank's weights equal; a difference (a rank that skipped a sync) would make
    rank 0's checkpoints disagree with the evaluation all ranks ran, so it stops the run."""
    if ranks.world == 1:
        return
    with torch.no_grad():
        sums = [float(p.double().sum()) for p in model.parameters() if p.requires_grad]
    everyone = gather(sums)
    if any(other != everyone[0] for other in everyone[1:]):
        raise SamtuneError(f"step {step}: the processes' trained weights differ (a gradient synchronisation was missed); please report this with the recipe.")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
