"""datasets/prompts.py: boxes from masks (jitter), positive/negative points, per-component objects, corrective clicks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.datasets.prompts import PAD_LABEL, box_from_mask, sample_box, sample_error_clicks, sample_points, split_objects


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


def two_blobs() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True  # 100 px
    mask[25:30, 25:37] = True  # 60 px
    return mask


def test_points_inside_and_outside_the_object():
    mask = two_blobs()
    box = np.array([0, 0, 40, 40], np.float32)
    points, labels = sample_points(mask, box, 3, 2, "uniform", np.random.default_rng(0))
    assert labels.tolist() == [1, 1, 1, 0, 0]
    for (x, y), label in zip(points.astype(int), labels):
        assert mask[y, x] == (label == 1)
    again, _ = sample_points(mask, box, 3, 2, "uniform", np.random.default_rng(0))
    np.testing.assert_array_equal(points, again)


def test_missing_points_are_padding():
    mask = np.ones((10, 10), bool)  # no background at all: negatives impossible
    _, labels = sample_points(mask, np.array([0, 0, 10, 10], np.float32), 1, 2, "uniform", np.random.default_rng(0))
    assert labels.tolist() == [1, PAD_LABEL, PAD_LABEL]


def test_components_are_split_largest_first():
    parts = split_objects(two_blobs(), "component")
    assert [int(p.sum()) for p in parts] == [100, 60]
    assert len(split_objects(two_blobs(), "class")) == 1


def test_error_clicks_follow_the_error_type():
    target = torch.zeros(3, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = target.clone()
    pred[0] = False  # only false negatives -> positive click inside the object
    pred[1, 0, 0] = True  # one false positive -> negative click exactly there
    valid = torch.ones_like(target)  # row 2: perfect -> padding click
    points, labels = sample_error_clicks(pred, target, valid, torch.Generator().manual_seed(0))
    assert labels[:, 0].tolist() == [1, 0, PAD_LABEL]
    x, y = points[0, 0].long().tolist()
    assert target[0, y, x]
    assert points[1, 0].tolist() == [0.0, 0.0]


def test_error_clicks_never_land_in_the_padding():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    pred = torch.ones(1, 8, 8, dtype=torch.bool)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :, :3] = True
    points, _ = sample_error_clicks(pred, target, valid, torch.Generator().manual_seed(1))
    assert points[0, 0, 0] < 3
