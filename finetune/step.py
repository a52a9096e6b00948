"""One training step's loss, for the two paths (prompted: prompt rounds; automatic: every class
prompt on every image), as the trainer (finetune/trainer.py) and its tests run it: autocast by
``train.precision``, cached image embeddings when ``train.embedding_cache``, the DDP wrapper, and
the non-finite-loss guard."""

from __future__ import annotations

import torch

from samtune import SamtuneError
from samtune.adapters.family import ImageEmbeddings
from samtune.datasets import sample as S
from samtune.datasets import semantic as SEM
from samtune.finetune.automatic import class_logits, class_low_res
from samtune.finetune.distributed import Ranks
from samtune.finetune.interaction import run_rounds
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


def automatic_loss(model, family, batch: dict, recipe: Recipe, loss_fn, embeddings=None) -> torch.Tensor:
    """The automatic path's loss: every class prompt on every image of the batch."""
    with autocast(batch[SEM.IMAGE].device, recipe.train.precision):
        if recipe.loss.resolution == "low_res":  # the decoder's s×s logits against area-averaged labels
            logits = class_low_res(model, family, batch[SEM.IMAGE], embeddings=embeddings)
        else:
            logits = class_logits(model, family, batch[SEM.IMAGE], embeddings=embeddings)
    return loss_fn(logits, batch[SEM.LABELS])


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
            return automatic_loss(self.model, self.family, batch, self.recipe, loss_fn, embeddings)
        return prompted_loss(self.model, self.family, batch, self.recipe, use_box, click_generator, loss_fn, embeddings)


def wrap_data_parallel(step_loss: StepLoss, ranks: Ranks):
    """DDP around the step's loss with more than one process; the module itself otherwise."""
    if ranks.world == 1:
        return step_loss
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a prompted step leaves the class prompts (and a box step the point
    # embeddings) without gradient; buffers are constants (positional tables), not broadcast.
    return DistributedDataParallel(step_loss, find_unused_parameters=True, broadcast_buffers=False)


def check_finite(loss: torch.Tensor, step: int, path: str, recipe: Recipe, last_good: str = "") -> None:
    """Stop before a non-finite loss reaches the weights, naming the step and the last good state."""
    if not torch.isfinite(loss):
        raise SamtuneError(
            f"loss became {loss.item()} at step {step} ({path} path); lower train.lr (now {recipe.train.lr})"
            + (f" or set train.clip_grad_norm; {last_good}" if last_good else "") + "."
        )


def train_step(model, family, batch: dict, recipe: Recipe, optimizer, use_box: bool, click_generator, loss_fn, step: int = 0) -> torch.Tensor:
    """One optimiser step of the prompted path on one batch (no accumulation, no clipping); the
    training loop itself runs ``optimizer_step``. Returns the loss."""
    loss = prompted_loss(model, family, batch, recipe, use_box, click_generator, loss_fn)
    check_finite(loss, step, "prompted", recipe)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
