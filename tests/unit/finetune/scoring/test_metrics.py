"""Per-class IoU/Dice: per-sample values against MONAI, dataset-level against hand-counted TP/FP/FN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou

from samtune.finetune.scoring.metrics import ClassIoUAccumulator, format_table


def _monai(pred: np.ndarray, target: np.ndarray, ignore_empty: bool = True) -> tuple[float, float]:
    """One binary sample through MONAI: 1×1×H×W, the foreground channel counted (include_background)."""
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    y = torch.from_numpy(target.astype(np.float32))[None, None]
    iou = compute_iou(p, y, include_background=True, ignore_empty=ignore_empty)
    dice = compute_dice(p, y, include_background=True, ignore_empty=ignore_empty)
    return float(iou[0, 0]), float(dice[0, 0])


def _samples(seed: int = 0, n: int = 6, shape=(12, 10)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        target = np.zeros(shape, bool)
        y0, x0 = rng.integers(0, 6, 2)
        target[y0 : y0 + rng.integers(2, 6), x0 : x0 + rng.integers(2, 5)] = True
        pred = target.copy()
        pred ^= rng.random(shape) < 0.15  # flip some pixels: FP and FN
        ignore = rng.random(shape) < 0.1 if i % 2 else None
        out.append((pred, target, ignore))
    return out


def test_per_sample_values_match_monai():
    acc = ClassIoUAccumulator()
    expected_iou, expected_dice = [], []
    for pred, target, ignore in _samples():
        acc.add("liver", pred, target, ignore)
        valid = ~ignore if ignore is not None else np.ones_like(target)
        iou, dice = _monai(pred & valid, target & valid)  # ignored pixels removed from both
        expected_iou.append(iou)
        expected_dice.append(dice)
    np.testing.assert_allclose(acc.sample_iou["liver"], expected_iou, rtol=1e-6)
    np.testing.assert_allclose(acc.sample_dice["liver"], expected_dice, rtol=1e-6)
    res = acc.result()["per_class"]["liver"]
    assert res["samples"] == 6
    assert res["iou_per_sample_mean"] == pytest.approx(np.mean(expected_iou))
    assert res["dice_per_sample_mean"] == pytest.approx(np.mean(expected_dice))


def test_dataset_level_values_are_global_tp_fp_fn():
    acc = ClassIoUAccumulator()
    tp = fp = fn = 0
    for pred, target, ignore in _samples(seed=1):
        acc.add("car", pred, target, ignore)
        valid = ~ignore if ignore is not None else np.ones_like(target)
        tp += int((pred & target & valid).sum())
        fp += int((pred & ~target & valid).sum())
        fn += int((~pred & target & valid).sum())
    res = acc.result()
    c = res["per_class"]["car"]
    assert (c["tp"], c["fp"], c["fn"]) == (tp, fp, fn)
    assert c["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert c["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # global accumulation is not the mean of per-sample scores
    assert c["iou"] != pytest.approx(c["iou_per_sample_mean"])


def test_hand_made_masks():
    target = np.zeros((4, 4), bool)
    target[0:2, 0:2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[0:2, 1:3] = True  # 2 TP, 2 FP, 2 FN
    acc = ClassIoUAccumulator()
    acc.add("a", pred, target)
    c = acc.result()["per_class"]["a"]
    assert c["iou"] == pytest.approx(2 / 6) and c["dice"] == pytest.approx(4 / 8)
    assert _monai(pred, target) == pytest.approx((2 / 6, 4 / 8))


def test_empty_gt_and_empty_pred_is_excluded():
    acc = ClassIoUAccumulator()
    empty = np.zeros((5, 5), bool)
    acc.add("spleen", empty, empty)
    res = acc.result()
    c = res["per_class"]["spleen"]
    assert c["samples"] == 0 and acc.sample_iou["spleen"] == []
    assert math.isnan(c["iou"]) and math.isnan(c["dice"]) and math.isnan(c["iou_per_sample_mean"])
    assert math.isnan(res["miou"]) and res["n_samples"] == 0
    assert math.isnan(_monai(empty, empty)[0])  # MONAI (ignore_empty) agrees: no score

    # a class with a real sample elsewhere: the empty one adds no score and does not drag the mean
    full = np.ones((5, 5), bool)
    acc.add("spleen", full, full)
    c = acc.result()["per_class"]["spleen"]
    assert c["samples"] == 1 and c["iou_per_sample_mean"] == 1.0 and c["iou"] == 1.0


def test_empty_gt_with_a_prediction_scores_zero():
    acc = ClassIoUAccumulator()
    empty = np.zeros((5, 5), bool)
    pred = empty.copy()
    pred[1, 1] = True
    acc.add("kidney", pred, empty)
    c = acc.result()["per_class"]["kidney"]
    assert acc.sample_iou["kidney"] == [0.0] and acc.sample_dice["kidney"] == [0.0]
    assert c["iou"] == 0.0 and c["fp"] == 1
    assert _monai(pred, empty, ignore_empty=False) == (0.0, 0.0)


def test_ignored_pixels_never_count():
    target = np.zeros((6, 6), bool)
    target[1:4, 1:4] = True
    ignore = np.zeros((6, 6), bool)
    ignore[5, :] = True
    pred = target.copy()
    pred[5, 0:3] = True  # false positives, but only on ignored pixels
    acc = ClassIoUAccumulator()
    acc.add("road", pred, target, ignore)
    c = acc.result()["per_class"]["road"]
    assert c["iou"] == 1.0 and c["dice"] == 1.0 and c["fp"] == 0
    # ignored ground truth is no false negative either
    target2 = target.copy()
    target2[5, 5] = True
    acc2 = ClassIoUAccumulator()
    acc2.add("road", target, target2, ignore)
    assert acc2.result()["per_class"]["road"]["fn"] == 0
    # without the ignore mask the same FP do lower the score
    acc3 = ClassIoUAccumulator()
    acc3.add("road", pred, target)
    assert acc3.result()["per_class"]["road"]["iou"] == pytest.approx(9 / 12)


def test_means_over_classes_present():
    acc = ClassIoUAccumulator()
    t = np.zeros((4, 4), bool)
    t[:2] = True
    acc.add("a", t, t)  # IoU 1
    acc.add("b", ~t, t)  # IoU 0
    acc.add("c", np.zeros_like(t), np.zeros_like(t))  # absent: NaN, not in the mean
    res = acc.result()
    assert res["miou"] == pytest.approx(0.5) and res["mdice"] == pytest.approx(0.5)
    assert res["miou_per_sample"] == pytest.approx(0.5)
    assert res["n_samples"] == 2
    assert sorted(res["per_class"]) == ["a", "b", "c"]


def test_format_table_lists_every_class_and_the_means():
    t = np.zeros((4, 4), bool)
    t[:2] = True
    before, after = ClassIoUAccumulator(), ClassIoUAccumulator()
    before.add("liver", ~t, t)
    before.add("traffic light", t, t)
    after.add("liver", t, t)
    after.add("spleen", t[:, ::-1] | t, t)  # a class only in one column
    b, a = before.result(), after.result()
    text = format_table({"before": b, "after": a}, title="val")
    lines = text.splitlines()
    assert lines[0] == "val"
    assert "before" in lines[1] and "after" in lines[1]
    for name in ("liver", "traffic light", "spleen"):
        assert any(line.startswith(name) for line in lines), name
    spleen = next(line for line in lines if line.startswith("spleen"))
    assert "-" in spleen.split("|")[1] and f"{a['per_class']['spleen']['iou']:.3f}" in spleen.split("|")[2]
    mean = lines[-1]
    assert mean.startswith("mean")
    assert f"{b['miou']:8.3f}" in mean and f"{a['miou']:8.3f}" in mean and f"{a['mdice']:8.3f}" in mean
