"""COCO-format instance annotations for any 2D domain: ``data.kind: coco``.

Layout of ``data.root``, as the official COCO zips unpack: ``annotations/instances_{split}.json``
and the images of each split in ``{split}/`` (``train2017/``, ``val2017/``); both paths are recipe
keys (``data.train_annotations``, ``data.train_images``, ``data.val_*``). The JSON holds
``images`` (id, file_name, height, width), ``categories`` (id, name) and ``annotations`` (id,
image_id, category_id, segmentation, iscrowd), as the COCO format defines them
(https://cocodataset.org/#format-data).

- Classes are the categories: class value = category id (1..254: samtune keeps label maps in
  8 bits, 0 background, 255 ignored), name = the category's name; ``data.classes`` picks a subset
  by name. Both splits must list the same categories.
- Each annotation is one object to prompt with ``prompts.per: instance`` (touching objects of one
  class stay separate; ``per: component`` prompts connected components, ``per: class`` the union
  of a class). Segmentations are polygons, uncompressed RLE (``counts`` a list) or
  compressed RLE (a string), decoded with pycocotools as its ``COCO.annToMask`` does.
- ``iscrowd: 1`` regions are ignored pixels (255) in the label map and never prompted.
- Overlaps: annotations are painted in file order, a later one wins (crowd regions included); an
  instance's object is the part of it left visible.
- Images without annotations are kept: all background for the automatic mode, nothing to prompt.

Bad data (a ``BadCase``: an error, or with ``data.on_bad_case: skip`` left out and listed by
``samtune inspect``): an annotation whose ``category_id`` is not in ``categories`` or whose
segmentation is malformed leaves its image out; an annotation whose ``image_id`` is unknown is
left out itself; an image listed but missing, unreadable or not of its listed size is left out.
Every image's annotations are decoded once when the source is built (per-class pixel counts and
instance sizes are kept), so ``slice_classes`` never decodes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import BadCase, handle_bad
from samtune.datasets.coco_masks import annotation_mask, mask_api
from samtune.datasets.folder2d import ImageFilesSource, image_size, read_rgb
from samtune.datasets.formats import DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit, SliceSource

MAX_CATEGORY_ID = 254  # label maps are uint8: 0 background, 255 ignored


@dataclass
class CocoImage:
    name: str  # file stem, the name samtune reports
    path: Path
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)  # in file order


@dataclass
class CocoSplit:
    """One annotation file: its categories and its images with their annotations."""

    json_path: Path
    categories: dict[int, str]
    images: list[CocoImage]
    skipped: list[dict] = field(default_factory=list)  # annotations without a known image


def read_coco_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SamtuneError(f"{path}: not a readable JSON file ({exc}); re-download or re-extract the annotations.") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise SamtuneError(f"{path}: not a COCO instances file: no {', '.join(repr(k) for k in missing)} list (https://cocodataset.org/#format-data).")
    return data


def read_categories(data: dict, path: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for cat in data["categories"]:
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or not 1 <= cid <= MAX_CATEGORY_ID:
            raise SamtuneError(
                f"{path}: category {cat!r}: the id must be an integer 1..{MAX_CATEGORY_ID} (samtune label maps are 8-bit: "
                "0 background, 255 ignored); renumber the categories and their annotations' category_id."
            )
        if cid in categories:
            raise SamtuneError(f"{path}: category id {cid} is listed twice.")
        categories[cid] = str(cat.get("name") or f"category_{cid}")
    if not categories:
        raise SamtuneError(f"{path}: the 'categories' list is empty; samtune needs the classes to learn.")
    return dict(sorted(categories.items()))


def open_coco_split(json_path: Path, image_dir: Path, on_bad_case: str) -> CocoSplit:
    """The images of one annotation file with their annotations (unknown image ids: a BadCase)."""
    if not json_path.is_file():
        raise SamtuneError(f"{json_path}: no such file. data.kind=coco reads annotations/instances_{{split}}.json "
                           "(set data.train_annotations / data.val_annotations, relative to data.root).")
    if not image_dir.is_dir():
        raise SamtuneError(f"{image_dir}: no such folder. data.kind=coco reads the images of {json_path.name} from it "
                           "(set data.train_images / data.val_images, relative to data.root).")
    data = read_coco_json(json_path)
    split = CocoSplit(json_path, read_categories(data, json_path), [])
    by_id: dict[int, CocoImage] = {}
    for img in data["images"]:
        try:
            entry = CocoImage(Path(img["file_name"]).stem, image_dir / img["file_name"], int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError):
            raise SamtuneError(f"{json_path}: image entry {str(img)[:120]} lacks an id, file_name, height or width.") from None
        by_id[img.get("id")] = entry
        split.images.append(entry)
    for ann in data["annotations"]:
        image = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is None:
            bad = BadCase(None, json_path, f"annotation id {ann.get('id') if isinstance(ann, dict) else ann!r}: image_id "
                          f"{ann.get('image_id') if isinstance(ann, dict) else None!r} is not in the JSON's images", "fix the image_id or remove the annotation")  # fmt: skip
            handle_bad(bad, on_bad_case, split.skipped)
            continue
        image.annotations.append(ann)
    return split


def rasterise(image: CocoImage, categories: dict[int, str], json_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(H×W uint8 label map: category ids, 255 crowd; H×W uint16 instance map: 0 none, k = the k-th
    non-crowd annotation). Painted in file order, a later annotation wins."""
    label = np.zeros((image.height, image.width), np.uint8)
    instances = np.zeros((image.height, image.width), np.uint16)
    k = 0
    for ann in image.annotations:
        cid = ann.get("category_id")
        if cid not in categories:
            raise BadCase(image.name, json_path, f"annotation id {ann.get('id')}: category_id {cid!r} is not in the JSON's categories "
                          f"({', '.join(map(str, categories))})", "fix the category_id, add the category, or remove the annotation")  # fmt: skip
        try:
            mask = annotation_mask(ann.get("segmentation"), image.height, image.width)
        except (ValueError, TypeError) as exc:
            raise BadCase(image.name, json_path, f"annotation id {ann.get('id')}: malformed segmentation ({exc})", "fix or remove the annotation") from None
        if ann.get("iscrowd"):
            label[mask], instances[mask] = IGNORE_INDEX, 0
        else:
            k += 1
            label[mask], instances[mask] = cid, k
    return label, instances


