"""SAM's input preprocessing.

SAM (Kirillov et al., 2023) resizes the longest side to the model's image size, normalises 0-255
RGB with its pixel mean/std, then zero-pads bottom/right to a square; padding after normalisation
makes the padded area equal the mean colour, as the official preprocessing does.

Written with OpenCV rather than an albumentations Compose (LongestMaxSize + Normalize +
PadIfNeeded gives the same arrays, checked in tests) because it is the hot path of every sample:
a lookup table normalises uint8 planes straight into the padded buffer, which doubled cached
NIfTI throughput in benchmarks/data_throughput.py. Augmentation stays with albumentations.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

# SAM's pixel statistics on 0-255 RGB (Kirillov et al., 2023).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h, w) after the longest side is resized to ``image_size`` (rounded like albumentations)."""
    h, w = original_hw
    scale = image_size / max(h, w)
    return int(round(h * scale)), int(round(w * scale))


class SamTransform:
    """``transform(image=H×W×3, mask=H×W)`` -> {"image": S×S×3 float32 normalised and padded,
    "mask": S×S padded with 0}; the mask is resized with nearest neighbour only."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        # per channel: uint8 value -> normalised float32
        self.luts = [((np.arange(256, dtype=np.float32) - m) / s).reshape(1, 256) for m, s in zip(PIXEL_MEAN, PIXEL_STD)]

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
            chw[:, :h, :w] = ((image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)
        padded = np.zeros((size, size), mask.dtype)
        padded[:h, :w] = mask
        return {"image": chw.transpose(1, 2, 0), "mask": padded}  # S×S×3 view of the 3×S×S buffer


def make_sam_transform(image_size: int) -> SamTransform:
    return SamTransform(image_size)


def check_image_range(image: np.ndarray, source: str) -> None:
    """Warn when an image looks already normalised: SAM normalises 0-255 RGB itself."""
    if image.dtype != np.uint8 and image.size and float(np.max(image)) <= 1.0:
        warnings.warn(
            f"{source}: image values lie in [0, 1]; samtune expects 0-255 RGB and normalises it "
            "with SAM's pixel mean/std itself. Scale the image to 0-255 first.",
            stacklevel=2,
        )
