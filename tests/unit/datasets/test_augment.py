"""datasets/augment.py: recipe augmentation steps -> albumentations, applied to image and label together."""

from __future__ import annotations

import numpy as np
import pytest

from samtune.datasets.augment import build_augmentation, build_transform


def test_no_steps_is_no_augmentation():
    assert build_augmentation([]) is None


def test_steps_move_image_and_label_together():
    compose = build_augmentation([{"name": "HorizontalFlip", "p": 1.0}, {"name": "VerticalFlip", "p": 1.0}])
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    label = np.zeros((4, 6), np.uint8)
    label[0, 0] = 3  # top-left corner -> bottom-right after both flips
    out = compose(image=image, mask=label)
    np.testing.assert_array_equal(out["image"], image[::-1, ::-1])
    assert out["mask"][3, 5] == 3 and int(out["mask"].sum()) == 3


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("HorizontalFlp", {"p": 0.5}, "did you mean 'HorizontalFlip'"),
        ("HorizontalFlip", {"probability": 0.5}, r"HorizontalFlip\(probability=0.5\)"),  # a typo must not pass silently
        ("Compose", {}, "not an albumentations transform"),
    ],
)
def test_bad_steps_name_the_problem(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_transform(name, params)
