"""Cityscapes read as users have it: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (Cordts et al., 2016).

labelIds are mapped to the 19 training ids of the official cityscapesScripts table; every other id
becomes 255 and is ignored by training and metrics. Where ``*_gtFine_labelTrainIds.png`` exists
(written by cityscapesScripts' ``createTrainIdLabelImgs``) it is read as it is instead: the same
values without the table lookup.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.checks import BadCase, handle_bad

IGNORE_INDEX = 255
# trainId -> (name, labelId), from the official Cityscapes label table.
TRAIN_CLASSES: tuple[tuple[str, int], ...] = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
    ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
    ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
    ("motorcycle", 32), ("bicycle", 33),
)  # fmt: skip
CLASS_NAMES = {train_id: name for train_id, (name, _) in enumerate(TRAIN_CLASSES)}

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # OpenCV >= 4.11 decodes straight to RGB

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, (_, _label_id) in enumerate(TRAIN_CLASSES):
    LABEL_TO_TRAIN[_label_id] = _train_id


def map_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """H×W labelIds (uint8) -> H×W trainIds, 255 for every id outside the 19 classes."""
    if label_ids.dtype == np.uint8 and label_ids.ndim == 2:
        return cv2.LUT(label_ids, LABEL_TO_TRAIN)  # same table, ~4x faster than fancy indexing
    return LABEL_TO_TRAIN[label_ids]


def read_png_rgb(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB of an 8-bit PNG. OpenCV decodes PNG ~30% faster than PIL (the largest
    cost of a Cityscapes sample); PIL is the fallback for what OpenCV cannot read."""
    image = cv2.imread(str(path), _IMREAD_RGB)
    if image is None or image.dtype != np.uint8 or image.ndim != 3:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as exc:
            raise SamtuneError(f"{path}: not a readable PNG image ({exc}); re-download or re-extract it.") from None
    return image if _IMREAD_RGB != cv2.IMREAD_COLOR else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class CityscapesSource:
    """Image/label pairs of one split; labels as trainIds."""

    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str, on_bad_case: str = "error", cities: list[str] | None = None):
        self.root = Path(root)
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise SamtuneError(
                f"{image_dir}: no such folder. data.root must be the Cityscapes folder that holds "
                f"leftImg8bit/ and gtFine/ (split {split!r})."
            )
        found = sorted(p for p in image_dir.glob("*/*_leftImg8bit.png") if not p.name.startswith("._"))
        if cities:
            present = sorted({p.parent.name for p in found})
            unknown = [c for c in cities if c not in present]
            if unknown:
                raise SamtuneError(f"data.cities: {unknown} not in {image_dir} (cities there: {', '.join(present)}).")
            found = [p for p in found if p.parent.name in cities]
        if not found:
            raise SamtuneError(f"{image_dir}: no *_leftImg8bit.png images in its city folders.")
        self.images: list[Path] = []
        self.labels: list[Path] = []
        self.train_ids: list[bool] = []  # label file holds trainIds already (no mapping)
        self.skipped: list[dict] = []
        for image in found:
            stem = image.name.replace("_leftImg8bit.png", "")
            folder = self.root / "gtFine" / split / image.parent.name
            label = folder / f"{stem}_gtFine_labelIds.png"
            train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
            try:
                chosen = train_ids if train_ids.is_file() else label
                if not chosen.is_file():
                    raise BadCase(
                        stem, image, f"its label file {label} is missing",
                        "put the gtFine labels beside leftImg8bit (same split/city), or remove the image",
                    )  # fmt: skip
                self._check_sizes(image, chosen, stem)
            except BadCase as bad:
                handle_bad(bad, on_bad_case, self.skipped)
                continue
            self.images.append(image)
            self.labels.append(chosen)
            self.train_ids.append(chosen is train_ids)
        self.class_names = dict(CLASS_NAMES)

    @staticmethod
    def _check_sizes(image: Path, label: Path, stem: str) -> None:
        try:  # headers only: cheap enough for every pair
            with Image.open(image) as a, Image.open(label) as b:
                sizes = a.size, b.size
        except OSError as exc:
            raise BadCase(stem, image, f"cannot read {image} / {label} ({exc})", "re-download or re-extract the files") from None
        if sizes[0] != sizes[1]:
            (iw, ih), (lw, lh) = sizes
            raise BadCase(stem, image, f"image is {iw}×{ih} but its label {label} is {lw}×{lh}", "they must match pixel for pixel")

    def __len__(self) -> int:
        return len(self.images)

    def item_id(self, index: int) -> str:
        return self.images[index].name.replace("_leftImg8bit.png", "")

    def load_label(self, index: int) -> np.ndarray:
        label_ids = cv2.imread(str(self.labels[index]), cv2.IMREAD_UNCHANGED)  # 8-bit grey PNG, as shipped
        if label_ids is None or label_ids.ndim != 2 or label_ids.dtype != np.uint8:
            try:  # palette PNGs and anything unusual: PIL keeps palette indices (OpenCV expands colours)
                with Image.open(self.labels[index]) as img:
                    label_ids = np.asarray(img)
            except OSError as exc:
                raise SamtuneError(f"{self.labels[index]}: not a readable label PNG ({exc}); re-download or re-extract it.") from None
        if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
            raise SamtuneError(f"{self.labels[index]}: expected a single-channel 8-bit label PNG, got shape {label_ids.shape} ({label_ids.dtype}).")
        return label_ids if self.train_ids[index] else map_label_ids(label_ids)

    def slice_classes(self, index: int) -> dict[int, int]:
        ids, counts = np.unique(self.load_label(index), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_png_rgb(self.images[index])
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            raise SamtuneError(
                f"{self.images[index]}: image is {image.shape[1]}×{image.shape[0]} but its label "
                f"{self.labels[index]} is {label.shape[1]}×{label.shape[0]}; they must match."
            )
        return image, label
