"""Generic 2D images with label maps (X-ray, endoscopy, microscopy, ...): ``data.kind: folder2d``.

Layout of ``data.root``: ``images/`` (PNG, JPEG, TIFF or BMP) and ``labels/`` (PNG, TIFF or BMP
class-index maps: 0 background, k = class k, 255 ignored), matched by file stem
(``images/x.jpg`` <-> ``labels/x.png``). Validation images come from ``val/images`` + ``val/labels``
when present (training then from ``images/`` + ``labels/`` or ``train/images`` + ``train/labels``),
otherwise from a split file or a seeded fraction (``finetune/data.py``). Class names come from
``data.class_names``; without it every label value found becomes ``class_<k>``.

Every label is read once when the source is built: its size must match its image, its values the
class map, and the per-class pixel counts are kept, so ``slice_classes`` never reads a file again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import BadCase, check_label_values, handle_bad, list_data_files, list_input_files
from samtune.datasets.formats import CaseSplitKeys, DataSectionBase, register_format, register_images
from samtune.datasets.source import DataSplit, SliceSource
from samtune.datasets.splits import choose_split, unify_class_names

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless only: JPEG changes values at edges


@dataclass(frozen=True)
class Item:
    name: str  # file stem, the name split files use
    image: Path
    label: Path


@dataclass
class Folder2DLayout:
    train: list[Item]
    val: list[Item] | None  # None: no val/ folder, split the training items
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _stem(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def find_pairs(image_dir: Path, label_dir: Path, layout: Folder2DLayout, on_bad_case: str) -> list[Item]:
    """Image/label pairs of one images/ + labels/ folder pair, sorted by name."""
    images, bad = list_data_files(image_dir, IMAGE_SUFFIXES, "image", layout.notes)
    labels, bad_labels = list_data_files(label_dir, LABEL_SUFFIXES + (".jpg", ".jpeg"), "label map", layout.notes)
    for b in bad + bad_labels:
        handle_bad(b, on_bad_case, layout.skipped)
    by_stem: dict[str, Path] = {}
    jpeg_stems = set()  # reported once, as the label's problem
    for path in labels:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            jpeg_stems.add(_stem(path))
            handle_bad(BadCase(_stem(path), path, "a JPEG label map: JPEG is lossy and changes label values at object edges", "save label maps as PNG"), on_bad_case, layout.skipped)
        else:
            by_stem[_stem(path)] = path
    items, seen = [], set()
    for path in images:
        name = _stem(path)
        if name in seen:
            handle_bad(BadCase(name, path, f"two images named {name}.* in {image_dir}", "rename one; images are matched to labels by file stem"), on_bad_case, layout.skipped)
            continue
        seen.add(name)
        if name not in by_stem:
            if name in jpeg_stems:
                continue
            handle_bad(BadCase(name, path, f"no label map {label_dir}/{name}.png for this image", "add the label or move the image out"), on_bad_case, layout.skipped)
            continue
        items.append(Item(name, path, by_stem[name]))
    layout.notes.extend(f"{p}: ignored (a label without an image)" for n, p in sorted(by_stem.items()) if n not in seen)
    return items


def discover_folder2d(root: str | Path, on_bad_case: str = "error") -> Folder2DLayout:
    root = Path(root)
    layout = Folder2DLayout([], None)
    train_dirs = next(((root / p / "images", root / p / "labels") for p in ("", "train") if (root / p / "images").is_dir()), None)
    if train_dirs is None or not train_dirs[1].is_dir():
        raise SamtuneError(
            f"{root}: no images/ and labels/ folders. data.kind=folder2d reads images/ (PNG/JPEG/TIFF) with labels/ "
            "(PNG class-index maps) matched by file stem, plus optional val/images and val/labels."
        )
    layout.train = find_pairs(*train_dirs, layout, on_bad_case)
    if (root / "val" / "images").is_dir():
        if not (root / "val" / "labels").is_dir():
            raise SamtuneError(f"{root / 'val'}: has images/ but no labels/ folder.")
        layout.val = find_pairs(root / "val" / "images", root / "val" / "labels", layout, on_bad_case)
    if not layout.train and not layout.skipped:
        raise SamtuneError(f"{train_dirs[0]}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    return layout


def read_rgb(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB. 16-bit or float images (microscopy, X-ray) are scaled per image by their
    0.5-99.5 percentiles."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                values = np.asarray(img, dtype=np.float32)
                lo, hi = np.percentile(values, (0.5, 99.5))
                scaled = np.round((np.clip(values, lo, hi) - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
                return np.repeat(scaled[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadCase(_stem(path), path, f"not a readable image, truncated or corrupt ({exc})", "re-export it or move it out") from None


def read_label_map(path: Path) -> np.ndarray:
    """H×W class-index map; palette PNGs give their indices, grey-as-RGB one channel."""
    try:
        with Image.open(path) as img:
            label = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadCase(_stem(path), path, f"not a readable label map, truncated or corrupt ({exc})", "re-export it") from None
    if label.ndim == 3:
        if label.shape[2] >= 3 and np.array_equal(label[..., 0], label[..., 1]) and np.array_equal(label[..., 0], label[..., 2]):
            label = label[..., 0]  # grey values saved as RGB
        else:
            raise BadCase(
                _stem(path), path, f"a colour label image (shape {label.shape}); samtune needs single-channel class "
                "indices", "convert colours to class ids (0 background, 1.. classes) and save as a grey or palette PNG",
            )  # fmt: skip
    if label.dtype.kind in "ui" and label.dtype.itemsize > 1:  # 16-bit (or 32-bit) PNG/TIFF label maps
        label = _narrow_label(label, path)
    return label.astype(np.uint8) if label.dtype == bool else label


def _narrow_label(label: np.ndarray, path: Path) -> np.ndarray:
    """A 16/32-bit label map as uint8 when its values fit (lossless), else a BadCase: samtune keeps
    class ids in 8 bits (0 background, 1..254 classes, 255 ignored)."""
    if label.size and (label.min() < 0 or label.max() > 255):
        outside = np.unique(label[(label < 0) | (label > 255)])
        raise BadCase(
            _stem(path), path, f"a {label.dtype.itemsize * 8}-bit label map holding values {outside[:5].tolist()} outside "
            "0..255; class ids must fit in 8 bits (0 background, 1..254 classes, 255 ignored)",
            "save it as an 8-bit PNG of class indices (a binary mask saved as 0/65535: as 0/1)",
        )  # fmt: skip
    return label.astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the header; ``verify`` also walks the file's chunks (PNG CRCs), which catches
    truncated and corrupt files without decoding the pixels."""
    try:
        with Image.open(path) as img:
            size = img.size[1], img.size[0]
            img.verify()
        return size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadCase(_stem(path), path, f"not a readable image, truncated or corrupt ({exc})", "re-export it or move it out") from None


