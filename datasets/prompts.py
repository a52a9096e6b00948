"""Prompts sampled from the ground truth, one configuration for training and evaluation.

- Boxes (MedSAM, Ma et al., 2024): the tight box with each edge moved outward by uniform
  0..jitter_px pixels, or by 0..jitter_frac of the box's width/height, clipped to the image.
- Points: k positive points inside the object and m negative points outside it but inside its box
  (where the confusable context is); positives uniform or at the object's centre (maximum of the
  distance transform, as micro-sam and SAM-Med2D place a first click).
- Corrective clicks (SAM paper, Kirillov et al., 2023): one point per round, uniform from the
  error region of the previous prediction; a false-negative pixel gives a positive click, a
  false-positive pixel a negative one. Done on the trainer's tensors (``sample_error_clicks``).

Coordinates are (x, y) in the model's input frame (after the longest-side resize), xyxy for boxes.
Point labels follow SAM: 1 positive, 0 negative, -1 padding ("not a point").
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from scipy import ndimage

PAD_LABEL = -1


class PromptOptions(Protocol):
    """What prompt sampling reads of the recipe's ``prompts:`` section (samtune.finetune.recipe)."""

    per: str  # "class": all pixels of a class are one object; "component": each connected component
    box_probability: float  # points are sampled only when some first prompts are points (< 1)
    box_jitter_px: float
    box_jitter_frac: float
    positive_points: int
    negative_points: int
    point_placement: str  # "uniform" | "center"


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (float32, pixel edges: x1 = last column + 1) of a non-empty H×W mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # cheaper than np.nonzero
    if rows.size == 0:
        raise ValueError("box_from_mask: the mask is empty")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def sample_box(
    mask: np.ndarray,
    jitter_px: float,
    rng: np.random.Generator,
    jitter_frac: float = 0.0,
    image_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Box around ``mask`` with each edge moved outward by U(0, jitter), clipped to the image
    (``image_hw``: its resized size inside a padded mask; default the mask's own shape)."""
    box = box_from_mask(mask)
    limit = np.full(4, jitter_px, np.float32)
    if jitter_frac > 0:
        w, h = box[2] - box[0], box[3] - box[1]
        limit = np.maximum(limit, jitter_frac * np.array([w, h, w, h], np.float32))
    if np.any(limit > 0):
        box = box + np.array([-1, -1, 1, 1], np.float32) * (rng.uniform(0, 1, 4) * limit).astype(np.float32)
    h, w = image_hw or mask.shape
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)


def sample_points(
    mask: np.ndarray,
    box: np.ndarray,
    positives: int,
    negatives: int,
    placement: str,
    rng: np.random.Generator,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positives+negatives)×2 float32 (x, y) points and their labels; missing ones padded (-1).

    Positives lie inside ``mask``; negatives outside it within ``box`` (or anywhere outside the
    mask when the box holds no background).
    """
    n = positives + negatives
    points = np.zeros((n, 2), np.float32)
    labels = np.full(n, PAD_LABEL, np.int64)
    if n == 0:
        return points, labels
    inside = np.argwhere(mask) if positives else None  # K×2 (y, x)
    for i in range(positives):
        if inside.size == 0:
            break
        if placement == "center" and i == 0:
            distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
        else:
            y, x = inside[rng.integers(len(inside))]
        points[i], labels[i] = (x, y), 1
    if negatives:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        region = np.zeros_like(mask)
        region[y0:y1, x0:x1] = True
        outside = np.argwhere(region & ~mask)
        if outside.size == 0:  # the box holds no background: anywhere in the image outside the object
            image = np.zeros_like(mask)
            h, w = image_hw or mask.shape
            image[:h, :w] = True
            outside = np.argwhere(image & ~mask)
        for i in range(positives, n):
            if outside.size == 0:
                break
            y, x = outside[rng.integers(len(outside))]
            points[i], labels[i] = (x, y), 0
    return points, labels


def split_objects(class_mask: np.ndarray, per: str) -> list[np.ndarray]:
    """One class's H×W mask -> the objects to prompt: itself, or its connected components
    (8-connectivity), largest first."""
    if per == "class":
        return [class_mask]
    components, count = ndimage.label(class_mask, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(class_mask, components, index=np.arange(1, count + 1))
    return [components == k + 1 for k in np.argsort(-sizes, kind="stable")]


def instance_objects(instances: np.ndarray, class_mask: np.ndarray) -> list[np.ndarray]:
    """One class's annotated instances (H×W instance map, 0 none) -> their visible masks, largest
    first (ties in instance order); the class mask itself where no instance covers it."""
    sizes = np.bincount(instances[class_mask].ravel())
    ids = [k for k in np.argsort(-sizes, kind="stable") if k and sizes[k]]
    return [(instances == k) & class_mask for k in ids] or [class_mask]


def sample_error_clicks(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per mask from the error region of the previous prediction.

    ``pred``, ``target``, ``valid``: N×H×W bool (``valid`` excludes the padding). Returns N×1×2
    float (x, y) points and N×1 labels: 1 on a false negative, 0 on a false positive, -1 (padding,
    no click) where the prediction has no error.
    """
    false_negative = target & ~pred & valid
    error = (false_negative | (pred & ~target & valid)).flatten(1)
    has_error = error.any(dim=1)
    weights = error.float()
    weights[~has_error] = 1.0  # multinomial needs mass; these rows become padding clicks
    # sampled where the masks are (``generator`` must live on that device): no N×H×W copy to the CPU
    flat = torch.multinomial(weights, 1, generator=generator)  # N×1
    width = pred.shape[-1]
    points = torch.stack([flat % width, flat // width], dim=-1).float()  # N×1×2 (x, y)
    labels = false_negative.flatten(1).gather(1, flat).long()  # 1 = FN, 0 = FP
    labels[~has_error] = PAD_LABEL
    return points, labels
