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


def test_classes_per_step_decodes_that_many_class_prompts_and_scores_them_as_the_full_loss_would():
    """automatic.classes_per_step: N of the K class prompts decoded; their loss is the full loss
    restricted to those classes (the per-class terms do not depend on the other classes)."""
    from samtune.datasets import semantic as SEM
    from samtune.finetune.automatic import class_low_res
    from samtune.finetune.train.losses import AutomaticLoss
    from samtune.finetune.train.step import automatic_loss

    torch.manual_seed(0)
    recipe = validate_recipe({"task": "automatic", "data": {"kind": "nifti", "root": "-"}, "automatic": {"classes_per_step": 2}})
    family = get_family("sam")
    model = build_model("tiny", image_size=SIZE)
    family.add_class_prompts(model, 5, 2)
    labels = torch.full((2, SIZE, SIZE), 5, dtype=torch.uint8)  # background, with classes 1 and 3 present
    labels[0, :20, :20], labels[1, 30:, 30:], labels[1, :4] = 1, 3, 255
    batch = {SEM.IMAGE: torch.randn(2, 3, SIZE, SIZE), SEM.LABELS: labels}
    decoded = []
    original = family.decode_classes
    family_spy = type("Spy", (), {"encode_images": family.encode_images,
                                  "decode_classes": lambda self, m, e, t: decoded.append(len(t)) or original(m, e, t)})()  # fmt: skip
    weights = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0])
    loss = automatic_loss(model, family_spy, batch, recipe, AutomaticLoss(1.0, 20.0, weights), click_generator=torch.Generator().manual_seed(0))
    assert decoded == [2]
    with torch.no_grad():  # the present classes 1 and 3 were chosen: the full loss with every other class weighted 0
        everything = class_low_res(model, family, batch[SEM.IMAGE])
        only_1_3 = AutomaticLoss(1.0, 20.0, weights * torch.tensor([0.0, 1, 0, 1, 0]))(everything, labels)
    torch.testing.assert_close(loss, only_1_3)


def test_step_classes_puts_present_classes_first_then_fills_with_absent_ones():
    from samtune.finetune.train.step import step_classes

    labels = torch.full((1, 8, 8), 6, dtype=torch.uint8)  # K = 6, 6 = background
    labels[0, 0, :3] = torch.tensor([0, 4, 255], dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        chosen = step_classes(labels, 6, 3, generator).tolist()
        assert {0, 4} <= set(chosen) and len(set(chosen)) == 3 and chosen == sorted(chosen)
    assert step_classes(labels, 6, 6, generator) is None  # every class: the usual step
    draws = {tuple(step_classes(labels, 6, 1, generator).tolist()) for _ in range(30)}
    assert draws == {(0,), (4,)}  # more present classes than N: a random N of them
    first = step_classes(labels, 6, 3, torch.Generator().manual_seed(9))
    assert torch.equal(first, step_classes(labels, 6, 3, torch.Generator().manual_seed(9)))  # the generator decides (exact resume)


def test_classes_per_step_and_corrective_rounds_are_refused_together():
    with pytest.raises(SamtuneError, match="classes_per_step with automatic.corrective_rounds"):
        validate_recipe({"data": {"kind": "nifti", "root": "-"}, "automatic": {"classes_per_step": 4, "corrective_rounds": 1}})