class Folder2DSource(SliceSource):
    """Image/label pairs; each label read and checked once at construction (see module doc)."""

    def __init__(self, items: list[Item], class_names: dict[int, str] | None, on_bad_case: str = "error", progress: bool = False, desc: str = "labels"):
        allowed = set(class_names) if class_names is not None else None
        # 255 is "ignored" unless the class map declares it a class (binary masks saved as 0/255)
        self.ignore_index = -1 if allowed is not None and IGNORE_INDEX in allowed else IGNORE_INDEX
        self.items, self.counts, self.skipped = [], [], []
        for item in tqdm(items, desc=desc, unit="image", disable=not progress, leave=False):
            try:
                counts = self._scan(item, allowed)
            except BadCase as bad:
                handle_bad(bad, on_bad_case, self.skipped)
                continue
            self.items.append(item)
            self.counts.append(counts)
        if class_names is None:
            found = sorted({c for counts in self.counts for c in counts})
            class_names = {c: f"class_{c}" for c in found}
        self.class_names = dict(class_names)

    def _scan(self, item: Item, allowed: set[int] | None) -> dict[int, int]:
        label = read_label_map(item.label)
        h, w = image_size(item.image)
        if (h, w) != label.shape:
            raise BadCase(item.name, item.label, f"label is {label.shape[1]}×{label.shape[0]} but its image {item.image} is {w}×{h}", "they must match pixel for pixel")
        values, counts = np.unique(label, return_counts=True)
        if self.ignore_index == IGNORE_INDEX and set(values.tolist()) == {0, 255} and (allowed is None or 255 not in allowed):
            raise BadCase(
                item.name, item.label, "the label holds only 0 and 255: a binary mask saved as 0/255, but 255 means "
                "'ignored'", "save it as 0/1, or declare 255 a class with data.class_names: {255: <name>}",
            )  # fmt: skip
        check_label_values(values, allowed, self.ignore_index, item.name, item.label)
        return {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist()) if v != 0 and v != self.ignore_index}

    def __len__(self) -> int:
        return len(self.items)

    def item_id(self, index: int) -> str:
        return self.items[index].name

    def slice_classes(self, index: int) -> dict[int, int]:
        return dict(self.counts[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        item = self.items[index]
        image, label = read_rgb(item.image), read_label_map(item.label)
        if image.shape[:2] != label.shape:
            raise SamtuneError(f"{item.image}: image is {image.shape[1]}×{image.shape[0]} but its label {item.label} is {label.shape[1]}×{label.shape[0]}; they must match.")
        return image, label


class Folder2DData(DataSectionBase, CaseSplitKeys):
    """``data:`` for ``kind: folder2d``."""

    kind: Literal["folder2d"] = Field(description="`folder2d`: images/ (PNG/JPEG/TIFF/BMP) + labels/ (PNG class-index maps) matched by file stem")


@register_format(Folder2DData)
def open_folder2d(section: Folder2DData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """Validation from val/images + val/labels when present, else a split file or a seeded fraction."""
    root = Path(section.root)
    layout = discover_folder2d(root, on_bad_case)
    if layout.val is None:
        train_items, val_items = choose_split(layout.train, section, root, seed, layout.skipped)
    else:
        if section.split_file:
            raise SamtuneError(f"data.split_file is set but {root / 'val'} exists: use one way to choose validation images.")
        train_items, val_items = layout.train, layout.val
    train = Folder2DSource(train_items, section.class_names, on_bad_case, progress, desc="train labels")
    val = Folder2DSource(val_items, section.class_names, on_bad_case, progress, desc="val labels")
    if section.class_names is None:
        unify_class_names(train, val)
    return DataSplit(train, val, "folder2d", layout.skipped + train.skipped + val.skipped, layout.notes)


class ImageFilesSource(SliceSource):
    """2D images without labels (prediction): PNG/JPEG/TIFF/BMP files, or the images of folders."""

    has_labels = False

    def __init__(self, paths: list, class_names: dict[int, str] | None = None, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, pattern: str = "*"):
        self.files = list_input_files(paths, suffixes, pattern)
        self.class_names = dict(class_names or {})
        self.skipped = []

    def __len__(self) -> int:
        return len(self.files)

    def item_id(self, index: int) -> str:
        return _stem(self.files[index])

    def slice_classes(self, index: int) -> dict[int, int]:
        return {}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_rgb(self.files[index])
        return image, np.zeros(image.shape[:2], np.uint8)


@register_images(Folder2DData)
def open_folder2d_images(section: Folder2DData, paths: list) -> ImageFilesSource:
    return ImageFilesSource(paths, section.class_names)
