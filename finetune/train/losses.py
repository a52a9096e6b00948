"""Losses: weighted Dice + focal on a prompted object's logits (MONAI's DiceFocalLoss), and the
automatic mode's per-class Dice + focal over whole label maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# MONAI is imported inside the functions: it takes seconds to import, and `samtune predict` and
# `samtune evaluate` never build a loss.


def make_mask_loss(dice_weight: float, focal_weight: float, bce_weight: float = 0.0):
    """N×M×H×W logits vs. N×M×H×W binary targets -> N×M×H×W (reduction "none"): Dice is computed
    per mask and broadcast over the pixels, so the spatial mean of the result is each mask's
    Dice + mean focal loss (+ mean binary cross-entropy with ``bce_weight``); the caller picks the
    best of SAM's multimask outputs with it."""
    from monai.losses import DiceFocalLoss

    dice_focal = DiceFocalLoss(sigmoid=True, lambda_dice=dice_weight, lambda_focal=focal_weight, gamma=2.0, reduction="none")
    if not bce_weight:
        return dice_focal
    return _WithBCE(dice_focal, bce_weight)


class _WithBCE(torch.nn.Module):
    """A mask loss plus ``weight`` × binary cross-entropy per pixel (SAMed's CE term: for one binary
    mask the cross-entropy over {object, background} is the BCE of its logit)."""

    def __init__(self, loss, weight: float):
        super().__init__()
        self.loss, self.weight = loss, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target) + self.weight * F.binary_cross_entropy_with_logits(logits, target, reduction="none")


class AutomaticLoss(torch.nn.Module):
    """The automatic path's loss: per class, Dice over the whole batch + mean sigmoid focal loss,
    over the pixels that count (class index 255 = ignored label or padding), weighted per class.

    Dice over the batch (nnU-Net's "batch Dice") rather than per image: a class absent from one
    image then has no Dice of its own, so an image without the class is not scored by a ratio of
    two near-zero sums; its false positives are still paid through the focal term and the batch's
    Dice. Written by hand because MONAI's DiceFocalLoss has no per-pixel mask.
    """

    def __init__(self, dice_weight: float, focal_weight: float, class_weights: torch.Tensor | None = None, smooth: float = 1.0, bce_weight: float = 0.0):
        super().__init__()
        self.dice_weight, self.focal_weight, self.smooth, self.bce_weight = dice_weight, focal_weight, smooth, bce_weight
        from monai.losses import FocalLoss

        self.focal = FocalLoss(gamma=2.0, use_softmax=False, reduction="none")
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits`` B×K×S×S (float32), ``labels`` B×S×S class indexes (K background, 255 ignored);
        logits of a smaller size s×s (the decoder's own) are scored against area-averaged labels."""
        k = logits.shape[1]
        valid = (labels != 255).unsqueeze(1).float()  # B×1×S×S
        target = (labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1, 1)).float()
        if logits.shape[-2:] != labels.shape[-2:]:  # loss.resolution: low_res: s×s logits, S×S labels
            # area averages: each low-res pixel weighs by its counted share and targets the class
            # share among the counted pixels under it
            size = logits.shape[-2:]
            target = F.interpolate(target * valid, size=size, mode="area")
            valid = F.interpolate(valid, size=size, mode="area")
            target = target / valid.clamp(min=1e-6)
        pixels = valid.sum().clamp(min=1.0)
        focal = (self.focal(logits, target) * valid).sum((0, 2, 3)) / pixels  # K
        probs = torch.sigmoid(logits) * valid
        inter = (probs * target).sum((0, 2, 3))
        dice = 1 - (2 * inter + self.smooth) / (probs.sum((0, 2, 3)) + target.sum((0, 2, 3)) + self.smooth)
        per_class = self.dice_weight * dice + self.focal_weight * focal
        if self.bce_weight:
            bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum((0, 2, 3)) / pixels
            per_class = per_class + self.bce_weight * bce
        weights = self.class_weights if self.class_weights.numel() else torch.ones_like(per_class)
        return (per_class * weights).sum() / weights.sum().clamp(min=1e-12)
