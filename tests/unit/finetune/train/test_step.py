"""The optimiser step the loop runs (``optimizer_step``), on a fixed batch: it learns, accumulation
equals a bigger batch, clipping bounds the update, the scheduler advances, and a non-finite loss or
gradient stops the run before the weights change, naming the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.family import get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_model
from samtune.datasets import sample as S
from samtune.finetune.recipe import validate_recipe
from samtune.finetune.train.losses import make_mask_loss
from samtune.finetune.train.step import MicroBatch, build_optimization, optimizer_step

SIZE = 64


def fixed_batch(rows=slice(None)) -> dict:
    """Two images with one bright square each, the square as target, its box as prompt."""
    image = torch.full((2, 3, SIZE, SIZE), -1.0)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    boxes = torch.tensor([[[10.0, 12.0, 30.0, 40.0]], [[30.0, 8.0, 56.0, 28.0]]])
    for i, (x0, y0, x1, y1) in enumerate(boxes[:, 0].int().tolist()):
        image[i, :, y0:y1, x0:x1] = 1.5
        masks[i, 0, y0:y1, x0:x1] = 1.0
    batch = {
        S.IMAGE: image, S.MASKS: masks, S.BOXES: boxes,
        S.POINTS: torch.zeros(2, 1, 0, 2), S.POINT_LABELS: torch.zeros(2, 1, 0, dtype=torch.long),
        S.META: [{"resized_size": (SIZE, SIZE)}] * 2,
    }  # fmt: skip
    return {k: v[rows] for k, v in batch.items()}


def setup(**train):
    torch.manual_seed(0)
    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "train": {"lr": 1e-3, "warmup_steps": 0} | train})
    family = get_family("sam")
    model = prepare_trainable(build_model("tiny", image_size=SIZE), family, "lora", recipe.adapter.lora).train()
    loss = make_mask_loss(recipe.loss.dice_weight, recipe.loss.focal_weight)
    return model, build_optimization(model, family, recipe, {"prompted": loss})


def step(opt, batches, n: int = 1, **kw) -> float:
    it = iter(batches)
    return optimizer_step(opt, lambda: MicroBatch(next(it), None, 2), "prompted", True, torch.Generator().manual_seed(0), n, **kw)


def trained(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_steps_fit_a_fixed_batch():
    model, opt = setup(lr=3e-3, schedule="constant")
    results = [step(opt, [fixed_batch()], n) for n in range(1, 11)]
    losses = [r.loss for r in results]
    assert losses[-1] < 0.85 * losses[0], losses
    assert results[0].masks == 2 and results[0].grad_norm is None


def test_each_step_advances_the_schedule():
    model, opt = setup(steps=4, warmup_steps=2)
    lrs = [opt.scheduler.get_last_lr()[0]]
    for n in range(1, 5):
        step(opt, [fixed_batch()], n)
        lrs.append(opt.scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 0.0], abs=1e-9)  # warm-up, then cosine to 0


def test_accumulating_two_halves_equals_one_step_on_the_whole_batch():
    model, opt = setup()
    start = trained(model)
    step(opt, [fixed_batch()])
    whole = trained(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    model, halves_opt = model, build_optimization(model, get_family("sam"), validate_recipe(
        {"data": {"kind": "nifti", "root": "-"}, "train": {"lr": 1e-3, "warmup_steps": 0, "accumulate": 2}}), opt.loss_fns)  # fmt: skip
    result = step(halves_opt, [fixed_batch(slice(0, 1)), fixed_batch(slice(1, 2))])
    assert result.masks == 4  # both micro-batches counted
    halves = trained(model)
    moved = [n for n in whole if not torch.equal(whole[n], start[n])]
    assert moved
    for n in whole:
        torch.testing.assert_close(halves[n], whole[n], atol=2e-6, rtol=1e-4)


def test_clipping_reports_the_norm_and_bounds_the_update():
    def largest_change(**train) -> tuple[float, object]:
        model, opt = setup(**train)
        start = trained(model)
        result = step(opt, [fixed_batch()])
        return max((trained(model)[n] - start[n]).abs().max().item() for n in start), result

    free, unclipped = largest_change()
    clipped, result = largest_change(clip_grad_norm=1e-12)  # Adam divides by sqrt(v) + 1e-8: a clipped step is tiny
    assert unclipped.grad_norm is None and result.grad_norm > 1e-6  # the norm before clipping
    assert free > 5e-4 and 0 < clipped < free / 50, (free, clipped)  # what is left is weight decay


def test_a_non_finite_loss_names_the_step_and_leaves_the_weights():
    model, opt = setup()
    start = trained(model)
    batch = fixed_batch()
    batch[S.IMAGE][0, 0, 0, 0] = np.nan
    with pytest.raises(SamtuneError, match=r"loss became nan at step 7 \(prompted path\); lower train.lr \(now 0.001\) or set train.clip_grad_norm; the last good state is X"):
        step(opt, [batch], 7, last_good="the last good state is X")
    assert all(torch.equal(trained(model)[n], start[n]) for n in start)


def test_a_non_finite_gradient_norm_stops_before_the_update(monkeypatch):
    model, opt = setup(clip_grad_norm=1.0)
    start = trained(model)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf")))
    with pytest.raises(SamtuneError, match=r"the gradient norm became inf at step 3 \(prompted path\)"):
        step(opt, [fixed_batch()], 3)
    assert all(torch.equal(trained(model)[n], start[n]) for n in start)


@pytest.mark.parametrize("resolution", ["input", "low_res"])
def test_the_class_loss_is_computed_on_the_decoder_logits_whatever_loss_resolution(resolution, monkeypatch):
    """K class masks per image: the automatic loss scores the decoder's s×s logits against
    area-averaged labels with either loss.resolution (upsampling K maps to S×S made the loss most
    of an automatic step); the same number as the loss module on class_low_res."""
    from samtune.datasets import semantic as SEM
    from samtune.finetune.automatic import class_low_res
    from samtune.finetune.train.losses import AutomaticLoss
    from samtune.finetune.train.step import automatic_loss

    torch.manual_seed(0)
    recipe = validate_recipe({"task": "automatic", "data": {"kind": "nifti", "root": "-"}, "loss": {"resolution": resolution}})
    family = get_family("sam")
    size = 128  # the tiny model's decoder gives 64×64 at any input size: 2× smaller here
    model = build_model("tiny", image_size=size)
    family.add_class_prompts(model, 2, 2)
    labels = torch.randint(0, 3, (2, size, size), dtype=torch.uint8)
    batch = {SEM.IMAGE: torch.randn(2, 3, size, size), SEM.LABELS: labels}
    seen = []
    loss_fn = AutomaticLoss(1.0, 20.0)
    monkeypatch.setattr(loss_fn, "forward", lambda logits, target: seen.append(logits.shape) or AutomaticLoss.forward(loss_fn, logits, target))
    loss = automatic_loss(model, family, batch, recipe, loss_fn)
    assert seen == [(2, 2, 64, 64)]
    with torch.no_grad():
        torch.testing.assert_close(loss, AutomaticLoss(1.0, 20.0)(class_low_res(model, family, batch[SEM.IMAGE]), labels))
