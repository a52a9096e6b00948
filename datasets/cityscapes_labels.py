"""The official Cityscapes label table as samtune uses it (Cordts et al., 2016; cityscapesScripts'
``helpers/labels.py``): the 19 training classes with their labelIds, the labelId <-> trainId
mappings, the class space every Cityscapes-style kind shares, and the names the official
evaluators match predictions by.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samtune.constants import IGNORE_INDEX
from samtune.datasets.source import LabelSpace

# trainId -> (name, labelId), from the official Cityscapes label table.
TRAIN_CLASSES: tuple[tuple[str, int], ...] = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
    ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
    ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
    ("motorcycle", 32), ("bicycle", 33),
)  # fmt: skip
CLASS_NAMES = {train_id: name for train_id, (name, _) in enumerate(TRAIN_CLASSES)}
# the class space of every Cityscapes-style kind (cityscapes, bdd100k, acdc), as the protocol names it
CLASS_SPACE = "Cityscapes 19 trainIds (labelIds mapped by the official table), 255 ignored"

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, (_, _label_id) in enumerate(TRAIN_CLASSES):
    LABEL_TO_TRAIN[_label_id] = _train_id


def cityscapes_label_space(class_ids: list[int]) -> LabelSpace:
    """trainIds as classes; a pixel no class claims is void (trainId 255, labelId 0 'unlabeled')."""
    return LabelSpace(list(class_ids), [CLASS_NAMES[i] for i in class_ids], IGNORE_INDEX, [TRAIN_CLASSES[i][1] for i in class_ids], 0)


def map_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """H×W labelIds (uint8) -> H×W trainIds, 255 for every id outside the 19 classes."""
    if label_ids.dtype == np.uint8 and label_ids.ndim == 2:
        return cv2.LUT(label_ids, LABEL_TO_TRAIN)  # same table, ~4x faster than fancy indexing
    return LABEL_TO_TRAIN[label_ids]


TRAIN_TO_LABEL = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; everything else -> 0 "unlabeled"
for _train_id, (_, _label_id) in enumerate(TRAIN_CLASSES):
    TRAIN_TO_LABEL[_train_id] = _label_id


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """H×W trainIds -> H×W uint8 labelIds, what the official evaluator reads; 255 and any id outside
    0..18 become labelId 0 ("unlabeled", a void id: on a class pixel it counts as a miss)."""
    if train_ids.dtype == np.uint8 and train_ids.ndim == 2:
        return cv2.LUT(train_ids, TRAIN_TO_LABEL)
    inside = (train_ids >= 0) & (train_ids < len(TRAIN_TO_LABEL))
    return TRAIN_TO_LABEL[np.where(inside, train_ids, IGNORE_INDEX)]


def prediction_name(label_path_or_stem: str | Path) -> str:
    """``{city}_{seq}_{frame}_gtFine_labelIds.png`` for a ground-truth or image path, or a stem: the
    name cityscapesScripts' evaluator matches (``{city}_{seq}_{frame}*.png``) to its ground truth."""
    parts = Path(label_path_or_stem).name.split("_")
    if len(parts) < 3:
        raise ValueError(f"{label_path_or_stem}: not a Cityscapes name ({{city}}_{{seq}}_{{frame}}...)")
    frame = parts[2].split(".")[0]
    return f"{parts[0]}_{parts[1]}_{frame}_gtFine_labelIds.png"