class CocoSource(SliceSource):
    """The images of one COCO annotation file; each image's annotations decoded once at construction."""

    def __init__(self, split: CocoSplit, on_bad_case: str = "error", progress: bool = False, desc: str = "annotations"):
        self.json_path = split.json_path
        self.class_names = dict(split.categories)
        self.images: list[CocoImage] = []
        self.counts: list[dict[int, int]] = []  # per image: category id -> pixels (crowd not counted)
        self.components: list[dict[int, list[int]]] = []  # per image: category id -> instance sizes, largest first
        self.skipped = list(split.skipped)
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None  # load() then load_instances(): decoded once
        for image in tqdm(split.images, desc=desc, unit="image", disable=not progress, leave=False):
            try:
                counts, components = self._scan(image)
            except BadCase as bad:
                handle_bad(bad, on_bad_case, self.skipped)
                continue
            self.images.append(image)
            self.counts.append(counts)
            self.components.append(components)

    def _scan(self, image: CocoImage) -> tuple[dict[int, int], dict[int, list[int]]]:
        if not image.path.is_file():
            raise BadCase(image.name, image.path, f"listed in {self.json_path} but missing", "restore the image or remove it from the JSON")
        h, w = image_size(image.path)
        if (h, w) != (image.height, image.width):
            raise BadCase(image.name, image.path, f"image is {w}×{h} but {self.json_path} lists {image.width}×{image.height}", "fix height/width in the JSON or the image")
        label, instances = rasterise(image, self.class_names, self.json_path)
        values, counts = np.unique(label, return_counts=True)
        sizes = np.bincount(instances.ravel())
        components: dict[int, list[int]] = {}
        if sizes.size > 1:
            owners = np.zeros(sizes.size, np.int64)  # instance -> its category (where it is visible)
            owners[instances.ravel()] = label.ravel()
            for k in np.flatnonzero(sizes[1:]) + 1:
                components.setdefault(int(owners[k]), []).append(int(sizes[k]))
        return ({int(v): int(n) for v, n in zip(values.tolist(), counts.tolist()) if v not in (0, IGNORE_INDEX)},
                {c: sorted(s, reverse=True) for c, s in sorted(components.items())})  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def item_id(self, index: int) -> str:
        return self.images[index].name

    def slice_classes(self, index: int) -> dict[int, int]:
        return dict(self.counts[index])

    def instance_problem(self) -> None:
        return None  # every annotation is an instance

    def slice_instances(self, index: int) -> dict[int, list[int]]:
        """Category id -> visible pixels of each of its instances, largest first."""
        return {c: list(s) for c, s in self.components[index].items()}

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != index:
            self._last = (index, *rasterise(self.images[index], self.class_names, self.json_path))
        return self._last[1], self._last[2]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_rgb(self.images[index].path)
        label = self._decoded(index)[0]
        if image.shape[:2] != label.shape:
            raise SamtuneError(f"{self.images[index].path}: image is {image.shape[1]}×{image.shape[0]} but {self.json_path} lists {label.shape[1]}×{label.shape[0]}.")
        return image, label

    def load_instances(self, index: int) -> np.ndarray:
        return self._decoded(index)[1]


class CocoData(DataSectionBase, DemoKeys):
    """``data:`` for ``kind: coco``."""

    kind: Literal["coco"] = Field(description="`coco`: COCO instances JSON (polygons or RLE) + image folders, categories as classes")
    train_annotations: str = Field("annotations/instances_train2017.json", description="COCO instances JSON of the training images, relative to `root`")
    train_images: str = Field("train2017", description="folder of the training images (the JSON's file_name values), relative to `root`")
    val_annotations: str = Field("annotations/instances_val2017.json", description="COCO instances JSON of the validation images, relative to `root`")
    val_images: str = Field("val2017", description="folder of the validation images, relative to `root`")


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.coco_demo import generate_coco

    return generate_coco(folder / "coco", seed=seed)


@register_format(CocoData, make_demo=_make_demo)
def open_coco(section: CocoData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """The two annotation files as they are (COCO has fixed train/val splits)."""
    mask_api()  # a missing pycocotools is named before any file is read
    root = Path(section.root)
    sides = []
    for json_key, images_key, desc in (("train_annotations", "train_images", "train"), ("val_annotations", "val_images", "val")):
        split = open_coco_split(root / getattr(section, json_key), root / getattr(section, images_key), on_bad_case)
        sides.append(CocoSource(split, on_bad_case, progress, desc=f"{desc} annotations"))
    train, val = sides
    if train.class_names != val.class_names:
        raise SamtuneError(f"{val.json_path}: its categories {val.class_names} differ from those of {train.json_path} "
                           f"{train.class_names}; both splits need the same categories.")
    return DataSplit(train, val, "coco", train.skipped + val.skipped)


@register_images(CocoData)
def open_coco_images(section: CocoData, paths: list) -> ImageFilesSource:
    """Images without annotations (e.g. test2017): files or folders of JPEG/PNG images."""
    return ImageFilesSource(paths)
