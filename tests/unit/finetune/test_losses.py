"""finetune/losses.py: the per-mask Dice + focal loss used to pick the best of SAM's multimask outputs."""

from __future__ import annotations

import torch

from samtune.finetune.losses import make_mask_loss


def test_loss_is_per_mask_and_ranks_the_better_mask_lower():
    target = torch.zeros(1, 2, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = torch.full((1, 2, 8, 8), -8.0)
    logits[0, 0, 2:6, 2:6] = 8.0  # mask 0 right, mask 1 predicts nothing
    loss = make_mask_loss(1.0, 20.0)(logits, target)
    assert loss.shape == (1, 2, 8, 8)  # reduction "none": the caller reduces per mask
    per_mask = loss.mean(dim=(2, 3))[0]
    assert per_mask[0] < 0.01 and per_mask[1] > 0.5
    dice_only = make_mask_loss(1.0, 0.0)(logits, target).mean(dim=(2, 3))[0]
    assert dice_only[1] > 0.9  # 1 - Dice with no overlap (up to MONAI's smoothing)
