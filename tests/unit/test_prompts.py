"""Box prompts from the ground truth and the prompted samples the trainer and evaluator consume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.prompts import PAD_LABEL, PromptSettings, box_from_mask, sample_box, sample_points
from samtune.datasets.transforms import PIXEL_MEAN, PIXEL_STD


# ------------------------------------------ box_from_mask ------------------------------------------
def test_box_from_mask_exact_pixel_edges():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    box = box_from_mask(mask)
    assert box.dtype == np.float32
    assert box.tolist() == [3.0, 2.0, 9.0, 5.0]  # x0, y0, x1 = last column + 1, y1 = last row + 1


def test_box_from_mask_single_pixel_and_scattered():
    mask = np.zeros((8, 8), bool)
    mask[7, 0] = True
    assert box_from_mask(mask).tolist() == [0.0, 7.0, 1.0, 8.0]
    mask[1, 5] = True  # two separate pixels: the box spans both
    assert box_from_mask(mask).tolist() == [0.0, 1.0, 6.0, 8.0]


def test_box_from_mask_empty_raises():
    with pytest.raises(ValueError):
        box_from_mask(np.zeros((4, 4), bool))


# -------------------------------------------- sample_box -------------------------------------------
def _mask(h=30, w=40, rows=(10, 20), cols=(5, 25)) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def test_no_jitter_gives_the_tight_box():
    mask = _mask()
    box = sample_box(mask, 0.0, np.random.default_rng(0))
    assert box.dtype == np.float32
    np.testing.assert_array_equal(box, box_from_mask(mask))


def test_seeded_rng_is_reproducible_and_seeds_differ():
    mask = _mask()
    a = sample_box(mask, 4.0, np.random.default_rng(123))
    b = sample_box(mask, 4.0, np.random.default_rng(123))
    c = sample_box(mask, 4.0, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_jitter_moves_edges_outward_by_at_most_jitter_px():
    mask = _mask()
    tight = box_from_mask(mask)
    jitter = 3.0
    boxes = np.stack([sample_box(mask, jitter, np.random.default_rng(s)) for s in range(200)])
    grow = (boxes - tight) * np.array([-1, -1, 1, 1], np.float32)  # outward growth of each edge
    assert (grow >= 0).all()
    assert (grow <= jitter + 1e-5).all()
    assert (grow > 0.5).any(axis=0).all()  # every edge actually moves sometimes
    assert grow.max() > 0.8 * jitter  # and uses the whole range, not a fraction of it


def test_jitter_is_clipped_to_the_image():
    h, w = 30, 40
    mask = _mask(h, w, rows=(0, 30), cols=(38, 40))  # touches top, bottom and right edges
    boxes = np.stack([sample_box(mask, 10.0, np.random.default_rng(s)) for s in range(100)])
    assert (boxes[:, [0, 1]] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    np.testing.assert_array_equal(boxes[:, 1], 0.0)
    np.testing.assert_array_equal(boxes[:, 2], float(w))
    np.testing.assert_array_equal(boxes[:, 3], float(h))
    assert (boxes[:, 0] < 38).any()  # the free edge still moves


def test_jitter_frac_scales_with_the_box():
    mask = _mask(60, 80, rows=(20, 30), cols=(30, 50))  # box 20 wide, 10 high, room on every side
    tight = box_from_mask(mask)
    boxes = np.stack([sample_box(mask, 0.0, np.random.default_rng(s), jitter_frac=0.5) for s in range(200)])
    grow = (boxes - tight) * np.array([-1, -1, 1, 1], np.float32)
    limit = np.array([10.0, 5.0, 10.0, 5.0])  # 0.5 × width / height
    assert (grow >= 0).all() and (grow <= limit + 1e-4).all()
    assert (grow.max(axis=0) > 0.8 * limit).all()
    # the larger of the two limits applies
    boxes = np.stack([sample_box(mask, 8.0, np.random.default_rng(s), jitter_frac=0.5) for s in range(200)])
    grow = (boxes - tight) * np.array([-1, -1, 1, 1], np.float32)
    assert (grow[:, [1, 3]] <= 8.0 + 1e-4).all() and (grow[:, [1, 3]].max(axis=0) > 6.0).all()


# ------------------------------------------- sample_points -----------------------------------------
def test_points_positive_inside_negative_outside_in_the_box():
    mask = _mask()
    box = np.array([2.0, 7.0, 28.0, 23.0], np.float32)
    for seed in range(20):
        points, labels = sample_points(mask, box, 2, 3, "uniform", np.random.default_rng(seed))
        assert points.shape == (5, 2) and points.dtype == np.float32 and labels.tolist() == [1, 1, 0, 0, 0]
        for (x, y), label in zip(points.astype(int), labels):
            assert mask[y, x] == (label == 1)  # (x, y) order: column, row
            if label == 0:
                assert box[0] <= x < box[2] and box[1] <= y < box[3]


def test_center_point_is_the_distance_transform_maximum():
    mask = np.zeros((21, 21), bool)
    mask[5:16, 5:16] = True  # 11×11 square, centre (10, 10)
    points, labels = sample_points(mask, box_from_mask(mask), 1, 0, "center", np.random.default_rng(0))
    assert points.tolist() == [[10.0, 10.0]] and labels.tolist() == [1]
    points, labels = sample_points(mask, box_from_mask(mask), 0, 0, "uniform", np.random.default_rng(0))
    assert points.shape == (0, 2) and labels.shape == (0,)
    points, labels = sample_points(np.zeros((5, 5), bool), np.zeros(4, np.float32), 1, 0, "uniform", np.random.default_rng(0))
    assert labels.tolist() == [PAD_LABEL]  # nothing to click: padding, not a bogus point


# ----------------------------------------- PromptedDataset -----------------------------------------
COLOUR = (200, 100, 50)
H, W, SIZE = 40, 80, 64  # a wide image: resized to 32×64, padded at the bottom


class MemorySource:
    """One 40×80 image: class 1 in the middle, class 2 touching the bottom-right corner, a tiny
    class-3 object and an ignored (255) patch."""

    class_names = {1: "left", 2: "corner", 3: "speck"}
    ignore_index = 255

    def __init__(self):
        self.image = np.empty((H, W, 3), np.uint8)
        self.image[:] = COLOUR
        self.label = np.zeros((H, W), np.uint8)
        self.label[10:20, 20:40] = 1
        self.label[30:40, 60:80] = 2
        self.label[2:4, 2:4] = 3  # 4 px
        self.label[0:2, 70:72] = 255

    def __len__(self):
        return 1

    def item_id(self, index):
        return f"img{index}"

    def load(self, index):
        return self.image.copy(), self.label.copy()

    def load_label(self, index):
        return self.label.copy()

    def slice_classes(self, index):
        ids, counts = np.unique(self.label, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))


def _dataset(training: bool, jitter: float = 5.0, seed: int = 0, **kw) -> PromptedDataset:
    kw.setdefault("min_pixels", 5)
    return PromptedDataset(
        MemorySource(), SIZE, PromptSettings(box_jitter_px=jitter), training=training, seed=seed, **kw
    )


def test_objects_respect_min_pixels_and_classes():
    assert [p[:2] for p in _dataset(False).pairs] == [(0, 1), (0, 2)]  # the 4-px speck is below min_pixels=5
    assert [p[:2] for p in _dataset(False, min_pixels=4).pairs] == [(0, 1), (0, 2), (0, 3)]
    ds = _dataset(False, classes=["corner"])
    assert [p[:2] for p in ds.pairs] == [(0, 2)] and ds.class_names == {2: "corner"}
    assert len(_dataset(False)) == 2


def test_eval_samples_are_identical_across_accesses_and_instances():
    a, b = _dataset(False), _dataset(False)
    for k in range(len(a)):
        first, again, other = a[k], a[k], b[k]
        for key in (S.BOXES, S.IMAGE, S.MASKS):
            assert torch.equal(first[key], again[key]) and torch.equal(first[key], other[key]), key
    # the jitter is real (not zero) and depends on the seed
    s = a[0]
    tight = box_from_mask(s[S.MASKS][0].numpy().astype(bool))
    assert not np.array_equal(s[S.BOXES][0].numpy(), tight)
    assert not torch.equal(s[S.BOXES], _dataset(False, seed=1)[0][S.BOXES])


def test_training_samples_vary_between_accesses():
    ds = _dataset(True, classes=["left"])  # one object, so only the jitter can change the box
    boxes = [ds[0][S.BOXES] for _ in range(4)]
    assert all(not torch.equal(boxes[0], b) for b in boxes[1:])


def test_sample_contract_keys_shapes_dtypes():
    s = _dataset(False)[0]
    assert {S.IMAGE, S.MASKS, S.BOXES, S.META} <= set(s)
    assert s[S.IMAGE].shape == (3, SIZE, SIZE) and s[S.IMAGE].dtype == torch.float32
    assert s[S.MASKS].shape == (1, SIZE, SIZE) and s[S.MASKS].dtype == torch.float32
    assert s[S.BOXES].shape == (1, 4) and s[S.BOXES].dtype == torch.float32
    meta = s[S.META]
    assert meta["item"] == "img0" and meta["class_ids"] == [1] and meta["class_names"] == ["left"]
    assert meta["original_size"] == (H, W) and tuple(meta["resized_size"]) == (32, 64)
    assert len(meta["targets"]) == 1
    np.testing.assert_array_equal(meta["targets"][0], MemorySource().label == 1)  # original resolution
    np.testing.assert_array_equal(meta["ignore"], MemorySource().label == 255)
    train = _dataset(True, classes=["left"])[0]
    assert "targets" not in train[S.META]
    assert train[S.IMAGE].shape == (3, SIZE, SIZE) and train[S.MASKS].shape == (1, SIZE, SIZE)


def test_image_is_sam_normalised_and_zero_in_the_padding():
    image = _dataset(False)[0][S.IMAGE].numpy()
    expected = (np.array(COLOUR) - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    h, w = 32, 64
    np.testing.assert_allclose(image[:, :h, :w], np.broadcast_to(expected[:, None, None], (3, h, w)), atol=1e-5)
    assert (image[:, h:, :] == 0).all()
    # SAM's statistics, not ImageNet's 0-1 ones
    assert PIXEL_MEAN == (123.675, 116.28, 103.53) and PIXEL_STD == (58.395, 57.12, 57.375)


def test_mask_is_binary_resized_target_zero_in_padding():
    ds = _dataset(False, jitter=0.0)
    for k, rows, cols in ((0, (8, 16), (16, 32)), (1, (24, 32), (48, 64))):  # original extents × 0.8
        mask = ds[k][S.MASKS][0].numpy()
        assert set(np.unique(mask).tolist()) == {0.0, 1.0}
        expected = np.zeros((SIZE, SIZE), np.float32)
        expected[rows[0] : rows[1], cols[0] : cols[1]] = 1
        np.testing.assert_array_equal(mask, expected)


def test_eval_box_without_jitter_is_the_tight_box_of_the_mask():
    ds = _dataset(False, jitter=0.0)
    for k in range(len(ds)):
        s = ds[k]
        np.testing.assert_array_equal(s[S.BOXES][0].numpy(), box_from_mask(s[S.MASKS][0].numpy() > 0))


def test_jittered_box_contains_the_mask_box_within_jitter():
    for ds in (_dataset(True, jitter=5.0), _dataset(False, jitter=5.0)):
        for k in range(len(ds)):
            for _ in range(20):
                s = ds[k]
                tight = box_from_mask(s[S.MASKS][0].numpy() > 0)
                box = s[S.BOXES][0].numpy()
                grow = (box - tight) * np.array([-1, -1, 1, 1])
                assert (grow >= 0).all() and (grow <= 5.0 + 1e-5).all()


def test_jittered_box_stays_inside_the_resized_image():
    h, w = 32, 64
    for ds in (_dataset(True, jitter=5.0, classes=["corner"]), _dataset(False, jitter=5.0)):
        for k in range(len(ds)):
            for _ in range(20):
                x0, y0, x1, y1 = ds[k][S.BOXES][0].tolist()
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


@pytest.mark.parametrize("image_size", [64, 128, 1024])
def test_sam_transform_equals_the_albumentations_pipeline(image_size):
    """The hand-written hot path gives what albumentations' LongestMaxSize + Normalize + PadIfNeeded gives."""
    import albumentations as A
    import cv2

    from samtune.datasets.transforms import PIXEL_MEAN, PIXEL_STD, make_sam_transform

    reference = A.Compose([
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR),
        A.Normalize(mean=PIXEL_MEAN, std=PIXEL_STD, max_pixel_value=1.0),
        A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
    ])  # fmt: skip
    rng = np.random.default_rng(image_size)
    for shape in [(37, 101), (256, 512), (300, 17), (image_size, image_size)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        label = rng.integers(0, 5, shape, dtype=np.uint8)
        ours, theirs = make_sam_transform(image_size)(image=image, mask=label), reference(image=image, mask=label)
        np.testing.assert_array_equal(ours["mask"], theirs["mask"])
        np.testing.assert_allclose(ours["image"], theirs["image"], atol=1e-5)
