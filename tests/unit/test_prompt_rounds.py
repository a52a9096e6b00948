"""Point prompts, per-component objects, corrective clicks and prompt rounds (seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.adapters.registry import build_sam
from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.prompts import PAD_LABEL, PromptSettings, sample_error_clicks, sample_points, split_objects
from samtune.finetune.interaction import RoundSettings, mask_iou, run_rounds
from samtune.finetune.losses import make_mask_loss


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


def test_center_point_is_the_distance_transform_maximum():
    mask = np.zeros((21, 21), bool)
    mask[2:19, 2:19] = True
    points, labels = sample_points(mask, np.array([0, 0, 21, 21], np.float32), 1, 0, "center", np.random.default_rng(5))
    assert points[0].tolist() == [10.0, 10.0] and labels.tolist() == [1]


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


class BlobSource:
    class_names = {1: "blob", 2: "bar"}
    ignore_index = 255

    def __init__(self):
        self.label = np.zeros((40, 40), np.uint8)
        self.label[two_blobs()] = 1
        self.label[32:38, 2:20] = 2

    def __len__(self):
        return 2

    def item_id(self, i):
        return f"img{i}"

    def slice_classes(self, i):
        ids, counts = np.unique(self.label, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, i):
        image = np.full((40, 40, 3), 60, np.uint8)
        image[self.label > 0] = 200
        return image, self.label.copy()


def test_per_component_evaluation_has_one_sample_per_component():
    ds = PromptedDataset(BlobSource(), 64, PromptSettings(per="component"), min_pixels=10, training=False, seed=0)
    assert len(ds) == 2 * 3  # two images × (two blobs + one bar)
    sizes = sorted(int(ds[k][S.META]["targets"][0].sum()) for k in range(3))
    assert sizes == [60, 100, 108]


def test_training_sample_holds_per_image_objects():
    settings = PromptSettings(positive_points=2, negative_points=1)
    ds = PromptedDataset(BlobSource(), 64, settings, min_pixels=10, training=True, seed=0, per_image=4)
    sample = ds[0]
    assert sample[S.MASKS].shape == (4, 64, 64) and sample[S.BOXES].shape == (4, 4)
    assert sample[S.POINTS].shape == (4, 3, 2) and sample[S.POINT_LABELS].shape == (4, 3)
    assert len(sample[S.META]["class_ids"]) == 4


@pytest.mark.parametrize("use_box", [True, False])
def test_rounds_add_one_click_each_and_train_end_to_end(use_box):
    model = build_sam("tiny", image_size=64)
    settings = PromptSettings(positive_points=1)
    ds = PromptedDataset(BlobSource(), 64, settings, min_pixels=10, training=True, seed=0, per_image=2)
    batch = S.collate_samples([ds[0], ds[1]])
    rounds = RoundSettings(corrective_rounds=2, mask_only_rounds=1)
    calls = []
    original = model.forward

    def spy(**kwargs):
        points = kwargs.get("input_points")
        calls.append((0 if points is None else points.shape[2], kwargs.get("input_masks") is not None, kwargs["multimask_output"]))
        return original(**kwargs)

    model.forward = spy
    outputs, loss = run_rounds(model, batch, rounds, 64, use_box, torch.Generator().manual_seed(0), make_mask_loss(1.0, 20.0), 1.0)
    first = 0 if use_box else 1
    assert [c[0] for c in calls] == [first, first + 1, first + 2, first + 2]  # clicks: +1, +1, then none
    assert [c[1] for c in calls] == [False, True, True, True]  # previous logits fed from round 2 on
    assert calls[0][2] == (not use_box)  # a single click is ambiguous: multimask in round 1 only
    assert len(outputs) == 4 and outputs[0].shape == (4, 1, 64, 64)
    loss.backward()
    assert torch.isfinite(loss) and model.mask_decoder.iou_prediction_head.proj_out.weight.grad.abs().sum() > 0


def test_mask_iou_ignores_padding():
    pred = torch.ones(1, 4, 4, dtype=torch.bool)
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2, :2] = True
    assert mask_iou(pred, target, valid).item() == 1.0
    assert mask_iou(pred, target, torch.ones_like(valid)).item() == 0.25


def test_per_component_index_comes_from_the_source_when_it_has_one():
    class IndexedSource(BlobSource):
        loads = 0

        def slice_components(self, i):
            return {1: [100, 60], 2: [108]}

        def load(self, i):
            IndexedSource.loads += 1
            return super().load(i)

    ds = PromptedDataset(IndexedSource(), 64, PromptSettings(per="component"), min_pixels=70, training=False, seed=0)
    assert IndexedSource.loads == 0  # nothing opened to count components
    assert len(ds) == 2 * 2  # per image: the 100 px blob and the 108 px bar; the 60 px blob is too small
