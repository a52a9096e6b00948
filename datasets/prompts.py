"""Prompts sampled from the ground truth.

Boxes follow MedSAM's convention (Ma et al., 2024): the tight box around the object with each
edge moved outward by a uniform random 0..jitter_px pixels (in the model's input frame), clipped
to the image.
"""

from __future__ import annotations

import numpy as np


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (float32, pixel edges: x1 = last column + 1) of a non-empty H×W mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("box_from_mask: the mask is empty")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def sample_box(mask: np.ndarray, jitter_px: float, rng: np.random.Generator) -> np.ndarray:
    """Box around ``mask`` with each edge moved outward by U(0, jitter_px), clipped to the image."""
    box = box_from_mask(mask)
    if jitter_px > 0:
        box = box + np.array([-1, -1, 1, 1], np.float32) * rng.uniform(0, jitter_px, 4).astype(np.float32)
    h, w = mask.shape
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)
