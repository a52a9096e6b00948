"""SAM's input preprocessing, owned by the SAM model family (``SamFamily.make_transform``).

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

Cost: Pillow resizes 10-20× slower than OpenCV (512×512 RGB -> 256²: 1.5 ms vs 0.08 ms per core).
Three things keep the data pipeline as fast as the OpenCV version was: grey slices (CT, MR) arrive
as one plane and are resized once; an exact 2:1 reduction (512² -> 256², 2048×1024 -> 1024×512)
takes ``halve_bilinear``, equal to Pillow and 2× faster; a lookup table normalises uint8 planes
straight into the padded buffer. benchmarks/data_throughput.py, samples/s per core on the 2-core
development machine, before (OpenCV INTER_LINEAR) -> after: NIfTI cached 923-1072 -> 905-937,
Cityscapes-style 219-232 -> 201-203.
Augmentation stays with albumentations (datasets/augment.py), before this transform.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from samtune.constants import PIXEL_MEAN, PIXEL_STD


def resized_shape(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h, w) after the longest side is resized to ``image_size``, rounded half up exactly like
    segment_anything's ResizeLongestSide.get_preprocess_shape (2.5 -> 3, where round() gives 2)."""
    h, w = original_hw
    scale = image_size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_planes(image: np.ndarray, hw: tuple[int, int]) -> list[np.ndarray]:
    """H×W×3 (or H×W grey) -> three h×w planes, Pillow bilinear. uint8 stays uint8, equal to the
    official resize. Other dtypes (official SAM takes uint8 only) go per channel through Pillow's
    float mode "F": the same filter without rounding to integers, float32 out."""
    size = hw[::-1]  # Pillow takes (w, h)
    if image.ndim == 2:  # grey (a CT/MR slice): one plane serves the three channels
        if image.dtype != np.uint8:
            return [np.asarray(Image.fromarray(np.ascontiguousarray(image, np.float32)).resize(size, Image.Resampling.BILINEAR))] * 3
        if _is_halving(image.shape, hw):
            return [halve_bilinear(halve_bilinear(image, 1), 0)] * 3  # columns first, as Pillow
        return [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))] * 3
    if image.dtype != np.uint8:
        planes = (np.ascontiguousarray(image[:, :, c], np.float32) for c in range(3))
        return [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in planes]
    if _is_halving(image.shape, hw):
        return [halve_bilinear(halve_bilinear(p, 1), 0) for p in cv2.split(image)]
    return cv2.split(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)))


def _is_halving(shape: tuple[int, ...], hw: tuple[int, int]) -> bool:
    """An exact 2:1 reduction of a landscape or square image: the case ``halve_bilinear`` equals
    Pillow on. (Pillow 13 rounds some portrait images as if it filtered rows first: those go to
    Pillow itself.)"""
    H, W = shape[:2]
    return hw == (H // 2, W // 2) and H % 2 == 0 and W % 2 == 0 and min(hw) >= 2 and W >= H


# Pillow's fixed-point weights (PRECISION_BITS = 22) of a 2:1 bilinear reduction at the two edges,
# where it drops the tap outside the image and renormalises: 3/7, 3/7, 1/7.
_EDGE_NEAR, _EDGE_FAR, _HALF = int(0.5 + 3 / 7 * 2**22), int(0.5 + 1 / 7 * 2**22), 1 << 21
_TAPS = np.array([[1, 3, 3, 1]], np.float32)


def halve_bilinear(plane: np.ndarray, axis: int) -> np.ndarray:
    """H×W uint8 -> half as many columns (axis 1) or rows (axis 0), equal to Pillow's BILINEAR
    resize to exactly half the size.

    Written by hand because Pillow is 2-3× slower than OpenCV at this, the most common resize
    (512² CT -> 256², 2048×1024 Cityscapes -> 1024×512): Pillow's filter for a 2:1 reduction is
    [1, 3, 3, 1] / 8 around each output pixel, whose fixed-point weights are exact powers of two,
    so an output pixel is (a + 3b + 3c + d + 4) >> 3, computed here with OpenCV's SIMD filter.
    Only the first and last pixel, where Pillow renormalises three taps, use its integer weights
    directly. tests/unit/adapters/test_preprocess.py compares it with Pillow itself.
    """
    n = plane.shape[axis] // 2
    taps = _TAPS if axis == 1 else _TAPS.T
    sums = cv2.filter2D(plane, cv2.CV_16S, taps, anchor=(1, 0) if axis == 1 else (0, 1), borderType=cv2.BORDER_REPLICATE)
    half = (n, plane.shape[0]) if axis == 1 else (plane.shape[1], n)
    sums = cv2.resize(sums, half, interpolation=cv2.INTER_NEAREST)  # keeps sums at 0, 2, 4, ...
    out = cv2.convertScaleAbs(sums, alpha=0.125, beta=0.00125)  # (x + 4) >> 3: rounds half up, not to even

    def edge(i: int) -> np.ndarray:
        return (plane[:, i] if axis == 1 else plane[i]).astype(np.int64)

    first = (_EDGE_NEAR * (edge(0) + edge(1)) + _EDGE_FAR * edge(2) + _HALF) >> 22
    last = (_EDGE_FAR * edge(2 * n - 3) + _EDGE_NEAR * (edge(2 * n - 2) + edge(2 * n - 1)) + _HALF) >> 22
    if axis == 1:
        out[:, 0], out[:, n - 1] = first, last
    else:
        out[0], out[n - 1] = first, last
    return out


class LongestSideTransform:
    """``transform(image=H×W×3 RGB or H×W grey, mask=H×W)`` -> {"image": S×S×3 float32 normalised and padded,
    "mask": S×S padded with 0}; the mask is resized with nearest neighbour only."""

    def __init__(self, image_size: int, pixel_mean: tuple[float, ...] = PIXEL_MEAN, pixel_std: tuple[float, ...] = PIXEL_STD):
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
            planes = resize_planes(image, (h, w))
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        elif image.ndim == 2:
            planes = [image] * 3
        else:
            planes = cv2.split(image) if image.dtype == np.uint8 else list(image.transpose(2, 0, 1))
        chw = np.zeros((3, size, size), np.float32)  # 0 = the mean colour after normalisation
        for c, plane in enumerate(planes):
            if plane.dtype == np.uint8:
                chw[c, :h, :w] = cv2.LUT(plane, self.luts[c])
            else:
                chw[c, :h, :w] = (plane - self.pixel_mean[c]) / self.pixel_std[c]
        padded = np.zeros((size, size), mask.dtype)
        padded[:h, :w] = mask
        return {"image": chw.transpose(1, 2, 0), "mask": padded}  # S×S×3 view of the 3×S×S buffer
