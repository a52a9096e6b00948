"""finetune/scoring/semantic_metrics.py: the split-level confusion matrix against hand-counted TP/FP/FN, a
per-pixel reference, and the official Cityscapes evaluator (cityscapesScripts, a dev dependency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from samtune.datasets.cityscapes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    map_label_ids,
    prediction_name,
    read_label_png,
)
from samtune.datasets.cityscapes_labels import train_ids_to_label_ids
from samtune.finetune.scoring.semantic_metrics import ConfusionAccumulator

NIFTI_CLASSES = {1: "liver", 2: "kidney", 3: "spleen"}  # 0 = background


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    target = np.array([[0, 1, 1], [2, 255, 2]], dtype=np.uint8)
    pred = np.array([[1, 1, 0], [2, 2, 255]], dtype=np.uint8)
    # (gt, pred): (0,1) FP liver on background; (1,1) TP liver; (1,0) FN liver; (2,2) TP kidney;
    # (255,2) ignored, no FP; (2,255) FN kidney (255 predicted = no class = other)
    return pred, target


def test_hand_counted_tp_fp_fn_with_ignore_and_background():
    acc = ConfusionAccumulator(NIFTI_CLASSES)
    acc.add(*_hand_case())
    r = acc.result()
    liver, kidney, spleen = (r["per_class"][n] for n in ("liver", "kidney", "spleen"))
    assert (liver["tp"], liver["fp"], liver["fn"], liver["gt_pixels"], liver["pred_pixels"]) == (1, 1, 1, 2, 2)
    assert (kidney["tp"], kidney["fp"], kidney["fn"], kidney["gt_pixels"], kidney["pred_pixels"]) == (1, 0, 1, 2, 1)
    assert liver["iou"] == pytest.approx(1 / 3) and liver["dice"] == pytest.approx(1 / 2)
    assert kidney["iou"] == pytest.approx(1 / 2) and kidney["dice"] == pytest.approx(2 / 3)
    assert math.isnan(spleen["iou"]) and math.isnan(spleen["dice"]) and spleen["tp"] + spleen["fp"] + spleen["fn"] == 0
    assert r["miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # spleen (NaN) skipped
    assert r["mdice"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["pixel_accuracy"] == pytest.approx(2 / 5)  # 5 non-ignored pixels, 2 right
    # rows: ground truth liver, kidney, spleen, other; columns: prediction
    assert r["confusion"] == [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert r["confusion_labels"] == ["liver", "kidney", "spleen", "other"]
    assert "confusion matrix" in r["accumulation"] and "ignore" in r["accumulation"]


def test_background_pixels_count_for_pixel_accuracy_and_all_ignored_is_nan():
    acc = ConfusionAccumulator(NIFTI_CLASSES)
    acc.add(np.zeros((2, 3), np.uint8), np.array([[0, 0, 0], [1, 255, 255]], np.uint8))
    r = acc.result()
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)
    assert r["per_class"]["liver"]["iou"] == 0.0 and r["per_class"]["liver"]["fn"] == 1
    assert r["miou"] == 0.0  # liver 0, the others NaN

    empty = ConfusionAccumulator(NIFTI_CLASSES)
    empty.add(np.ones((2, 3), np.uint8), np.full((2, 3), 255, np.uint8))
    r = empty.result()
    assert math.isnan(r["miou"]) and math.isnan(r["mdice"]) and math.isnan(r["pixel_accuracy"])


def test_cityscapes_ignore_row_never_makes_false_positives():
    acc = ConfusionAccumulator(CLASS_NAMES)
    target = np.array([[0, 0, 255], [13, 255, 255]], np.uint8)  # road, car, void
    pred = np.array([[0, 13, 13], [13, 0, 255]], np.uint8)
    acc.add(pred, target)
    road, car = acc.result()["per_class"]["road"], acc.result()["per_class"]["car"]
    assert (road["tp"], road["fp"], road["fn"]) == (1, 0, 1)
    assert (car["tp"], car["fp"], car["fn"]) == (1, 1, 0)
    assert sum(math.isnan(c["iou"]) for c in acc.result()["per_class"].values()) == 17


def _reference(preds, targets, class_ids, ignore_index):
    """TP/FP/FN per class straight from boolean masks."""
    out = {}
    for c in class_ids:
        tp = fp = fn = 0
        for p, t in zip(preds, targets):
            valid = t != ignore_index
            tp += int(np.sum((p == c) & (t == c) & valid))
            fp += int(np.sum((p == c) & (t != c) & valid))
            fn += int(np.sum((p != c) & (t == c) & valid))
        out[c] = (tp, fp, fn)
    return out


def _random_maps(rng, n, shape, values):
    return [rng.choice(values, size=shape) for _ in range(n)]


def test_random_maps_match_masks_and_merge_equals_one_accumulator():
    rng = np.random.default_rng(0)
    values = np.array([0, 1, 2, 3, 4, 7, 255])
    preds = [m.astype(np.uint8) for m in _random_maps(rng, 6, (9, 11), values)]
    targets = [m.astype(np.uint8) for m in _random_maps(rng, 6, (9, 11), values)]
    whole, first, second = (ConfusionAccumulator(NIFTI_CLASSES) for _ in range(3))
    for i, (p, t) in enumerate(zip(preds, targets)):
        whole.add(p, t)
        (first if i < 4 else second).add(p, t)
    first.merge(second)
    assert np.array_equal(first.confusion, whole.confusion)
    assert repr(first.result()) == repr(whole.result())  # repr: NaN != NaN under ==
    ref = _reference(preds, targets, NIFTI_CLASSES, 255)
    for c, name in NIFTI_CLASSES.items():
        got = whole.result()["per_class"][name]
        assert (got["tp"], got["fp"], got["fn"]) == ref[c]
    with pytest.raises(ValueError):
        whole.merge(ConfusionAccumulator(CLASS_NAMES))


def test_int32_maps_large_ids_and_negative_ignore():
    rng = np.random.default_rng(1)
    classes = {1: "a", 300: "b", 255: "c"}  # 255 is a class: nothing ignored but -1
    values = np.array([-5, -1, 0, 1, 255, 256, 300, 70000])
    preds = [m.astype(np.int32) for m in _random_maps(rng, 3, (7, 8), values)]
    targets = [m.astype(np.int64) for m in _random_maps(rng, 3, (7, 8), values)]
    acc = ConfusionAccumulator(classes, ignore_index=-1)
    for p, t in zip(preds, targets):
        acc.add(p, t)
    ref = _reference(preds, targets, classes, -1)
    for c, name in classes.items():
        got = acc.result()["per_class"][name]
        assert (got["tp"], got["fp"], got["fn"]) == ref[c]
    assert acc.confusion.sum() == sum(int(np.sum(t != -1)) for t in targets)

    same = ConfusionAccumulator(NIFTI_CLASSES)
    pred, target = _hand_case()
    same.add(pred.astype(np.int32), target.astype(np.int16))
    reference = ConfusionAccumulator(NIFTI_CLASSES)
    reference.add(pred, target)
    assert np.array_equal(same.confusion, reference.confusion)
    with pytest.raises(TypeError):
        same.add(pred.astype(np.float32), target)
    with pytest.raises(ValueError):
        same.add(pred[:1], target)
    with pytest.raises(ValueError):
        ConfusionAccumulator({1: "a", 255: "b"})  # 255 both a class and ignored


def test_train_ids_to_label_ids_and_prediction_name():
    train = np.array([[0, 1, 18, 19], [254, 255, 10, 13]], np.uint8)
    assert train_ids_to_label_ids(train).tolist() == [[7, 8, 33, 0], [0, 0, 23, 26]]
    wide = np.array([[-1, 0, 18, 300]], np.int32)
    assert train_ids_to_label_ids(wide).tolist() == [[0, 7, 33, 0]] and train_ids_to_label_ids(wide).dtype == np.uint8
    every = np.arange(19, dtype=np.uint8)[None]
    assert np.array_equal(map_label_ids(train_ids_to_label_ids(every)), every)  # round trip
    assert prediction_name("/d/gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png") == (
        "lindau_000001_000019_gtFine_labelIds.png"
    )
    assert prediction_name("lindau_000001_000019") == "lindau_000001_000019_gtFine_labelIds.png"
    assert prediction_name("lindau_000001_000019_leftImg8bit.png") == "lindau_000001_000019_gtFine_labelIds.png"
    with pytest.raises(ValueError):
        prediction_name("lindau.png")


# labelIds drawn into the synthetic ground truth: voids (0 unlabeled, 1 ego vehicle, 3 out of roi,
# 4 static, 29 caravan, 30 trailer) and 15 of the 19 classes (wall 12, rider 25, train 31 and
# motorcycle 32 never in the ground truth; rider is predicted, so its IoU is 0; the rest NaN).
_GT_IDS = [0, 1, 3, 4, 29, 30, 7, 8, 11, 13, 17, 19, 20, 21, 22, 23, 24, 26, 27, 28, 33]


def _ground_truth(rng, shape=(64, 128)) -> np.ndarray:
    label = np.full(shape, 7, np.uint8)  # road
    h, w = shape
    for value in rng.permutation(_GT_IDS * 2):
        y, x = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(3, h // 3), rng.integers(3, w // 4)
        yy, xx = np.ogrid[:h, :w]
        label[((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1] = value
    label[-6:, :] = 1  # ego vehicle
    return label


def _prediction(rng, gt_train: np.ndarray) -> np.ndarray:
    pred = gt_train.copy()
    wrong = rng.random(pred.shape) < 0.15
    choices = np.array([c for c in range(19) if c not in (3, 16, 17)])  # never wall, train, motorcycle
    pred[wrong] = rng.choice(choices, size=int(wrong.sum()))
    pred[rng.random(pred.shape) < 0.05] = 255  # no class -> labelId 0 (void) in the PNG
    pred[10:20, 0:12] = 12  # rider, on whatever is there
    return pred


def test_agrees_with_the_official_cityscapes_evaluator(tmp_path, monkeypatch, official_cityscapes_args, same_as_official):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))  # keeps its default paths out of site-packages
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(7)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    ours = ConfusionAccumulator(CLASS_NAMES, IGNORE_INDEX)
    gt_files, pred_files = [], []
    for i, city in enumerate(["lindau", "lindau", "munster", "frankfurt"]):
        gt_path = tmp_path / "gt" / f"{city}_{i:06d}_000019_gtFine_labelIds.png"
        Image.fromarray(_ground_truth(rng)).save(gt_path)
        gt_train = map_label_ids(read_label_png(gt_path))
        pred_train = _prediction(rng, gt_train)
        pred_path = tmp_path / "pred" / prediction_name(gt_path)
        Image.fromarray(train_ids_to_label_ids(pred_train)).save(pred_path)
        ours.add(pred_train, gt_train)
        gt_files.append(str(gt_path))
        pred_files.append(str(pred_path))

    args = official_cityscapes_args(ev, tmp_path / "result.json")
    theirs = ev.evaluateImgLists(pred_files, gt_files, args)

    r = ours.result()
    assert same_as_official(r, theirs, ev) == ["wall", "train", "motorcycle"]  # absent on both sides: NaN, not 0
    assert math.isnan(r["per_class"]["wall"]["iou"]) and r["per_class"]["rider"]["iou"] == 0.0
