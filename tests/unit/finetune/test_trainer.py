"""The training step: on a fixed batch, one optimiser step lowers the loss; a non-finite loss stops
the run with the step named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.family import get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_model
from samtune.datasets import sample as S
from samtune.finetune.losses import make_mask_loss
from samtune.finetune.recipe import validate_recipe
from samtune.finetune.trainer import train_step

SIZE = 64


def fixed_batch() -> dict:
    """Two images with one bright square each, the square as target, its box as prompt."""
    image = torch.full((2, 3, SIZE, SIZE), -1.0)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    boxes = torch.tensor([[[10.0, 12.0, 30.0, 40.0]], [[30.0, 8.0, 56.0, 28.0]]])
    for i, (x0, y0, x1, y1) in enumerate(boxes[:, 0].int().tolist()):
        image[i, :, y0:y1, x0:x1] = 1.5
        masks[i, 0, y0:y1, x0:x1] = 1.0
    return {
        S.IMAGE: image, S.MASKS: masks, S.BOXES: boxes,
        S.POINTS: torch.zeros(2, 1, 0, 2), S.POINT_LABELS: torch.zeros(2, 1, 0, dtype=torch.long),
        S.META: [{"resized_size": (SIZE, SIZE)}] * 2,
    }  # fmt: skip


def setup(lr: float = 1e-3):
    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "train": {"lr": lr}})
    family = get_family("sam")
    model = prepare_trainable(build_model("tiny", image_size=SIZE), family, "lora", recipe.adapter.lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.train.lr)
    loss_fn = make_mask_loss(recipe.loss.dice_weight, recipe.loss.focal_weight)
    return recipe, family, model, optimizer, loss_fn


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    recipe, family, model, optimizer, loss_fn = setup()
    batch = fixed_batch()
    generator = torch.Generator().manual_seed(0)
    before = train_step(model, family, batch, recipe, optimizer, True, generator, loss_fn).item()
    after = train_step(model, family, batch, recipe, optimizer, True, generator, loss_fn).item()
    assert after < before


def test_ten_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    recipe, family, model, optimizer, loss_fn = setup(lr=3e-3)
    batch = fixed_batch()
    generator = torch.Generator().manual_seed(0)
    losses = [train_step(model, family, batch, recipe, optimizer, True, generator, loss_fn).item() for _ in range(10)]
    assert losses[-1] < 0.85 * losses[0], losses


def test_non_finite_loss_names_the_step():
    torch.manual_seed(0)
    recipe, family, model, optimizer, loss_fn = setup()
    batch = fixed_batch()
    batch[S.IMAGE][0, 0, 0, 0] = np.nan
    with pytest.raises(SamtuneError, match=r"loss became nan at step 7 \(prompted path\); lower train.lr"):
        train_step(model, family, batch, recipe, optimizer, True, torch.Generator(), loss_fn, step=7)
