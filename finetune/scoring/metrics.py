"""Per-class IoU and Dice for prompted binary masks.

Headline (Cityscapes-style): TP/FP/FN accumulated over the whole split per class, then
IoU = TP/(TP+FP+FN) and Dice = 2TP/(2TP+FP+FN); the mean over classes present in the split.
Also reported (medical-style): the mean over samples of each sample's IoU/Dice. Pixels whose ground
truth is ignored (Cityscapes 255) never count, neither as TP/FN nor as FP.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def nan_mean(values) -> float:
    """Mean of the values that are not NaN (absent classes/cases); NaN when none is left."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _zero_counts() -> np.ndarray:  # a named function, not a lambda: accumulators are pickled across ranks
    return np.zeros(3, dtype=np.int64)


class ClassIoUAccumulator:
    def __init__(self):
        self.counts = defaultdict(_zero_counts)  # class -> TP, FP, FN
        self.sample_iou = defaultdict(list)
        self.sample_dice = defaultdict(list)

    def add(self, class_name: str, pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None) -> None:
        """``pred``, ``target``, ``ignore``: H×W bool masks at the original resolution."""
        valid = ~ignore if ignore is not None else np.ones_like(target, dtype=bool)
        tp = int(np.count_nonzero(pred & target & valid))
        fp = int(np.count_nonzero(pred & ~target & valid))
        fn = int(np.count_nonzero(~pred & target & valid))
        self.counts[class_name] += (tp, fp, fn)
        union = tp + fp + fn
        if union:  # both empty: the class is absent from this sample -> excluded (no score)
            self.sample_iou[class_name].append(tp / union)
            self.sample_dice[class_name].append(2 * tp / (2 * tp + fp + fn))

    def merge(self, other: ClassIoUAccumulator) -> None:
        """Add another accumulator's counts and append its per-sample scores (another rank's shard)."""
        for name, counts in other.counts.items():
            self.counts[name] += counts
        for name, values in other.sample_iou.items():
            self.sample_iou[name].extend(values)
        for name, values in other.sample_dice.items():
            self.sample_dice[name].extend(values)

    def result(self) -> dict:
        per_class = {}
        for name in sorted(self.counts):
            tp, fp, fn = (int(v) for v in self.counts[name])
            union = tp + fp + fn
            per_class[name] = {
                "iou": tp / union if union else math.nan,
                "dice": 2 * tp / (2 * tp + fp + fn) if union else math.nan,
                "iou_per_sample_mean": float(np.mean(self.sample_iou[name])) if self.sample_iou[name] else math.nan,
                "dice_per_sample_mean": float(np.mean(self.sample_dice[name])) if self.sample_dice[name] else math.nan,
                "samples": len(self.sample_iou[name]),
                "tp": tp,
                "fp": fp,
                "fn": fn,
            }

        def mean(key: str) -> float:
            return nan_mean(c[key] for c in per_class.values())

        return {
            "per_class": per_class,
            "miou": mean("iou"),
            "mdice": mean("dice"),
            "miou_per_sample": mean("iou_per_sample_mean"),
            "mdice_per_sample": mean("dice_per_sample_mean"),
            "accumulation": "dataset (TP/FP/FN summed over the split per class); *_per_sample: mean of per-sample scores",
            "n_samples": int(sum(len(v) for v in self.sample_iou.values())),
        }


def format_table(columns: dict[str, dict], title: str = "") -> str:
    """Per-class IoU/Dice side by side for several metric dicts (e.g. before / after)."""
    names = sorted({n for m in columns.values() for n in m["per_class"]})
    width = max([len(n) for n in names] + [10])
    head = f"{'class':<{width}}" + "".join(f" | {label:>17}" for label in columns)
    sub = f"{'':<{width}}" + "".join(f" | {'IoU':>8} {'Dice':>8}" for _ in columns)
    lines = [title] if title else []
    lines += [head, sub, "-" * len(sub)]
    for name in names:
        row = f"{name:<{width}}"
        for metrics in columns.values():
            c = metrics["per_class"].get(name)
            row += f" | {c['iou']:8.3f} {c['dice']:8.3f}" if c else f" | {'-':>8} {'-':>8}"
        lines.append(row)
    lines.append("-" * len(sub))
    lines.append(f"{'mean':<{width}}" + "".join(f" | {m['miou']:8.3f} {m['mdice']:8.3f}" for m in columns.values()))
    return "\n".join(lines)
