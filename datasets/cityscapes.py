"""Cityscapes read as users have it: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (Cordts et al., 2016).

labelIds are mapped to the 19 training ids of the official cityscapesScripts table; every other id
becomes 255 and is ignored by training and metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samtune import SamtuneError

IGNORE_INDEX = 255
# trainId -> (name, labelId), from the official Cityscapes label table.
TRAIN_CLASSES: tuple[tuple[str, int], ...] = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
    ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
    ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
    ("motorcycle", 32), ("bicycle", 33),
)  # fmt: skip
CLASS_NAMES = {train_id: name for train_id, (name, _) in enumerate(TRAIN_CLASSES)}

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, (_, _label_id) in enumerate(TRAIN_CLASSES):
    LABEL_TO_TRAIN[_label_id] = _train_id


def map_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """H×W labelIds (uint8) -> H×W trainIds, 255 for every id outside the 19 classes."""
    return LABEL_TO_TRAIN[label_ids]


class CityscapesSource:
    """Image/label pairs of one split; labels as trainIds."""

    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise SamtuneError(
                f"{image_dir}: no such folder. data.root must be the Cityscapes folder that holds "
                f"leftImg8bit/ and gtFine/ (split {split!r})."
            )
        self.images = sorted(p for p in image_dir.glob("*/*_leftImg8bit.png") if not p.name.startswith("._"))
        if not self.images:
            raise SamtuneError(f"{image_dir}: no *_leftImg8bit.png images in its city folders.")
        self.labels = []
        for image in self.images:
            label = (
                self.root / "gtFine" / split / image.parent.name
                / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            )  # fmt: skip
            if not label.is_file():
                raise SamtuneError(
                    f"{image}: its label file {label} is missing. Put the gtFine labels beside "
                    "leftImg8bit (same split/city), or remove the image."
                )
            self.labels.append(label)
        self.class_names = dict(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.images)

    def item_id(self, index: int) -> str:
        return self.images[index].name.replace("_leftImg8bit.png", "")

    def load_label(self, index: int) -> np.ndarray:
        with Image.open(self.labels[index]) as img:
            label_ids = np.asarray(img)
        if label_ids.ndim != 2:
            raise SamtuneError(f"{self.labels[index]}: expected a single-channel labelIds PNG, got shape {label_ids.shape}.")
        return map_label_ids(label_ids)

    def slice_classes(self, index: int) -> dict[int, int]:
        ids, counts = np.unique(self.load_label(index), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        with Image.open(self.images[index]) as img:
            image = np.asarray(img.convert("RGB"))
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            raise SamtuneError(
                f"{self.images[index]}: image is {image.shape[1]}×{image.shape[0]} but its label "
                f"{self.labels[index]} is {label.shape[1]}×{label.shape[0]}; they must match."
            )
        return image, label
