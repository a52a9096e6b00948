"""Semantic-segmentation scores from one confusion matrix over the whole split.

Rules of the official Cityscapes pixel-level evaluator (Cordts et al., 2016; cityscapesScripts
``evaluation/evalPixelLevelSemanticLabeling.py``), with rows = ground truth, columns = prediction:

- ``TP_c = conf[c, c]``;
- ``FN_c``: ground-truth pixels of ``c`` predicted as anything else, "other" included;
- ``FP_c``: predictions of ``c`` on pixels whose ground truth is not ``c`` and not ignored. Ground
  truth "other" (NIfTI background 0) is not ignored and counts; ``ignore_index`` never counts;
- ``IoU = TP / (TP + FP + FN)``, ``Dice = 2TP / (2TP + FP + FN)``; NaN when ``TP + FP + FN == 0``
  (the class is neither in the ground truth nor predicted), and the means over classes skip NaN.

Every id that is not a class (background 0, 255 predicted as "no class", Cityscapes void labelIds
that a caller did not map to ``ignore_index``) is one "other" row/column, index K of the
(K+1)×(K+1) matrix. The official evaluator keeps every labelId in its matrix instead; as far as the
19 classes go, the two agree, since it too counts a void prediction on a class pixel as FN only.
"""

from __future__ import annotations

import math

import numpy as np

from samtune.finetune.scoring.metrics import nan_mean

_LUT_MIN = 256  # covers uint8 maps; larger class ids or ignore_index widen the table


class ConfusionAccumulator:
    """Dataset-level confusion matrix; ``add`` every H×W map of the split, then ``result``."""

    def __init__(self, class_names: dict[int, str], ignore_index: int = 255):
        ids = sorted(int(i) for i in class_names)
        if not ids:
            raise ValueError("class_names is empty")
        if ids[0] < 0:
            raise ValueError(f"class ids must be >= 0, got {ids[0]}")
        if ignore_index in ids:
            raise ValueError(f"ignore_index {ignore_index} is also a class ({class_names[ignore_index]!r})")
        names = [str(class_names[i]) for i in ids]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique: {names}")
        self.class_ids = ids
        self.class_names = names
        self.ignore_index = int(ignore_index)
        n = len(ids)
        self._size = max(_LUT_MIN, ids[-1] + 1, self.ignore_index + 1)
        # value -> column (prediction) or row * (n + 1) (target); one extra entry (index _size) for
        # values outside 0.._size-1. Ignored targets go to row n + 1: counted, then dropped.
        self._pred_lut = np.full(self._size + 1, n, dtype=np.int32)
        self._pred_lut[ids] = np.arange(n)
        self._target_lut = self._pred_lut * (n + 1)
        if 0 <= self.ignore_index < self._size:
            self._target_lut[self.ignore_index] = (n + 1) * (n + 1)
        self.confusion = np.zeros((n + 1, n + 1), dtype=np.int64)

    def _indexes(self, labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
        if labels.dtype == np.bool_:
            labels = labels.view(np.uint8)
        if labels.dtype != np.uint8:
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"label maps must hold integer ids, got {labels.dtype}")
            labels = np.where((labels >= 0) & (labels < self._size), labels, self._size)
        return np.take(lut, labels)  # ~2x faster than lut[labels]

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        """H×W integer label maps in the source's class ids (e.g. Cityscapes trainIds 0..18, NIfTI
        label values). ``target == ignore_index`` never counts. Any id not in ``class_names``
        (background 0, or 255 predicted = 'no class') is 'other'."""
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
        n = len(self.class_ids)
        codes = self._indexes(target, self._target_lut)  # row * (n + 1)
        if not 0 <= self.ignore_index < self._size:  # e.g. -1: only in signed maps
            codes[target == self.ignore_index] = (n + 1) * (n + 1)
        codes += self._indexes(pred, self._pred_lut)
        counts = np.bincount(codes.ravel(), minlength=(n + 2) * (n + 1))
        self.confusion += counts.reshape(n + 2, n + 1)[: n + 1]

    def merge(self, other: ConfusionAccumulator) -> None:
        """Add another accumulator's counts (same classes and ignore_index), e.g. from another process."""
        if other.class_ids != self.class_ids or other.class_names != self.class_names or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge accumulators with different classes or ignore_index")
        self.confusion += other.confusion

    def result(self) -> dict:
        conf = self.confusion
        n = len(self.class_ids)
        tp = np.diagonal(conf)[:n]
        gt = conf.sum(axis=1)[:n]
        pred = conf.sum(axis=0)[:n]  # on non-ignored ground truth, "other" included
        fn, fp = gt - tp, pred - tp
        per_class = {}
        for i, name in enumerate(self.class_names):
            t, p, f = int(tp[i]), int(fp[i]), int(fn[i])
            union = t + p + f
            per_class[name] = {
                "iou": t / union if union else math.nan,
                "dice": 2 * t / (2 * t + p + f) if union else math.nan,
                "tp": t,
                "fp": p,
                "fn": f,
                "gt_pixels": int(gt[i]),
                "pred_pixels": int(pred[i]),
            }
        total = int(conf.sum())
        return {
            "per_class": per_class,
            "miou": nan_mean(c["iou"] for c in per_class.values()),
            "mdice": nan_mean(c["dice"] for c in per_class.values()),
            "pixel_accuracy": int(np.trace(conf)) / total if total else math.nan,
            "confusion": conf.tolist(),
            "confusion_labels": [*self.class_names, "other"],
            "accumulation": "dataset-level confusion matrix (rows ground truth, columns prediction) summed over "
            "the split; ignore/void ground truth excluded, 'other' (background) ground truth counted",
        }
