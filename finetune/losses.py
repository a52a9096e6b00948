"""Mask loss: weighted Dice + focal on the prompted object's logits (MONAI's DiceFocalLoss)."""

from __future__ import annotations

from monai.losses import DiceFocalLoss


def make_mask_loss(dice_weight: float, focal_weight: float) -> DiceFocalLoss:
    """B×1×H×W logits vs. B×1×H×W binary targets -> scalar; Dice is per sample, then averaged."""
    return DiceFocalLoss(sigmoid=True, lambda_dice=dice_weight, lambda_focal=focal_weight, gamma=2.0)
