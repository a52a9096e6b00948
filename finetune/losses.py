"""Mask loss: weighted Dice + focal on the prompted object's logits (MONAI's DiceFocalLoss)."""

from __future__ import annotations

from monai.losses import DiceFocalLoss


def make_mask_loss(dice_weight: float, focal_weight: float) -> DiceFocalLoss:
    """N×M×H×W logits vs. N×M×H×W binary targets -> N×M×H×W (reduction "none"): Dice is computed
    per mask and broadcast over the pixels, so the spatial mean of the result is each mask's
    Dice + mean focal loss; the caller picks the best of SAM's multimask outputs with it."""
    return DiceFocalLoss(sigmoid=True, lambda_dice=dice_weight, lambda_focal=focal_weight, gamma=2.0, reduction="none")
