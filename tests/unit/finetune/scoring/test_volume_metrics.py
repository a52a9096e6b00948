"""Per-case 3D Dice / HD95 / NSD in mm: the rules for empty masks, MONAI agreement, slice stacking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from samtune.finetune.scoring.volume_metrics import VolumeMetricAccumulator, case_scores

SPACING = (5.0, 0.8, 0.8)  # z, rows, columns in mm


def cube(z0, z1, y0, y1, x0, x1, shape=(6, 20, 20)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[z0:z1, y0:y1, x0:x1] = True
    return m


def test_scores_agree_with_monai_and_use_spacing():
    target, pred = cube(1, 4, 4, 12, 4, 12), cube(1, 5, 6, 14, 4, 12)
    scores = case_scores(pred, target, SPACING, 2.0)
    y_pred, y = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(target)[None, None].float()
    hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(SPACING)).item()
    nsd = compute_surface_dice(y_pred, y, class_thresholds=[2.0], include_background=True, spacing=list(SPACING)).item()
    assert scores["hd95_mm"] == pytest.approx(hd) and scores["nsd"] == pytest.approx(nsd)
    assert scores["dice"] == pytest.approx(2 * (pred & target).sum() / (pred.sum() + target.sum()))
    # one extra slice at 5 mm dominates the surface distance: the spacing is really used
    assert 5.0 <= scores["hd95_mm"] < 6.0
    assert case_scores(pred, target, (1.0, 0.8, 0.8), 2.0)["hd95_mm"] < 5.0


def test_empty_mask_rules():
    empty, some = np.zeros((6, 20, 20), bool), cube(1, 3, 2, 6, 2, 6)
    both_empty = case_scores(empty, empty, SPACING, 2.0)
    assert all(math.isnan(v) for v in both_empty.values())  # absent: excluded, not 1 and not 0
    false_alarm = case_scores(some, empty, SPACING, 2.0)
    assert false_alarm["dice"] == 0 and math.isnan(false_alarm["hd95_mm"])
    missed = case_scores(empty, some, SPACING, 2.0)
    assert missed["dice"] == 0 and missed["nsd"] == 0 and math.isnan(missed["hd95_mm"])


class TwoCaseSource:
    """Volumes 'a' and 'b' (Z×H×W labels), every slice a source item."""

    def __init__(self):
        self.volumes = {"a": cube(1, 4, 4, 12, 4, 12).astype(np.uint8), "b": np.zeros((6, 20, 20), np.uint8)}
        self.items = [(c, z) for c in ("a", "b") for z in range(6)]

    def __len__(self):
        return len(self.items)

    def slice_position(self, index):
        return self.items[index]

    def case_volume(self, name):
        return self.volumes[name], SPACING


def test_slice_predictions_are_stacked_per_case():
    source = TwoCaseSource()
    acc = VolumeMetricAccumulator(source, {1: "organ"})
    for index, (case, z) in enumerate(source.items):
        if case == "a" and 1 <= z < 4:
            acc.add(index, 1, source.volumes["a"][z] == 1)  # perfect on the prompted slices
    result = acc.result()["per_class"]["organ"]
    assert result["dice"] == 1.0 and result["hd95_mm"] == 0.0 and result["nsd"] == 1.0
    assert result["cases"] == 1  # case b has no organ and no prediction: excluded
    assert [c["case"] for c in result["per_case"]] == ["a", "b"]


def test_semantic_volumes_count_a_false_alarm_on_a_slice_without_the_class():
    from samtune.finetune.scoring.volume_metrics import SemanticVolumeAccumulator, per_case_rows

    class Volume:
        def __init__(self):
            self.label = np.zeros((6, 20, 20), np.uint8)
            self.label[1:4, 4:12, 4:12] = 1

        def __len__(self):
            return 6

        def slice_position(self, index):
            return "case", index

        def case_volume(self, name):
            return self.label, SPACING

    source = Volume()
    acc = SemanticVolumeAccumulator(source, {1: "organ", 2: "other"})
    for z in range(6):
        pred = source.label[z].copy()
        if z == 5:
            pred[0:2, 0:2] = 1  # a false alarm on a slice without the organ
        acc.add_label(z, pred)
    result = acc.result()
    organ = result["per_class"]["organ"]
    assert organ["dice"] == pytest.approx(2 * 192 / (196 + 192))
    assert math.isnan(result["per_class"]["other"]["dice"])  # absent from the case and never predicted
    rows = per_case_rows(result)
    assert [(r["case"], r["class"]) for r in rows] == [("case", "organ"), ("case", "other")]
