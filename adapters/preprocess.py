"""SAM's input preprocessing, owned by the SAM model family (``SamFamily.make_transform``).

SAM (Kirillov et al., 2023) resizes the longest side to the model's image size, normalises 0-255
RGB with its pixel mean/std, then zero-pads bottom/right to a square; padding after normalisation
makes the padded area equal the mean colour, as the official preprocessing does.
"""

from __future__ import annotations

import cv2
import numpy as np

from samtune.constants import PIXEL_MEAN, PIXEL_STD


def resized_shape(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h, w) after the longest side is resized to ``image_size``."""
    h, w = original_hw
    scale = image_size / max(h, w)
    return int(round(h * scale)), int(round(w * scale))


class LongestSideTransform:
    """``transform(image=H×W×3, mask=H×W)`` -> {"image": S×S×3 float32 normalised and padded,
    "mask": S×S padded with 0}; the mask is resized with nearest neighbour only."""

    def __init__(self, image_size: int, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD):
        self.image_size = image_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        # per channel: uint8 value -> normalised float32
        self.luts = [((np.arange(256, dtype=np.float32) - m) / s).reshape(1, 256) for m, s in zip(self.pixel_mean, self.pixel_std)]

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        return resized_shape(original_hw, self.image_size)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        size = self.image_size
        h, w = resized_shape(image.shape[:2], size)
        if (h, w) != image.shape[:2]:
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        chw = np.zeros((3, size, size), np.float32)  # 0 = the mean colour after normalisation
        if image.dtype == np.uint8:
            for c, plane in enumerate(cv2.split(image)):
                chw[c, :h, :w] = cv2.LUT(plane, self.luts[c])[:, :]
        else:
            chw[:, :h, :w] = ((image.astype(np.float32) - self.pixel_mean) / self.pixel_std).transpose(2, 0, 1)
        padded = np.zeros((size, size), mask.dtype)
        padded[:h, :w] = mask
        return {"image": chw.transpose(1, 2, 0), "mask": padded}  # S×S×3 view of the 3×S×S buffer
