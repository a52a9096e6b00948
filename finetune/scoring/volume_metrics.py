"""Per-case 3D metrics for volumetric data: Dice, HD95 and NSD in millimetres.

Slice predictions (one prompt per slice and object, as MedSAM evaluates) are put back into each
case's volume; slices that got no prompt count as predicted empty. Surface distances use the
voxel spacing (MONAI's ``compute_hausdorff_distance`` / ``compute_surface_dice``); NSD uses a
tolerance in mm (MedSAM reports NSD at 2 mm).

Rules (samtune's evaluation protocol, stated in docs/reference/metrics.md): empty ground truth
and empty prediction -> the class is absent from that case, excluded (NaN); empty ground truth
with a prediction -> Dice 0 (a false alarm) and HD95 undefined; ground truth with an empty
prediction -> Dice 0, NSD 0, HD95 undefined. Undefined HD95 values are counted
(``hd95_undefined``), not hidden.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from samtune.finetune.scoring.metrics import nan_mean


def case_scores(pred: np.ndarray, target: np.ndarray, spacing_mm: tuple[float, ...], tolerance_mm: float) -> dict:
    """Z×H×W bool prediction and ground truth of one class in one case -> dice, hd95_mm, nsd."""
    p, t = int(pred.sum()), int(target.sum())
    if p == 0 and t == 0:
        return {"dice": math.nan, "hd95_mm": math.nan, "nsd": math.nan}
    dice = 2 * int(np.count_nonzero(pred & target)) / (p + t)
    if p == 0 or t == 0:
        return {"dice": dice, "hd95_mm": math.nan, "nsd": 0.0}
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice  # imported when used: monai takes seconds to import

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(target)[None, None].float()
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing_mm))
    nsd = compute_surface_dice(y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=list(spacing_mm))
    return {"dice": dice, "hd95_mm": float(hd95.item()), "nsd": float(nsd.item())}


def _slices_by_class() -> defaultdict:  # named, not a lambda: accumulators are pickled across ranks
    return defaultdict(dict)


class VolumeMetricAccumulator:
    """Collects slice predictions of a source that has ``slice_position`` and ``case_volume``."""

    def __init__(self, source, class_names: dict[int, str], tolerance_mm: float = 2.0):
        self.source = source
        self.class_names = class_names
        self.tolerance_mm = tolerance_mm
        self.predictions: dict[str, dict[int, dict[int, np.ndarray]]] = defaultdict(_slices_by_class)

    def __getstate__(self) -> dict:  # sent to other ranks without the source (open files, caches)
        return {k: v for k, v in self.__dict__.items() if k != "source"}

    def merge(self, other: VolumeMetricAccumulator) -> None:
        """Add another rank's slice predictions (the same slice predicted on both: their union)."""
        for case, by_class in other.predictions.items():
            for class_id, slices in by_class.items():
                for z, pred in slices.items():
                    mine = self.predictions[case][class_id]
                    mine[z] = mine[z] | pred if z in mine else pred

    def add(self, index: int, class_id: int, pred: np.ndarray) -> None:
        """``pred``: H×W bool prediction for one object on source slice ``index``."""
        case, z = self.source.slice_position(index)
        slices = self.predictions[case][class_id]
        slices[z] = slices[z] | pred if z in slices else pred.copy()

    def add_volume(self, case: str, class_id: int, pred: np.ndarray) -> None:
        """``pred``: Z×H×W bool prediction of one class in a whole case (propagation)."""
        self.predictions[case][class_id] = {z: pred[z] for z in np.flatnonzero(pred.reshape(len(pred), -1).any(1))}

    def _prediction(self, case: str, class_id: int, shape: tuple[int, ...]) -> np.ndarray:
        pred = np.zeros(shape, bool)
        for z, mask in self.predictions[case][class_id].items():
            pred[z] = mask
        return pred

    def result(self) -> dict:
        cases = sorted({self.source.slice_position(i)[0] for i in range(len(self.source))})
        rows: dict[str, list[dict]] = defaultdict(list)
        for case in cases:
            label, spacing = self.source.case_volume(case)
            label = np.asarray(label)
            for class_id, name in self.class_names.items():
                pred = self._prediction(case, class_id, label.shape)
                rows[name].append({"case": case, **case_scores(pred, label == class_id, spacing, self.tolerance_mm)})
        per_class = {}
        for name, scores in rows.items():
            def mean(key: str) -> float:
                return nan_mean(s[key] for s in scores)

            per_class[name] = {
                "dice": mean("dice"),
                "hd95_mm": mean("hd95_mm"),
                "nsd": mean("nsd"),
                "cases": sum(not math.isnan(s["dice"]) for s in scores),
                "hd95_undefined": sum(not math.isnan(s["dice"]) and math.isnan(s["hd95_mm"]) for s in scores),
                "per_case": scores,
            }

        def class_mean(key: str) -> float:
            return nan_mean(c[key] for c in per_class.values())

        return {
            "per_class": per_class,
            "mdice": class_mean("dice"),
            "mhd95_mm": class_mean("hd95_mm"),
            "mnsd": class_mean("nsd"),
            "nsd_tolerance_mm": self.tolerance_mm,
            "accumulation": "per case (3D, slice predictions stacked), then mean over cases; classes absent from a case are excluded",
        }


class SemanticVolumeAccumulator(VolumeMetricAccumulator):
    """Whole predicted label volumes (automatic mode): every slice of every case gets a label map,
    so a class predicted on a slice without it counts as a false alarm in that case's 3D scores."""

    def __init__(self, source, class_names: dict[int, str], tolerance_mm: float = 2.0):
        super().__init__(source, class_names, tolerance_mm)
        self.volumes: dict[str, np.ndarray] = {}

    def add_label(self, index: int, label: np.ndarray) -> None:
        """``label``: H×W predicted source ids of slice ``index``."""
        case, z = self.source.slice_position(index)
        if case not in self.volumes:
            depth = self.source.case_volume(case)[0].shape[0]
            self.volumes[case] = np.zeros((depth, *label.shape), np.uint8)
        self.volumes[case][z] = label

    def merge(self, other: SemanticVolumeAccumulator) -> None:
        """Another rank's slices: each slice was predicted on one rank, zeros on the others."""
        for case, volume in other.volumes.items():
            if case in self.volumes:
                np.maximum(self.volumes[case], volume, out=self.volumes[case])
            else:
                self.volumes[case] = volume

    def _prediction(self, case: str, class_id: int, shape: tuple[int, ...]) -> np.ndarray:
        volume = self.volumes.get(case)
        return volume == class_id if volume is not None else np.zeros(shape, bool)


def per_case_rows(volume: dict) -> list[dict]:
    """The per-case table of a ``result()`` (one row per case and class), e.g. for per_case.csv."""
    return [{"case": s["case"], "class": name, "dice": s["dice"], "hd95_mm": s["hd95_mm"], "nsd": s["nsd"]}
            for name, c in volume["per_class"].items() for s in c["per_case"]]  # fmt: skip
