"""adapters/preprocess.py: SAM's resize / normalise / pad."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("image_size", [64, 128, 1024])
def test_sam_transform_mask_and_padding_equal_the_albumentations_pipeline(image_size):
    """The mask and the padding are what albumentations' LongestMaxSize + Normalize + PadIfNeeded
    gives. The image inside is not compared: LongestSideTransform resizes it with Pillow's antialiased
    bilinear filter like official SAM, LongestMaxSize with OpenCV's (up to 0.42 apart in normalised
    units); test_resize_equals_the_official_resize checks it."""
    import albumentations as A
    import cv2

    from samtune.adapters.preprocess import PIXEL_MEAN, PIXEL_STD, LongestSideTransform, resized_shape

    reference = A.Compose([
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST_EXACT),
        A.Normalize(mean=PIXEL_MEAN, std=PIXEL_STD, max_pixel_value=1.0),
        A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
    ])  # fmt: skip
    rng = np.random.default_rng(image_size)
    for shape in [(37, 101), (256, 512), (300, 17), (image_size, image_size)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        label = rng.integers(0, 5, shape, dtype=np.uint8)
        ours, theirs = LongestSideTransform(image_size)(image=image, mask=label), reference(image=image, mask=label)
        np.testing.assert_array_equal(ours["mask"], theirs["mask"])
        h, w = resized_shape(shape, image_size)
        padding = np.ones((image_size, image_size), bool)
        padding[:h, :w] = False
        np.testing.assert_array_equal(ours["image"][padding], theirs["image"][padding])


# ------------------------------------- equality with official SAM -------------------------------------
def _image(kind: str, hw: tuple[int, int], rng) -> np.ndarray:
    """H×W×3 uint8: "noise" (independent pixels), "smooth" (blurred noise), "grey" (smooth, R = G = B)."""
    import cv2

    noise = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    if kind == "noise":
        return noise
    smooth = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 3)
    smooth = np.clip((smooth - smooth.mean()) * 8 + 128, 0, 255).astype(np.uint8)  # blur flattens: stretch back
    return np.repeat(smooth[:, :, :1], 3, axis=2) if kind == "grey" else smooth


CASES = [((1024, 2048), 1024), ((200, 300), 128), ((48, 64), 128), ((37, 101), 64)]  # downscales, an upscale


@pytest.mark.parametrize("kind", ["noise", "smooth", "grey"])
@pytest.mark.parametrize(("hw", "image_size"), CASES)
def test_resize_equals_the_official_resize(hw, image_size, kind):
    """The resized pixels are exactly official SAM's: ResizeLongestSide.apply_image resizes a PIL
    image with Pillow's bilinear filter (through torchvision) to get_preprocess_shape's size."""
    from PIL import Image

    from samtune.adapters.preprocess import PIXEL_MEAN, PIXEL_STD, LongestSideTransform

    image = _image(kind, hw, np.random.default_rng(image_size))
    scale = image_size * 1.0 / max(hw)  # get_preprocess_shape
    h, w = int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5)
    official = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    out = LongestSideTransform(image_size)(image=image, mask=np.zeros(hw, np.uint8))["image"]
    grey_levels = np.rint(out[:h, :w] * PIXEL_STD + PIXEL_MEAN)  # undo the normalisation: 0-255 again
    np.testing.assert_array_equal(grey_levels, official)


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize(("hw", "image_size"), CASES[:3])
def test_sam_transform_matches_transformers_sam_image_processor(hw, image_size, kind):
    """Image and label inputs as transformers' SamImageProcessor prepares them (longest side to S,
    rescale + normalise, zero padding to S×S; labels nearest neighbour, padded with 0): the image
    within one grey level (1/std normalised), the label exactly."""
    from transformers import SamImageProcessor

    from samtune.adapters.preprocess import PIXEL_STD, LongestSideTransform

    rng = np.random.default_rng(image_size)
    image, label = _image(kind, hw, rng), rng.integers(0, 5, hw, dtype=np.uint8)
    square = {"height": image_size, "width": image_size}
    processor = SamImageProcessor(size={"longest_edge": image_size}, pad_size=square, mask_size={"longest_edge": image_size}, mask_pad_size=square)
    theirs = processor(image, segmentation_maps=label, return_tensors="np")
    ours = LongestSideTransform(image_size)(image=image, mask=label)
    one_grey_level = 1 / np.array(PIXEL_STD, np.float32)[:, None, None] + 1e-5  # per channel, C×1×1
    assert np.all(np.abs(ours["image"].transpose(2, 0, 1) - theirs["pixel_values"][0]) <= one_grey_level)
    np.testing.assert_array_equal(ours["mask"], theirs["labels"][0])
    assert tuple(theirs["reshaped_input_sizes"][0]) == LongestSideTransform(image_size).resized_shape(hw)


# ------------------------------------------ output layout ------------------------------------------
@pytest.mark.parametrize(("hw", "image_size"), [((1024, 2048), 1024), ((200, 300), 128), ((64, 48), 128), ((128, 90), 128)])
def test_shapes_padding_and_nearest_neighbour_mask(hw, image_size):
    from PIL import Image

    from samtune.adapters.preprocess import LongestSideTransform, resized_shape

    rng = np.random.default_rng(0)
    image = _image("noise", hw, rng)
    label = rng.choice(np.array([0, 3, 7, 255], np.uint8), hw)  # 255: an ignore index
    out = LongestSideTransform(image_size)(image=image, mask=label)
    h, w = resized_shape(hw, image_size)
    assert max(h, w) == image_size
    assert out["image"].shape == (image_size, image_size, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (image_size, image_size) and out["mask"].dtype == np.uint8
    assert not out["image"][h:].any() and not out["image"][:, w:].any()  # 0 = SAM's mean colour
    assert not out["mask"][h:].any() and not out["mask"][:, w:].any()
    assert set(np.unique(out["mask"][:h, :w])) <= {0, 3, 7, 255}  # no blended label values
    # nearest neighbour centred like the image filter: Pillow's NEAREST, as transformers resizes labels
    official = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out["mask"][:h, :w], official)


def test_binary_mask_stays_binary():
    from samtune.adapters.preprocess import LongestSideTransform

    mask = np.zeros((300, 200), bool)
    mask[40:260, 30:170] = True
    out = LongestSideTransform(128)(image=np.zeros((300, 200, 3), np.uint8), mask=mask)["mask"]
    assert out.dtype == bool and out.any() and (~out).any()


def test_resized_shape_rounds_half_up_like_get_preprocess_shape():
    from samtune.adapters.preprocess import resized_shape

    assert resized_shape((5, 8), 4) == (3, 4)  # 2.5 -> 3 (round() would give 2)
    assert resized_shape((3, 8), 4) == (2, 4)  # 1.5 -> 2
    rng = np.random.default_rng(0)
    for h, w, size in zip(rng.integers(1, 3000, 500), rng.integers(1, 3000, 500), rng.integers(16, 2048, 500)):
        scale = size * 1.0 / max(h, w)  # segment_anything ResizeLongestSide.get_preprocess_shape
        assert resized_shape((int(h), int(w)), int(size)) == (int(h * scale + 0.5), int(w * scale + 0.5))


def test_an_image_already_at_size_is_only_normalised():
    from samtune.adapters.preprocess import PIXEL_MEAN, PIXEL_STD, LongestSideTransform

    image = _image("noise", (128, 80), np.random.default_rng(1))
    out = LongestSideTransform(128)(image=image, mask=np.ones((128, 80), np.uint8))
    np.testing.assert_allclose(out["image"][:, :80], (image - np.array(PIXEL_MEAN)) / PIXEL_STD, atol=1e-6)
    assert out["mask"][:, :80].all() and not out["mask"][:, 80:].any()


def test_float_images_resize_like_uint8_within_a_grey_level():
    """Non-uint8 images are resized per channel in Pillow's float mode: the same filter, unrounded."""
    from samtune.adapters.preprocess import LongestSideTransform

    image = _image("smooth", (200, 300), np.random.default_rng(2))
    mask = np.zeros((200, 300), np.uint8)
    as_uint8 = LongestSideTransform(128)(image=image, mask=mask)["image"]
    as_float = LongestSideTransform(128)(image=image.astype(np.float32), mask=mask)["image"]
    assert as_float.dtype == np.float32
    assert np.abs(as_float - as_uint8).max() <= 1 / 57.12 + 1e-5  # one grey level, normalised


