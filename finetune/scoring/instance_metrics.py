"""Instance-level AP of the Cityscapes benchmark, with the rules of cityscapesScripts'
``evaluation/evalInstanceLevelSemanticLabeling.py`` (Cordts et al., 2016), tested equal to it on the
files ``samtune evaluate`` writes.

Facts copied from that evaluator:

- Classes: the eight "thing" classes it evaluates, person, rider, car, truck, bus, train, motorcycle
  and bicycle (labelIds 24-28, 31-33; caravan and trailer have instances but are not evaluated).
- Ground truth (``*_gtFine_instanceIds.png``): each id >= 1000 is an instance of labelId id // 1000;
  an id < 1000 is a labelId: for a thing class, a "group" region (a crowd of cars) that is no
  instance. An instance of fewer than 100 px is not scored (minRegionSize).
- A prediction is a binary mask at full resolution with a labelId and a confidence. Its overlap
  with a ground-truth region of its class is |P∩G| / (|G| + |P| − |P∩G|).
- For each threshold t in 0.50, 0.55, ..., 0.95 (overlap strictly above t): a scored instance
  matched by predictions is one true positive with the highest of their confidences, the other
  matching predictions are false positives; an unmatched instance is a false negative. A
  prediction above t with no region of its class (instance, group or small) is a false positive,
  unless more than t of its pixels are void (labelIds the benchmark ignores), group regions of its
  class or its class's instances under 100 px (a small group region counts twice, as there).
- AP at t: precision and recall at every distinct confidence (scores at or above it kept), plus
  the point (recall 0, precision 1); AP = Σ precision_i · (recall_{i-1} − recall_{i+1}) / 2 with
  recall_{-1} = recall_0 and a last recall of 0. A class with ground truth but no prediction has
  AP 0; with no ground truth in the split, NaN (left out of the means).
- AP of a class = mean over the 10 thresholds, AP50 = at t = 0.5; the headline AP / AP50 are the
  means over classes. The distance-limited variants (AP 50m / 100m) need disparity maps and are
  not computed, as the evaluator skips them by default.

Where the evaluator stops with an IndexError (a class with ground truth and predictions but not one
prediction or match left to score at some t), AP at t is 0 here.

Written by hand, not imported: the evaluator keeps every matched pair as Python dicts and reads
every mask PNG back from disk; here a prediction is reduced to its pixel count, void pixels and
intersections when it is made, so the split's scores need no files and no masks in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samtune.finetune.scoring.metrics import nan_mean
from samtune.files import write_atomic

# labelId -> name of the classes the benchmark scores (cityscapesScripts' label table: hasInstances
# and not ignoreInEval)
INSTANCE_CLASSES: dict[int, str] = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle"}
# labelIds with ignoreInEval (license plate, -1, never appears in the PNGs)
VOID_LABEL_IDS = np.array([0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, -1])
OVERLAPS = np.arange(0.5, 1.0, 0.05)  # as the evaluator builds them (10 values, float steps)
MIN_REGION_SIZE = 100


@dataclass
class Region:
    """One ground-truth region of a thing class: an instance (id >= 1000) or a group (id < 1000)."""

    id: int
    pixels: int


@dataclass
class Prediction:
    label_id: int
    pixels: int
    confidence: float
    void: int  # pixels on void ground truth
    hits: dict[int, int] = field(default_factory=dict)  # region id (same class) -> intersection


def _label_of(region_id: int) -> int:
    return region_id if region_id < 1000 else region_id // 1000


class InstanceAPAccumulator:
    """Ground truth and predictions of every image (keyed by a name unique in the split); ``result``
    scores the split. Add each image's ground truth once (``add_ground_truth``), its predictions
    in any number of calls (``add_prediction``)."""

    def __init__(self):
        self.regions: dict[str, dict[int, list[Region]]] = {}  # image -> labelId -> regions
        self.predictions: dict[str, list[Prediction]] = {}

    def add_ground_truth(self, image: str, instance_ids: np.ndarray) -> None:
        if image in self.regions:
            return
        ids, counts = np.unique(instance_ids, return_counts=True)
        by_class: dict[int, list[Region]] = {}
        for region_id, pixels in zip(ids.tolist(), counts.tolist()):
            if _label_of(region_id) in INSTANCE_CLASSES:
                by_class.setdefault(_label_of(region_id), []).append(Region(int(region_id), int(pixels)))
        self.regions[image] = by_class

    def add_prediction(self, image: str, instance_ids: np.ndarray, label_id: int, mask: np.ndarray, confidence: float) -> bool:
        """One predicted mask (H×W bool, the ground truth's size) of class ``label_id``; False (not
        kept) for an empty mask or a class the benchmark does not score."""
        self.add_ground_truth(image, instance_ids)
        under = instance_ids[mask]
        if label_id not in INSTANCE_CLASSES or under.size == 0:
            return False
        ids, counts = np.unique(under, return_counts=True)
        regions = {r.id for r in self.regions[image].get(label_id, [])}
        prediction = Prediction(
            int(label_id), int(under.size), float(confidence), int(counts[np.isin(ids, VOID_LABEL_IDS)].sum()),
            {int(i): int(n) for i, n in zip(ids.tolist(), counts.tolist()) if i in regions},
        )  # fmt: skip
        self.predictions.setdefault(image, []).append(prediction)
        return True

    def merge(self, other: InstanceAPAccumulator) -> None:
        for image, regions in other.regions.items():
            self.regions.setdefault(image, regions)
        for image, predictions in other.predictions.items():
            self.predictions.setdefault(image, []).extend(predictions)

    def _scored(self, label_id: int, t: float) -> tuple[list[float], list[float], int, bool, bool]:
        """(is-true-positive flags, confidences, false negatives, has ground truth, has predictions)."""
        y_true: list[float] = []
        y_score: list[float] = []
        hard_fn, have_gt, have_pred = 0, False, False
        for image, by_class in self.regions.items():
            regions = by_class.get(label_id, [])
            size = {r.id: r.pixels for r in regions}
            scored = [r for r in regions if r.id >= 1000 and r.pixels >= MIN_REGION_SIZE]
            predictions = [p for p in self.predictions.get(image, []) if p.label_id == label_id]
            have_gt |= bool(scored)
            have_pred |= bool(predictions)
            for region in scored:
                matching = [p.confidence for p in predictions
                            if region.id in p.hits and _overlap(p.hits[region.id], region.pixels, p.pixels) > t]  # fmt: skip
                if not matching:
                    hard_fn += 1
                    continue
                best = max(matching)
                y_true += [1.0] + [0.0] * (len(matching) - 1)
                y_score += [best] + sorted(matching)[: len(matching) - 1]
            for p in predictions:
                if any(_overlap(n, size[r], p.pixels) > t for r, n in p.hits.items()):
                    continue
                ignored = p.void + sum(n for r, n in p.hits.items() if r < 1000) + sum(n for r, n in p.hits.items() if size[r] < MIN_REGION_SIZE)
                if ignored / p.pixels <= t:
                    y_true.append(0.0)
                    y_score.append(p.confidence)
        return y_true, y_score, hard_fn, have_gt, have_pred

    def result(self) -> dict:
        ap = np.full((len(INSTANCE_CLASSES), len(OVERLAPS)), math.nan)
        for c, label_id in enumerate(INSTANCE_CLASSES):
            for o, t in enumerate(OVERLAPS):
                y_true, y_score, hard_fn, have_gt, have_pred = self._scored(label_id, float(t))
                if have_gt:
                    ap[c, o] = average_precision(np.asarray(y_true), np.asarray(y_score), hard_fn) if have_pred else 0.0
        per_class = {}
        for c, (label_id, name) in enumerate(INSTANCE_CLASSES.items()):
            counted = sum(r.id >= 1000 and r.pixels >= MIN_REGION_SIZE for regions in self.regions.values() for r in regions.get(label_id, []))
            predicted = sum(p.label_id == label_id for predictions in self.predictions.values() for p in predictions)
            per_class[name] = {"ap": float(np.mean(ap[c])), "ap50": float(ap[c, 0]), "instances": counted, "predictions": predicted}
        return {
            "ap": nan_mean(ap.ravel().tolist()), "ap50": nan_mean(ap[:, 0].tolist()), "per_class": per_class,
            "images": len(self.regions),
        }  # fmt: skip


def _overlap(intersection: int, region_pixels: int, prediction_pixels: int) -> float:
    return intersection / (region_pixels + prediction_pixels - intersection)


def average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_fn: int) -> float:
    """AP of one class at one threshold from the scored predictions (1: true positive) and the false
    negatives no prediction matched, as the evaluator integrates it (module docstring)."""
    if y_true.size == 0:
        return 0.0
    order = np.argsort(y_score, kind="stable")  # ties: the same curve in any order (cut at distinct scores)
    scores, cumulative = y_score[order], np.cumsum(y_true[order])
    first = np.unique(scores, return_index=True)[1]  # index of each distinct score in ascending order
    below = np.where(first > 0, cumulative[np.maximum(first - 1, 0)], 0.0)  # true positives under the cut
    tp = cumulative[-1] - below
    fp = scores.size - first - tp
    fn = below + hard_fn
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (tp + fn), 0.0)
    padded = np.concatenate([recall[:1], recall, [0.0]])
    return float(np.dot(precision, (padded[:-2] - padded[2:]) / 2))


def thing_components(index_map: np.ndarray, scores: np.ndarray, class_label_ids: list[int]) -> list[tuple[int, np.ndarray, float]]:
    """Automatic instances from a fused label map: each connected component (8-connectivity) of a
    thing class is one instance, its confidence the mean probability of the winning class over it.

    ``index_map``: H×W class indexes (K = none); ``scores``: H×W probability of the class each pixel
    took; ``class_label_ids``: the labelId of each class index. Returns (labelId, mask, confidence)."""
    from scipy import ndimage

    out = []
    for k, label_id in enumerate(class_label_ids):
        if label_id not in INSTANCE_CLASSES:
            continue
        components, count = ndimage.label(index_map == k, structure=np.ones((3, 3), bool))
        if not count:
            continue
        means = ndimage.mean(scores, components, index=np.arange(1, count + 1))
        out += [(label_id, components == n + 1, float(means[n])) for n in range(count)]
    return out


class InstancePredictionFiles:
    """The evaluator's prediction format under ``folder``: per image ``{name}.txt``, one line per
    instance, ``{mask path relative to it} {labelId} {confidence}``, each mask an 8-bit PNG (255
    inside) in ``{name}/``; an image without instances gets an empty text file (the evaluator needs
    one per ground truth). ``name``: ``{city}/{city}_{seq}_{frame}``, found by the evaluator's
    ``{city}_{seq}_{frame}*.txt`` search. Masks are written as they come, the text files by ``write``
    (after ``merge`` across ranks)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lines: dict[str, list[str]] = {}

    def add_image(self, name: str) -> None:
        self.lines.setdefault(name, [])

    def add(self, name: str, tag: str, label_id: int, mask: np.ndarray, confidence: float) -> None:
        """One instance; ``tag`` names its mask file, unique within the image."""
        from samtune.finetune.predict.label_files import write_label_png

        relative = f"{Path(name).name}/{tag}.png"
        write_label_png(mask.astype(np.uint8) * 255, (self.folder / name).parent / relative)
        self.lines.setdefault(name, []).append(f"{relative} {int(label_id)} {float(confidence)!r}\n")

    def merge(self, other: InstancePredictionFiles) -> None:
        for name, lines in other.lines.items():
            self.lines.setdefault(name, []).extend(lines)

    def write(self) -> Path:
        for name, lines in self.lines.items():
            text = self.folder / f"{name}.txt"
            text.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(text, "".join(lines).encode())
        return self.folder


def has_instance_benchmark(source) -> bool:
    """The source serves the Cityscapes instance ground truth for every image (instance AP can be scored)."""
    return len(source) > 0 and source.instance_problem() is None and source.instance_ids(0) is not None


def instance_name(source, index: int) -> str:
    """``{city}/{city}_{seq}_{frame}`` of image ``index`` (from its labelIds prediction name)."""
    return str(Path(source.prediction_name(index)).with_suffix("")).removesuffix("_gtFine_labelIds")


def instance_protocol(objects: str) -> dict:
    return {
        "benchmark": "Cityscapes instance-level semantic labeling (cityscapesScripts evalInstanceLevelSemanticLabeling rules)",
        "classes": list(INSTANCE_CLASSES.values()),
        "ground_truth": f"*_gtFine_instanceIds.png; ids >= 1000 are instances, scored when >= {MIN_REGION_SIZE} px; group regions and void ignored",
        "predictions": objects,
        "overlaps": [round(float(t), 2) for t in OVERLAPS],
        "ap": "mean over the overlap thresholds and classes with ground truth (NaN classes left out); ap50 at overlap 0.5",
        "resolution": "original image resolution",
    }
