"""Cityscapes read as users have it: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (Cordts et al., 2016).

labelIds are mapped to the 19 training ids of the official cityscapesScripts table; every other id
becomes 255 and is ignored by training and metrics. Where ``*_gtFine_labelTrainIds.png`` exists
(written by cityscapesScripts' ``createTrainIdLabelImgs``) it is read as it is instead: the same
values without the table lookup.

Every label is read once when the source is built (in a few threads): it must be an 8-bit
single-channel PNG the size of its image, holding labelIds 0..33 (trainIds files: 0..18 and 255);
anything else is a ``BadCase`` (an error, or left out with ``data.on_bad_case: skip``). The
per-class pixel counts are kept, so ``slice_classes`` never reads a label again.

Instances (``prompts.per: instance``, instance AP): ``*_gtFine_instanceIds.png`` beside each label
(``cityscapes_instances.py``). The label table itself: ``cityscapes_labels.py``.

``TrainIdSource`` holds all of that for any list of image/label pairs; ``CityscapesSource`` only
finds Cityscapes' pairs, and the other layouts in this class space (``bdd100k.py``, ``acdc.py``)
do the same for theirs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import BadCase, handle_bad
from samtune.datasets.formats import DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit, LabelSpace, SliceSource
from samtune.datasets.cityscapes_instances import InstanceIdsMixin
from samtune.datasets.cityscapes_labels import (
    CLASS_NAMES,
    CLASS_SPACE,
    LABEL_TO_TRAIN,
    TRAIN_CLASSES,
    cityscapes_label_space,
    map_label_ids,
    prediction_name,
)

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # OpenCV >= 4.11 decodes straight to RGB


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


N_LABEL_IDS = 34  # labelIds 0..33; license plate (-1) is never drawn into the PNGs (cityscapesScripts)
_SCAN_THREADS = 8  # PNG decoding releases the GIL: labels are scanned in parallel


def read_label_png(path: Path, stem: str | None = None) -> np.ndarray:
    """H×W uint8 ids of an 8-bit single-channel (grey or palette) label PNG; anything else is a BadCase."""
    label_ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # 8-bit grey PNG, as shipped
    if label_ids is None or label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        try:  # palette PNGs and anything unusual: PIL keeps palette indices (OpenCV expands colours)
            with Image.open(path) as img:
                mode = img.mode
                label_ids = np.asarray(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadCase(stem, path, f"not a readable label PNG, truncated or corrupt ({exc})", "re-download or re-extract it") from None
        if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
            bits = "a 16-bit" if label_ids.dtype.itemsize == 2 else f"a {mode}"
            raise BadCase(
                stem, path, f"{bits} label PNG (shape {label_ids.shape}, {label_ids.dtype}); Cityscapes labels are "
                "single-channel 8-bit PNGs of ids", "re-export it as an 8-bit grey PNG (the gtFine_labelIds.png of the "
                "official download, or cityscapesScripts' json2labelImg), or remove the image",
            )  # fmt: skip
    return label_ids


CITYSCAPES_TRAIN_IDS_FIX = ("regenerate the labelTrainIds files with cityscapesScripts' createTrainIdLabelImgs, or delete them "
                            "(the labelIds files are then mapped)")


CITYSCAPES_LABEL_IDS_FIX = ("regenerate the label from its _gtFine_polygons.json with cityscapesScripts' json2labelImg, or "
                            "remove the image")


def _label_counts(path: Path, holds_train_ids: bool, stem: str, train_ids_fix: str = CITYSCAPES_TRAIN_IDS_FIX,
                  label_ids_fix: str = CITYSCAPES_LABEL_IDS_FIX) -> dict[int, int]:
    """trainId -> pixels of one label file; ids that Cityscapes does not have are a BadCase."""
    counts = np.bincount(read_label_png(path, stem).ravel(), minlength=256)
    present = np.flatnonzero(counts).tolist()
    if holds_train_ids:
        unknown = [v for v in present if v >= len(TRAIN_CLASSES) and v != IGNORE_INDEX]
        if unknown:
            raise BadCase(
                stem, path, f"holds values {unknown[:10]} ({int(counts[unknown].sum())} px) that are not Cityscapes "
                f"trainIds (0..{len(TRAIN_CLASSES) - 1}, {IGNORE_INDEX} ignored)", train_ids_fix,
            )  # fmt: skip
        return {v: int(counts[v]) for v in present if v != IGNORE_INDEX}
    unknown = [v for v in present if v >= N_LABEL_IDS]
    if unknown:
        raise BadCase(
            stem, path, f"holds ids {unknown[:10]} ({int(counts[unknown].sum())} px) that are not Cityscapes labelIds "
            f"(0..{N_LABEL_IDS - 1}); they would silently be ignored", f"{label_ids_fix} (data.on_bad_case=skip "
            "leaves it out); for a label set of your own use data.kind: folder2d with data.class_names",
        )  # fmt: skip
    train: dict[int, int] = {}
    for v in present:
        t = int(LABEL_TO_TRAIN[v])
        if t != IGNORE_INDEX:
            train[t] = train.get(t, 0) + int(counts[v])
    return dict(sorted(train.items()))


class LabelPair(NamedTuple):
    """One image and the label file read for it; ``holds_train_ids``: the file holds trainIds
    already (no labelId mapping)."""

    image: Path
    label: Path
    holds_train_ids: bool
    stem: str


def _check_pair(pair: LabelPair | BadCase, fixes: tuple[str, str]) -> dict[int, int] | BadCase:
    """The label's trainId counts, or what is wrong with the pair (returned, not raised)."""
    if isinstance(pair, BadCase):
        return pair
    try:
        TrainIdSource._check_sizes(pair.image, pair.label, pair.stem)
        return _label_counts(pair.label, pair.holds_train_ids, pair.stem, *fixes)
    except BadCase as bad:
        return bad