@pytest.mark.parametrize("hw", [(512, 512), (400, 512), (4, 6), (6, 4), (2048, 1024), (130, 66), (98, 40), (512, 256)])
def test_halving_is_pillows_bilinear_exactly(hw):
    """The 2:1 fast path (OpenCV) against Pillow itself, on noise (every rounding case shows up)."""
    from PIL import Image

    from samtune.adapters.preprocess import halve_bilinear, resize_planes

    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    for image in (rng.integers(0, 256, (*hw, 3), dtype=np.uint8), np.repeat(rng.integers(0, 256, (*hw, 1), dtype=np.uint8), 3, 2)):
        half = (hw[0] // 2, hw[1] // 2)
        official = np.asarray(Image.fromarray(image).resize(half[::-1], Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(np.dstack(resize_planes(image, half)), official)
        plane = np.ascontiguousarray(image[:, :, 0])
        np.testing.assert_array_equal(halve_bilinear(plane, 1), np.asarray(Image.fromarray(plane).resize((hw[1] // 2, hw[0]), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("hw", [(512, 512), (98, 40), (300, 200), (48, 64)])
def test_grey_plane_gives_the_model_input_of_its_rgb_copy(hw):
    """A CT slice served as one H×W plane becomes exactly what its R = G = B copy becomes, whatever
    path the resize takes (2:1 fast path, portrait images through Pillow, upscaling)."""
    from samtune.adapters.preprocess import LongestSideTransform

    plane = np.random.default_rng(hw[0]).integers(0, 256, hw, dtype=np.uint8)
    mask = (plane > 128).astype(np.uint8)
    transform = LongestSideTransform(256)
    grey, rgb = transform(image=plane, mask=mask), transform(image=np.dstack([plane] * 3), mask=mask)
    np.testing.assert_array_equal(grey["image"], rgb["image"])
    np.testing.assert_array_equal(grey["mask"], rgb["mask"])
