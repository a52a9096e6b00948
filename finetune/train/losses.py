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


def class_targets(labels: torch.Tensor, k: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """B×S×S class indexes (K background, 255 ignored) -> per-class targets B×K×h×w and the counted
    share B×1×h×w of each pixel, at the logits' size ``size`` = (h, w).

    At the labels' own size: one-hot targets and a 0/1 mask. Smaller (``loss.resolution: low_res``,
    the decoder's S/4 output): area averages, so each low-res pixel weighs by the share of its S×S
    pixels that count and targets each class's share among them. Area rather than nearest: a class
    thinner than the 4 px step (poles, traffic lights, a kidney's rim at 128 px) keeps its share
    instead of vanishing or being sampled where the grid happens to fall, and the targets sum to
    the full-size pixel counts (÷16), so Dice keeps the same ratio. Counted per block with one
    ``bincount`` over the B×S×S labels, never a K×S×S one-hot (19 classes × 8 × 256² = 10 M
    floats a step on Cityscapes).
    """
    h, w = size
    big_h, big_w = labels.shape[-2:]
    if (h, w) == (big_h, big_w):
        valid = (labels != 255).unsqueeze(1).float()
        return (labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1, 1)).float(), valid
    if big_h % h or big_w % w:  # not a whole number of label pixels per logit: interpolate
        valid = (labels != 255).unsqueeze(1).float()
        target = (labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1, 1)).float()
        target = F.interpolate(target * valid, size=size, mode="area")
        valid = F.interpolate(valid, size=size, mode="area")
        return target / valid.clamp(min=1e-6), valid
    fy, fx = big_h // h, big_w // w
    codes = labels.long()
    codes = torch.where(codes == 255, k + 1, codes.clamp(max=k))  # K background, K + 1 ignored
    rows = torch.arange(big_h, device=labels.device) // fy
    cols = torch.arange(big_w, device=labels.device) // fx
    cell = rows[:, None] * w + cols[None, :]  # S×S -> its h×w pixel
    image = torch.arange(len(labels), device=labels.device).view(-1, 1, 1)
    counts = torch.bincount(((image * (k + 2) + codes) * (h * w) + cell).flatten(), minlength=len(labels) * (k + 2) * h * w)
    counts = counts.view(len(labels), k + 2, h, w).float()
    counted = fy * fx - counts[:, k + 1 :]  # B×1×h×w label pixels that count
    return counts[:, :k] / counted.clamp(min=1.0), counted / (fy * fx)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel sigmoid focal loss (Lin et al., 2017; no alpha) and the binary cross-entropy it
    scales: ``(1 - p_t)^gamma · BCE``, the numbers of MONAI's ``FocalLoss(use_softmax=False)``
    (``sigmoid_focal_loss``: ``exp(gamma · logsigmoid(-x·(2t-1)))·BCE``) in fewer full-size passes;
    soft targets (area-averaged labels) as MONAI takes them."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return torch.sigmoid(logits * (1 - 2 * target)).pow(gamma) * bce, bce


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
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` B×K×S×S (float32), ``labels`` B×S×S class indexes (K background, 255 ignored);
        logits of a smaller size s×s (the decoder's own) are scored against area-averaged labels
        (``class_targets``). ``classes``: the logits are those of these class indexes only
        (``automatic.classes_per_step``): the labels of every other class count as background."""
        weights = self.class_weights
        if classes is not None:
            lookup = torch.full((256,), len(classes), dtype=torch.long, device=labels.device)  # label value -> index among `classes`
            lookup[255] = 255
            lookup[classes] = torch.arange(len(classes), device=labels.device)
            labels = lookup[labels.long()]
            weights = weights[classes] if weights.numel() else weights
        target, valid = class_targets(labels, logits.shape[1], tuple(logits.shape[-2:]))
        pixels = valid.sum().clamp(min=1.0)
        focal, bce = sigmoid_focal(logits, target)
        focal = (focal * valid).sum((0, 2, 3)) / pixels  # K
        probs = torch.sigmoid(logits) * valid
        inter = (probs * target).sum((0, 2, 3))
        dice = 1 - (2 * inter + self.smooth) / (probs.sum((0, 2, 3)) + target.sum((0, 2, 3)) + self.smooth)
        per_class = self.dice_weight * dice + self.focal_weight * focal
        if self.bce_weight:
            per_class = per_class + self.bce_weight * (bce * valid).sum((0, 2, 3)) / pixels
        weights = weights if weights.numel() else torch.ones_like(per_class)
        return (per_class * weights).sum() / weights.sum().clamp(min=1e-12)