def _scan_pairs(pairs: list, fixes: tuple[str, str]):
    """(pair, counts or BadCase) in order; every label is read once, in a few threads. Stopping
    early (error mode raises on the first bad pair) cancels the labels not yet read."""
    check = partial(_check_pair, fixes=fixes)
    if len(pairs) < 4:
        yield from ((pair, check(pair)) for pair in pairs)
        return
    pool = ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, os.cpu_count() or 1))
    try:
        yield from zip(pairs, pool.map(check, pairs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class TrainIdSource(SliceSource):
    """Image/label pairs labelled in the Cityscapes class space (labelIds mapped, or trainIds as
    they are), the shared base of every Cityscapes-style layout (``cityscapes``, ``bdd100k``,
    ``acdc``): a layout module finds its pairs and hands them over; every label is checked here.

    ``train_ids_fix`` / ``label_ids_fix``: the fix named for a label holding values that are not
    trainIds / labelIds. ``LABEL_IDS_SUFFIX`` / ``TRAIN_IDS_SUFFIX``: where a layout ships both a
    labelIds and a trainIds file per image, their name endings (checked against each other)."""

    ignore_index = IGNORE_INDEX
    LABEL_IDS_SUFFIX: str | None = None
    TRAIN_IDS_SUFFIX: str | None = None

    def __init__(self, pairs: list[LabelPair | BadCase], on_bad_case: str = "error",
                 train_ids_fix: str = CITYSCAPES_TRAIN_IDS_FIX, label_ids_fix: str = CITYSCAPES_LABEL_IDS_FIX):
        self.images: list[Path] = []
        self.labels: list[Path] = []
        self.stems: list[str] = []
        self.train_ids: list[bool] = []  # label file holds trainIds already (no mapping)
        self.counts: list[dict[int, int]] = []  # per image: trainId -> pixels (255 not counted)
        self.skipped: list[dict] = []
        scan = _scan_pairs(pairs, (train_ids_fix, label_ids_fix))
        try:
            for pair, result in scan:
                if isinstance(result, BadCase):
                    handle_bad(result, on_bad_case, self.skipped)
                    continue
                self.images.append(pair.image)
                self.labels.append(pair.label)
                self.stems.append(pair.stem)
                self.train_ids.append(pair.holds_train_ids)
                self.counts.append(result)
        finally:
            scan.close()  # error mode: stop the threads now, not when the traceback is freed
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

    def consistency_problems(self) -> list[dict]:
        """Where both exist, the trainIds file must equal the official mapping of the labelIds file
        (checked on the first such image: a different table would silently change every class)."""
        if not (self.TRAIN_IDS_SUFFIX and self.LABEL_IDS_SUFFIX):
            return []
        for i, uses_train_ids in enumerate(self.train_ids):
            label_ids = Path(str(self.labels[i]).replace(self.TRAIN_IDS_SUFFIX, self.LABEL_IDS_SUFFIX))
            if uses_train_ids and label_ids.is_file():
                with Image.open(label_ids) as img:
                    expected = map_label_ids(np.asarray(img))
                if np.array_equal(expected, self.load_label(i)):
                    return []
                return [{
                    "case": self.item_id(i), "file": str(self.labels[i]),
                    "problem": f"differs from the official trainId mapping of {label_ids.name}; regenerate the "
                    "labelTrainIds files with cityscapesScripts' createTrainIdLabelImgs, or delete them",
                }]  # fmt: skip
        return []

    def __len__(self) -> int:
        return len(self.images)

    def label_space(self, class_ids: list[int]) -> LabelSpace:
        """No background class (void is 255, ignored); prediction files hold labelIds."""
        return cityscapes_label_space(class_ids)

    def item_id(self, index: int) -> str:
        return self.stems[index]

    def load_label(self, index: int) -> np.ndarray:
        label_ids = read_label_png(self.labels[index], self.item_id(index))
        return label_ids if self.train_ids[index] else map_label_ids(label_ids)

    def slice_classes(self, index: int) -> dict[int, int]:
        """trainId -> pixels, counted when the source was built (the label is not read again)."""
        return dict(self.counts[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_png_rgb(self.images[index])
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            raise SamtuneError(
                f"{self.images[index]}: image is {image.shape[1]}×{image.shape[0]} but its label "
                f"{self.labels[index]} is {label.shape[1]}×{label.shape[0]}; they must match."
            )
        return image, label


class CityscapesSource(InstanceIdsMixin, TrainIdSource):
    """Image/label pairs of one split of a leftImg8bit/ + gtFine/ tree; labels as trainIds."""

    LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
    TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"

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
        pairs: list[LabelPair | BadCase] = []
        for image in found:
            stem = image.name.replace("_leftImg8bit.png", "")
            folder = self.root / "gtFine" / split / image.parent.name
            label = folder / f"{stem}{self.LABEL_IDS_SUFFIX}"
            train_ids = folder / f"{stem}{self.TRAIN_IDS_SUFFIX}"
            chosen = train_ids if train_ids.is_file() else label
            if not chosen.is_file():
                pairs.append(BadCase(
                    stem, image, f"its label file {label} is missing",
                    "put the gtFine labels beside leftImg8bit (same split/city), or remove the image",
                ))  # fmt: skip
            else:
                pairs.append(LabelPair(image, chosen, chosen is train_ids, stem))
        super().__init__(pairs, on_bad_case)

    def prediction_name(self, index: int) -> str:
        """``{city}/{city}_{seq}_{frame}_gtFine_labelIds.png``, as the ground truth is named."""
        return f"{self.images[index].parent.name}/{prediction_name(self.images[index])}"


class CityscapesData(DataSectionBase, DemoKeys):
    """``data:`` for ``kind: cityscapes``."""

    kind: Literal["cityscapes"] = Field(description="`cityscapes`: a leftImg8bit/ + gtFine/ tree")
    train_split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for validation")
    cities: Optional[list[str]] = Field(None, description="train only on these cities of `train_split` (default: all)")
    val_cities: Optional[list[str]] = Field(None, description="validate only on these cities of `val_split` (default: all)")

    def scored_subset(self) -> dict:
        return {"split": self.val_split, "cities": self.val_cities or "all", "class_space": CLASS_SPACE}


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.synthetic import generate_cityscapes

    return generate_cityscapes(folder / "cityscapes", seed=seed)


@register_format(CityscapesData, make_demo=_make_demo)
def open_cityscapes(section: CityscapesData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """The official splits as they are (Cityscapes has fixed train/val/test)."""
    train = CityscapesSource(section.root, section.train_split, on_bad_case, section.cities)
    val = CityscapesSource(section.root, section.val_split, on_bad_case, section.val_cities)
    return DataSplit(train, val, "cityscapes", train.skipped + val.skipped)


@register_images(CityscapesData)
def open_cityscapes_images(section: CityscapesData, paths: list):
    """leftImg8bit PNGs without labels (e.g. the test split): files, a city folder, or a split
    folder holding city folders."""
    from samtune.datasets.folder2d import ImageFilesSource

    folders = [Path(p) for p in paths if Path(p).is_dir()]
    nested = any(any(c.is_dir() for c in f.iterdir()) for f in folders)
    return ImageFilesSource(paths, CLASS_NAMES, ("_leftimg8bit.png",), "*/*" if nested else "*")
