"""The optimiser step the training loop runs (``optimizer_step``) and its parts: one micro-batch's
loss for the two paths (prompted: prompt rounds; automatic: every class prompt on every image)
under autocast by ``train.precision``, cached image embeddings when ``train.embedding_cache``, the
DDP wrapper, gradient accumulation, clipping and the non-finite guards, then the optimiser and the
scheduler. The loop (``samtune.finetune.train.loop``) and the tests call the same function."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from samtune import SamtuneError
from samtune.adapters.family import CLASS_PROMPTS, ImageEmbeddings
from samtune.datasets import sample as S
from samtune.datasets import semantic as SEM
from samtune.finetune.automatic import class_low_res
from samtune.finetune.distributed import Ranks, gather, mean_across_ranks
from samtune.finetune.interaction import class_correction_rounds, run_rounds
from samtune.finetune.recipe import Recipe
from samtune.finetune.runtime import autocast


def prompted_loss(model, family, batch: dict, recipe: Recipe, use_box: bool, click_generator, loss_fn, embeddings=None) -> torch.Tensor:
    """The prompted path's loss on a batch already on the model's device: prompt rounds, then
    Dice + focal (+ IoU head) averaged over rounds. ``embeddings``: the batch's cached image
    embeddings (``train.embedding_cache``), else the encoder runs."""
    with autocast(batch[S.IMAGE].device, recipe.train.precision):
        _, loss = run_rounds(model, family, batch, recipe.prompts, batch[S.IMAGE].shape[-1], use_box, click_generator, loss_fn,
                             recipe.loss.iou_weight, embeddings=embeddings, low_res_loss=recipe.loss.resolution == "low_res")  # fmt: skip
    return loss


def automatic_loss(model, family, batch: dict, recipe: Recipe, loss_fn, embeddings=None, click_generator=None) -> torch.Tensor:
    """The automatic path's loss: every class prompt on every image of the batch, or the
    ``automatic.classes_per_step`` of them ``step_classes`` picks (+ the corrective rounds' loss
    with ``automatic.corrective_rounds``)."""
    rounds, labels = recipe.automatic.corrective_rounds, batch[SEM.LABELS]
    classes = None
    if recipe.automatic.classes_per_step is not None:
        classes = step_classes(labels, len(getattr(model, CLASS_PROMPTS)()), recipe.automatic.classes_per_step, click_generator)
    if rounds and embeddings is None:  # one encoder pass for the class masks and their corrections
        with autocast(batch[SEM.IMAGE].device, recipe.train.precision):
            embeddings = family.encode_images(model, batch[SEM.IMAGE])
    with autocast(batch[SEM.IMAGE].device, recipe.train.precision):
        # always the decoder's s×s logits against area-averaged labels (losses.class_targets),
        # whatever loss.resolution says for prompted masks: K masks per image upsampled to S×S
        # made the loss and its backward most of an automatic step (3× the step at s×s on the
        # Cityscapes demo, K = 19; docs/howto/training.md), for no better mIoU
        logits = class_low_res(model, family, batch[SEM.IMAGE], embeddings=embeddings, classes=classes)
    loss = loss_fn(logits, labels) if classes is None else loss_fn(logits, labels, classes)
    if rounds:
        loss = loss + corrective_loss(model, family, batch, recipe, loss_fn, embeddings, logits.detach(), click_generator)
    return loss


def step_classes(labels: torch.Tensor, k: int, limit: int, generator: torch.Generator) -> torch.Tensor | None:
    """The class indexes one automatic step trains (``automatic.classes_per_step``), sorted: the
    classes present in ``labels`` (B×S×S, K background, 255 ignored) in a random order, then the
    absent ones in a random order, the first ``limit`` of them; None when that is every class.
    Present classes first: an absent class only learns to stay empty, which a few draws per step
    teach as well as all of them."""
    if limit >= k:
        return None
    present = torch.zeros(k + 1, dtype=torch.bool, device=labels.device)
    present[labels[labels < k].long().unique()] = True
    keys = torch.rand(k, generator=generator, device=generator.device).to(labels.device) + (~present[:k]).float()  # present: [0, 1), absent: [1, 2)
    return keys.argsort()[:limit].sort().values


def corrective_loss(model, family, batch: dict, recipe: Recipe, loss_fn, embeddings: ImageEmbeddings, low_res: torch.Tensor,
                    click_generator) -> torch.Tensor:  # fmt: skip
    """``automatic.corrective_rounds``: the batch's class masks (``low_res`` B×K×s×s, detached: the
    rounds start from them as a user's clicks start from the automatic result) corrected by clicks
    from their error regions; the loss of the refined masks at s×s, as the class loss, averaged
    over rounds (``samtune.finetune.interaction.class_correction_rounds``)."""
    with autocast(batch[SEM.IMAGE].device, recipe.train.precision):
        return class_correction_rounds(model, family, embeddings, low_res, batch[SEM.LABELS], recipe.automatic.corrective_rounds,
                                       click_generator, loss_fn, low_res_loss=True)  # fmt: skip


def cached_embeddings(caches: dict, dataset, batch: dict, device: torch.device) -> ImageEmbeddings | None:
    """The batch's image embeddings from the embedding cache of ``dataset``'s source (by each
    sample's ``meta["index"]``); None without a cache or when an entry is missing (the encoder runs)."""
    cache = caches.get(id(dataset.source)) if caches else None
    if cache is None:
        return None
    rows = cache.get([m["index"] for m in batch[S.META]], device)
    return None if rows is None else ImageEmbeddings(rows)


class StepLoss(torch.nn.Module):
    """The loss of one micro-batch as a module's forward, so that DistributedDataParallel can wrap
    it: DDP syncs gradients of the parameters used in a forward it ran (the family functions take
    the model as an argument and are not a forward of their own)."""

    def __init__(self, model, family, recipe: Recipe):
        super().__init__()
        self.model, self.family, self.recipe = model, family, recipe

    def forward(self, batch: dict, auto: bool, use_box: bool, click_generator, loss_fn, embeddings=None) -> torch.Tensor:
        if auto:
            return automatic_loss(self.model, self.family, batch, self.recipe, loss_fn, embeddings, click_generator)
        return prompted_loss(self.model, self.family, batch, self.recipe, use_box, click_generator, loss_fn, embeddings)


def wrap_data_parallel(step_loss: StepLoss, ranks: Ranks):
    """DDP around the step's loss with more than one process; the module itself otherwise."""
    if ranks.world == 1:
        return step_loss
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a prompted step leaves the class prompts (and a box step the point
    # embeddings) without gradient; buffers are constants (positional tables), not broadcast.
    return DistributedDataParallel(step_loss, find_unused_parameters=True, broadcast_buffers=False)


def check_finite(loss: torch.Tensor, step: int, path: str, lr: float, last_good: str = "") -> None:
    """Stop before a non-finite loss reaches the weights, naming the step and the last good state."""
    if not torch.isfinite(loss):
        raise SamtuneError(
            f"loss became {loss.item()} at step {step} ({path} path); lower train.lr (now {lr})"
            + (f" or set train.clip_grad_norm; {last_good}" if last_good else "") + "."
        )


@dataclass
class MicroBatch:
    """One micro-batch on the model's device, with its cached image embeddings (or None: the
    encoder runs) and the number of masks it trains (for masks/s)."""

    batch: dict
    embeddings: ImageEmbeddings | None = None
    masks: int = 0


@dataclass
class Optimization:
    """What every optimiser step uses, built once per run (``build_optimization``)."""

    step_loss: torch.nn.Module  # StepLoss, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fns: dict  # "prompted" / "automatic" -> loss module
    accumulate: int  # micro-batches per step (train.accumulate)
    clip_grad_norm: float | None  # train.clip_grad_norm
    lr: float  # train.lr, named in error messages
    trainable: list  # the trained parameters in the model's order (the order the norm is summed in)
    world: int = 1  # processes (DDP syncs gradients at the last micro-batch only)


@dataclass(frozen=True)
class StepResult:
    loss: float  # the step's loss: mean over micro-batches (and processes)
    grad_norm: float | None  # before clipping; None without train.clip_grad_norm
    masks: int  # masks trained in this step, all processes together


def build_optimization(model, family, recipe: Recipe, loss_fns: dict, ranks: Ranks = Ranks()) -> Optimization:  # noqa: B008  (frozen dataclass)
    """The optimiser (``train.lr`` and its groups), the scheduler and the step's loss for ``model``."""
    from samtune.finetune.train.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, recipe.train)
    t = recipe.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Optimization(wrap_data_parallel(StepLoss(model, family, recipe), ranks), optimizer, build_scheduler(optimizer, t),
                        loss_fns, t.accumulate, t.clip_grad_norm, t.lr, trainable, ranks.world)  # fmt: skip


def optimizer_step(opt: Optimization, next_batch: Callable[[], MicroBatch], path: str, use_box: bool, click_generator,
                   step: int, last_good: str = "") -> StepResult:  # fmt: skip
    """One optimiser step: ``opt.accumulate`` micro-batches from ``next_batch`` (gradients summed,
    each loss scaled by 1/accumulate; DDP syncs at the last one only), the loss averaged across
    processes and checked, the gradient norm clipped and checked, then the optimiser and scheduler
    step. ``path``: "prompted" (``use_box``: box or points first) or "automatic". Nothing reaches
    the weights when the loss or the gradient norm is not finite: the error names ``step`` and
    ``last_good``."""
    auto = path == "automatic"
    opt.optimizer.zero_grad(set_to_none=True)
    total, masks = None, 0
    for micro in range(opt.accumulate):
        mb = next_batch()
        masks += opt.world * mb.masks
        sync = opt.world == 1 or micro == opt.accumulate - 1
        with contextlib.nullcontext() if sync else opt.step_loss.no_sync():
            loss = opt.step_loss(mb.batch, auto, use_box, click_generator, opt.loss_fns[path], mb.embeddings)
            (loss / opt.accumulate).backward()
        part = loss.detach().float() / opt.accumulate
        total = part if total is None else total + part
    # checked on every rank alike (a rank that stopped alone would leave the others waiting),
    # before the optimiser step: the weights never see a non-finite gradient
    total = mean_across_ranks(total)
    check_finite(total, step, path, opt.lr, last_good)
    grad_norm = None
    if opt.clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(opt.trainable, opt.clip_grad_norm)
        if not torch.isfinite(norm):
            raise SamtuneError(f"the gradient norm became {norm.item()} at step {step} ({path} path); lower train.lr (now {opt.lr}); {last_good}.")
        grad_norm = norm.item()
    opt.optimizer.step()
    opt.scheduler.step()
    return StepResult(total.item(), grad_norm, masks)


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
