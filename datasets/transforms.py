"""SAM's input preprocessing as an albumentations pipeline.

SAM (Kirillov et al., 2023) resizes the longest side to the model's image size, normalises 0-255
RGB with its pixel mean/std, then zero-pads bottom/right to a square; padding after normalisation
makes the padded area equal the mean colour, as the official preprocessing does.
"""

from __future__ import annotations

import warnings

import albumentations as A
import cv2
import numpy as np

# SAM's pixel statistics on 0-255 RGB (same values as samtune.adapters.registry; datasets do not
# import model code).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def make_sam_transform(image_size: int) -> A.Compose:
    return A.Compose(
        [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR),
            A.Normalize(mean=PIXEL_MEAN, std=PIXEL_STD, max_pixel_value=1.0),
            A.PadIfNeeded(
                min_height=image_size,
                min_width=image_size,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
            ),
        ]
    )


def resized_shape(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h, w) after the longest side is resized to ``image_size`` (rounded like albumentations)."""
    h, w = original_hw
    scale = image_size / max(h, w)
    return int(round(h * scale)), int(round(w * scale))


def check_image_range(image: np.ndarray, source: str) -> None:
    """Warn when an image looks already normalised: SAM normalises 0-255 RGB itself."""
    if image.dtype != np.uint8 and image.size and float(np.max(image)) <= 1.0:
        warnings.warn(
            f"{source}: image values lie in [0, 1]; samtune expects 0-255 RGB and normalises it "
            "with SAM's pixel mean/std itself. Scale the image to 0-255 first.",
            stacklevel=2,
        )
