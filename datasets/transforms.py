"""SAM's input preprocessing.

SAM (Kirillov et al., 2023) resizes the longest side to the model's image size, normalises 0-255
RGB with its pixel mean/std, then zero-pads bottom/right to a square; padding after normalisation
makes the padded area equal the mean colour, as the official preprocessing does.

The image is resized with Pillow's bilinear filter because the official pipeline does
(segment_anything's ResizeLongestSide.apply_image resizes a PIL image through torchvision;
transformers' SamImageProcessor uses Pillow too): a uint8 image gives the official model input
exactly, with the installed Pillow. Pillow widens the filter with the reduction (antialiased
when shrinking); OpenCV's INTER_LINEAR does not and differs by up to 0.42 in normalised units on a
2048→1024 downscale. Sizes round like the official get_preprocess_shape. Labels stay nearest
neighbour, with OpenCV's INTER_NEAREST_EXACT: equal to Pillow's NEAREST (transformers' label
resize) and centred where the image filter is (INTER_NEAREST takes the top-left pixel of each
source block, up to half an output pixel off the image when shrinking).

Cost: Pillow resizes 10-20× slower than OpenCV (512×512 RGB -> 256²: 1.5 ms vs 0.08 ms per core),
so a grey image (R = G = B: CT, MR) is resized as one band, which Pillow filters exactly like each
band of an RGB image. benchmarks/data_throughput.py, per core: NIfTI cached NIFTI_FIGURE;
Cityscapes CS_FIGURE. A lookup table normalises uint8 planes straight into the padded buffer.
Augmentation stays with albumentations.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
from PIL import Image

# SAM's pixel statistics on 0-255 RGB (Kirillov et al., 2023).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h, w) after the longest side is resized to ``image_size``, rounded half up exactly like
    segment_anything's ResizeLongestSide.get_preprocess_shape (2.5 -> 3, where round() gives 2)."""
    h, w = original_hw
    scale = image_size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_planes(image: np.ndarray, hw: tuple[int, int]) -> list[np.ndarray]:
    """H×W×3 -> three h×w planes, Pillow bilinear. uint8 stays uint8, equal to the official resize.
    Other dtypes (official SAM takes uint8 only) go per channel through Pillow's float mode "F":
    the same filter without rounding to integers, float32 out."""
    size = hw[::-1]  # Pillow takes (w, h)
    if image.dtype != np.uint8:
        planes = (np.ascontiguousarray(image[:, :, c], np.float32) for c in range(3))
        return [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in planes]
    grey = cv2.extractChannel(image, 0)
    if cv2.norm(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), image, cv2.NORM_INF) == 0:  # R = G = B: a third of the work
        return [np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))] * 3
    return cv2.split(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)))


class SamTransform:
    """``transform(image=H×W×3, mask=H×W)`` -> {"image": S×S×3 float32 normalised and padded,
    "mask": S×S padded with 0}; the mask is resized with nearest neighbour only."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        # per channel: uint8 value -> normalised float32
        self.luts = [((np.arange(256, dtype=np.float32) - m) / s).reshape(1, 256) for m, s in zip(PIXEL_MEAN, PIXEL_STD)]

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        return resized_shape(original_hw, self.image_size)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        size = self.image_size
        h, w = resized_shape(image.shape[:2], size)
        if (h, w) != image.shape[:2]:
            planes = resize_planes(image, (h, w))
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        else:
            planes = cv2.split(image) if image.dtype == np.uint8 else list(image.transpose(2, 0, 1))
        chw = np.zeros((3, size, size), np.float32)  # 0 = the mean colour after normalisation
        for c, plane in enumerate(planes):
            if plane.dtype == np.uint8:
                chw[c, :h, :w] = cv2.LUT(plane, self.luts[c])
            else:
                chw[c, :h, :w] = (plane - PIXEL_MEAN[c]) / PIXEL_STD[c]
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
