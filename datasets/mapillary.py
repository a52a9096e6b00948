"""Mapillary Vistas read as it unzips: ``{split}/images/{key}.jpg`` with
``{split}/{version}/labels/{key}.png`` and the class list ``config_{version}.json`` beside the
split folders (Neuhold et al., "The Mapillary Vistas Dataset for Semantic Understanding of Street
Scenes", ICCV 2017; layout, config files and label format of the official downloads,
``mapillary-vistas-dataset_public_v1.1.zip`` / ``_v2.0.zip``, and of the ``demo.py`` shipped in
them and in the official repository mapillary/mapillary_vistas).

Facts used here (same sources): the splits are ``training`` (18000 images), ``validation`` (2000)
and ``testing`` (5000, no public labels); images are JPEGs of varying size. The v2.0 download
holds both label versions, ``{split}/v1.2/labels`` (66 classes) and ``{split}/v2.0/labels`` (124
classes), with ``config_v1.2.json`` and ``config_v2.0.json``; the v1.x download has
``{split}/labels`` and ``config.json`` (read for ``version: v1.2`` when the v2.0 tree is absent).
A label PNG is an 8-bit palette ('P') image whose pixel values index the config's ``labels`` list
(the palette holds each label's ``color``); each entry has ``name`` (e.g. ``object--vehicle--car``),
``readable`` (``Car``) and ``evaluate``.

Class ids and names are read from the config at run time, never hard-coded: a label value is its
index in ``labels``; the labels the dataset marks ``evaluate: false`` (in the official configs the
"Unlabeled" class among them) and any class named "unlabeled" become 255 and are ignored by
training and metrics, as the benchmark ignores them. Class names are the ``readable`` names (the
``name`` where two readable names coincide). A value outside the list is a ``BadCase`` naming the
file and the value. Predictions are written as label values ("Unlabeled" where no class claims a
pixel).

``data.cityscapes_classes: true`` maps the labels to the 19 Cityscapes trainIds instead, so a
checkpoint trained on Cityscapes (or BDD100K, ACDC) is scored on Vistas and the other way round in
one class space. The table (``VISTAS_TO_CITYSCAPES``) is the Vistas v1.2 -> Cityscapes-19 table
used in cross-dataset and open-set driving work: the ``vistas_to_cityscapes`` dict of the Vistas-NP
dataset maker (matejgrcic/Vistas-NP, ``make_vistas_np.py``, which reads ``{split}/v1.2/labels``),
copied unchanged into other open-set segmentation code. It lists 38 of the 66 v1.2 label names;
every label it does not list (animals, other barriers, water, street furniture, the rear of traffic
signs, caravans, trailers, boats, the void labels ...) becomes 255, ignored; the table, not
``evaluate``, decides. Labels are matched by their config ``name`` at run time, never by value. The
table is defined for v1.2 names only (v2.0 splits and renames labels, e.g. ``human--person`` into
``human--person--individual`` and ``--person-group``, ``marking--general`` into many
``marking--continuous--*`` and ``marking--discrete--*`` labels), so the option needs ``version:
v1.2``, which the v2.0 download holds too. Not every published table agrees: unipercept's
``CLASSES_AS_CITYSCAPES`` (kurt-stolle/unipercept, ``data/sets/vistas.py``) differs in 11 labels
(guard rail, parking, rail track, bridge, tunnel and snow ignored; mountain -> terrain, manhole and
pothole -> road, street light and the traffic-sign frame -> pole), so Vistas scores in the
Cityscapes space compare only between runs that used the same table. With the option the source
serves trainIds and writes predictions as Cityscapes labelIds, exactly like ``TrainIdSource``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import BadCase, handle_bad
from samtune.datasets.cityscapes import CLASS_NAMES, CLASS_SPACE, TrainIdSource, cityscapes_label_space, read_png_rgb
from samtune.datasets.formats import DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit, LabelSpace, SliceSource

VERSIONS = ("v1.2", "v2.0")
LAYOUT = ("{split}/images/*.jpg with {split}/{version}/labels/*.png and config_{version}.json "
          "(v1.x download: {split}/labels/*.png, config.json)")
_SCAN_THREADS = 8  # PNG decoding releases the GIL: labels are scanned in parallel
_LABEL_FIX = ("re-extract it from the official Mapillary Vistas download (the {split}/{version}/labels PNGs, not a "
              "colour rendering), or remove the image")

# Vistas v1.2 label name -> Cityscapes class name (a name of cityscapes.CLASS_NAMES); every label not
# listed -> 255. The vistas_to_cityscapes table of matejgrcic/Vistas-NP (make_vistas_np.py), as is.
VISTAS_TO_CITYSCAPES: dict[str, str] = {
    "construction--barrier--curb": "sidewalk", "construction--barrier--fence": "fence",
    "construction--barrier--guard-rail": "fence", "construction--barrier--wall": "wall",
    "construction--flat--bike-lane": "road", "construction--flat--crosswalk-plain": "road",
    "construction--flat--curb-cut": "sidewalk", "construction--flat--parking": "road",
    "construction--flat--pedestrian-area": "sidewalk", "construction--flat--rail-track": "road",
    "construction--flat--road": "road", "construction--flat--service-lane": "road",
    "construction--flat--sidewalk": "sidewalk", "construction--structure--bridge": "building",
    "construction--structure--building": "building", "construction--structure--tunnel": "building",
    "human--person": "person", "human--rider--bicyclist": "rider", "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider", "marking--crosswalk-zebra": "road", "marking--general": "road",
    "nature--sand": "terrain", "nature--sky": "sky", "nature--snow": "terrain", "nature--terrain": "terrain",
    "nature--vegetation": "vegetation", "object--support--pole": "pole",
    "object--support--traffic-sign-frame": "traffic sign", "object--support--utility-pole": "pole",
    "object--traffic-light": "traffic light", "object--traffic-sign--front": "traffic sign",
    "object--vehicle--bicycle": "bicycle", "object--vehicle--bus": "bus", "object--vehicle--car": "car",
    "object--vehicle--motorcycle": "motorcycle", "object--vehicle--on-rails": "train", "object--vehicle--truck": "truck",
}  # fmt: skip
# the protocol's class space with data.cityscapes_classes
MAPPED_CLASS_SPACE = (f"{CLASS_SPACE}; here Mapillary Vistas v1.2 labels mapped by name with the Vistas v1.2 -> "
                      "Cityscapes table of Vistas-NP (vistas_to_cityscapes), every other label 255 ignored")  # fmt: skip


@dataclass(frozen=True)
class VistasClasses:
    """The class list of one ``config_{version}.json``."""

    path: Path
    names: dict[int, str]  # evaluated label value -> name
    label_names: tuple[str, ...]  # label value -> the config's `name` (e.g. object--vehicle--car)
    n_values: int  # label values 0..n_values-1 exist
    unlabeled: int | None  # the value of "unlabeled", written where no class claims a pixel
    lut: np.ndarray  # 256 entries: label value -> itself if evaluated, else 255


def _config_path(root: Path, version: str) -> Path:
    candidates = [root / f"config_{version}.json"] + ([root / "config.json"] if version == "v1.2" else [])
    for path in candidates:
        if path.is_file():
            return path
    raise SamtuneError(f"{candidates[0]}: no such file. data.root must be the Mapillary Vistas folder as it unzips: {LAYOUT}; "
                       "the class list is read from the dataset's own config file.")  # fmt: skip


def read_classes(root: str | Path, version: str) -> VistasClasses:
    """Classes of ``config_{version}.json`` in ``root`` (index in ``labels`` = label value)."""
    path = _config_path(Path(root), version)
    try:
        labels = json.loads(path.read_text())["labels"]
        entries = [(str(e["name"]), str(e.get("readable") or e["name"]), bool(e.get("evaluate", True))) for e in labels]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamtuneError(f"{path}: not a Mapillary Vistas config (a JSON object whose `labels` list holds name / readable / "
                           f"evaluate entries): {exc!r}. Re-extract it from the official download.") from None  # fmt: skip
    if not 0 < len(entries) <= IGNORE_INDEX:
        raise SamtuneError(f"{path}: {len(entries)} labels; expected 1..{IGNORE_INDEX} (8-bit label values, {IGNORE_INDEX} ignored).")
    is_unlabeled = [readable.lower() == "unlabeled" or name.lower().endswith("unlabeled") for name, readable, _ in entries]
    kept = [v for v, (_, _, evaluate) in enumerate(entries) if evaluate and not is_unlabeled[v]]
    readables = [entries[v][1] for v in kept]
    names = {v: entries[v][1] if readables.count(entries[v][1]) == 1 else entries[v][0] for v in kept}
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[kept] = kept
    return VistasClasses(path, names, tuple(name for name, _, _ in entries), len(entries),
                         is_unlabeled.index(True) if any(is_unlabeled) else None, lut)  # fmt: skip


def cityscapes_lut(classes: VistasClasses, version: str) -> np.ndarray:
    """256 entries: Vistas label value -> Cityscapes trainId by the label's config ``name`` and
    ``VISTAS_TO_CITYSCAPES``; 255 for every label the table does not list."""
    if version != "v1.2":
        raise SamtuneError(f"data.cityscapes_classes: the published Vistas -> Cityscapes table covers the v1.2 labels only "
                           f"(66 labels; v2.0 splits and renames them), not data.version: {version}. Set data.version: v1.2 "
                           "(the v2.0 download holds the v1.2 labels too: {split}/v1.2/labels and config_v1.2.json).")  # fmt: skip
    train_ids = {name: train_id for train_id, name in CLASS_NAMES.items()}
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for value, name in enumerate(classes.label_names):
        if name in VISTAS_TO_CITYSCAPES:
            lut[value] = train_ids[VISTAS_TO_CITYSCAPES[name]]
    if (lut == IGNORE_INDEX).all():  # a few names missing is fine; none at all is another label set
        raise SamtuneError(f"{classes.path}: none of its {len(classes.label_names)} label names is one of the "
                           f"{len(VISTAS_TO_CITYSCAPES)} Mapillary Vistas v1.2 names that data.cityscapes_classes maps "
                           "(e.g. construction--flat--road, object--vehicle--car): not a Vistas v1.2 config. Point data.root "
                           "at the Vistas folder holding the official config_v1.2.json (config.json in the v1.x download), "
                           "or set data.cityscapes_classes: false.")  # fmt: skip
    return lut


def read_vistas_label(path: Path, stem: str) -> np.ndarray:
    """H×W uint8 label values of a palette (or grey) PNG; PIL keeps palette indices, not colours."""
    try:
        with Image.open(path) as img:
            mode, values = img.mode, np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadCase(stem, path, f"not a readable label PNG, truncated or corrupt ({exc})", "re-download or re-extract it") from None
    if mode not in ("P", "L") or values.dtype != np.uint8:
        raise BadCase(stem, path, f"a {mode} label PNG (shape {values.shape}); Mapillary Vistas labels are 8-bit palette PNGs of label values",
                      _LABEL_FIX)  # fmt: skip
    return values


class MapillarySource(SliceSource):
    """Image/label pairs of one split; labels as label values, the non-evaluated ones 255 (with
    ``cityscapes_classes``: as Cityscapes trainIds, the labels the table does not list 255)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str, on_bad_case: str = "error", version: str = "v2.0",
                 classes: VistasClasses | None = None, cityscapes_classes: bool = False):
        self.root, self.version, self.cityscapes_classes = Path(root), version, cityscapes_classes
        self.classes = classes or read_classes(root, version)
        self.lut = cityscapes_lut(self.classes, version) if cityscapes_classes else self.classes.lut  # label value -> class id
        image_dir = self.root / split / "images"
        label_dir = self.root / split / version / "labels"
        if version == "v1.2" and not label_dir.is_dir() and (self.root / split / "labels").is_dir():
            label_dir = self.root / split / "labels"  # the v1.x download
        if not image_dir.is_dir() or not label_dir.is_dir():
            missing = image_dir if not image_dir.is_dir() else label_dir
            raise SamtuneError(f"{missing}: no such folder. data.root must be the Mapillary Vistas folder as it unzips: "
                               f"{LAYOUT} (split {split!r}, version {version!r}).")  # fmt: skip
        found = sorted(p for p in image_dir.glob("*.jpg") if not p.name.startswith("._"))
        if not found:
            raise SamtuneError(f"{image_dir}: no *.jpg images; expected {LAYOUT}.")
        self.images: list[Path] = []
        self.labels: list[Path] = []
        self.counts: list[dict[int, int]] = []  # per image: class id -> pixels (255 not counted)
        self.skipped: list[dict] = []
        pairs = [(image, label_dir / f"{image.stem}.png") for image in found]
        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, os.cpu_count() or 1)) as pool:
            results = pool.map(self._check, pairs)
            try:
                for (image, label), result in zip(pairs, results):
                    if isinstance(result, BadCase):
                        handle_bad(result, on_bad_case, self.skipped)
                        continue
                    self.images.append(image)
                    self.labels.append(label)
                    self.counts.append(result)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # error mode: stop reading labels now
        self.class_names = dict(CLASS_NAMES if cityscapes_classes else self.classes.names)

    def _check(self, pair: tuple[Path, Path]) -> dict[int, int] | BadCase:
        """Class id -> pixels of one label, or what is wrong with the pair (returned, not raised)."""
        image, label = pair
        try:
            if not label.is_file():
                raise BadCase(image.stem, image, f"its label file {label} is missing",
                              f"extract the labels of the same split beside images/ ({LAYOUT}), or remove the image")  # fmt: skip
            TrainIdSource._check_sizes(image, label, image.stem)
            counts = np.bincount(read_vistas_label(label, image.stem).ravel(), minlength=256)
        except BadCase as bad:
            return bad
        present = np.flatnonzero(counts).tolist()
        unknown = [v for v in present if v >= self.classes.n_values]
        if unknown:
            return BadCase(image.stem, label, f"holds values {unknown[:10]} ({int(counts[unknown].sum())} px) outside the "
                           f"{self.classes.n_values} labels of {self.classes.path.name} (0..{self.classes.n_values - 1})",
                           f"check data.version (the labels may be of another version), or {_LABEL_FIX}")  # fmt: skip
        classes: dict[int, int] = {}
        for v in present:  # several labels may map to one class (with cityscapes_classes)
            c = int(self.lut[v])
            if c != IGNORE_INDEX:
                classes[c] = classes.get(c, 0) + int(counts[v])
        return dict(sorted(classes.items()))

    def __len__(self) -> int:
        return len(self.images)

    def item_id(self, index: int) -> str:
        return self.images[index].stem

    def label_space(self, class_ids: list[int]) -> LabelSpace:
        """No background class (ignored labels are 255); prediction files hold label values (with
        ``cityscapes_classes``: Cityscapes labelIds, as for the Cityscapes sources)."""
        if self.cityscapes_classes:
            return cityscapes_label_space(class_ids)
        background = self.classes.unlabeled if self.classes.unlabeled is not None else IGNORE_INDEX
        return LabelSpace(list(class_ids), [self.class_names[i] for i in class_ids], IGNORE_INDEX, list(class_ids), background)

    def slice_classes(self, index: int) -> dict[int, int]:
        """Class id -> pixels, counted when the source was built (the label is not read again)."""
        return dict(self.counts[index])

    def load_label(self, index: int) -> np.ndarray:
        return cv2.LUT(read_vistas_label(self.labels[index], self.item_id(index)), self.lut)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = read_png_rgb(self.images[index]), self.load_label(index)  # read_png_rgb decodes JPEG too
        if image.shape[:2] != label.shape:
            raise SamtuneError(f"{self.images[index]}: image is {image.shape[1]}×{image.shape[0]} but its label "
                               f"{self.labels[index]} is {label.shape[1]}×{label.shape[0]}; they must match.")  # fmt: skip
        return image, label


class MapillaryData(DataSectionBase, DemoKeys):
    """``data:`` for ``kind: mapillary``."""

    kind: Literal["mapillary"] = Field(description="`mapillary`: Mapillary Vistas, {split}/images/ + {split}/{version}/labels/ with the dataset's config_{version}.json")
    version: Literal["v1.2", "v2.0"] = Field("v2.0", description="label version: `v2.0` (124 labels) or `v1.2` (66 labels); classes come from the dataset's config_{version}.json")
    train_split: str = Field("training", description="split used for training")
    val_split: str = Field("validation", description="split used for validation")
    cityscapes_classes: bool = Field(False, description="map the Vistas labels by name to the 19 Cityscapes trainIds (the Vistas v1.2 -> Cityscapes table of Vistas-NP; labels it does not list ignored), so Cityscapes, BDD100K and ACDC checkpoints and scores share one class space; needs `version: v1.2`")

    def scored_subset(self) -> dict:
        if self.cityscapes_classes:
            return {"split": self.val_split, "version": self.version, "class_space": MAPPED_CLASS_SPACE}
        return {"split": self.val_split, "version": self.version,
                "class_space": f"Mapillary Vistas config_{self.version}.json labels with evaluate: true, the others 255 ignored"}  # fmt: skip


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.driving_demo import generate_mapillary

    return generate_mapillary(folder / "mapillary", seed=seed)


@register_format(MapillaryData, make_demo=_make_demo)
def open_mapillary(section: MapillaryData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """The official splits as they are (training/validation; testing has no public labels)."""
    classes = read_classes(section.root, section.version)
    train = MapillarySource(section.root, section.train_split, on_bad_case, section.version, classes, section.cityscapes_classes)
    val = MapillarySource(section.root, section.val_split, on_bad_case, section.version, classes, section.cityscapes_classes)
    return DataSplit(train, val, "mapillary", train.skipped + val.skipped)


@register_images(MapillaryData)
def open_mapillary_images(section: MapillaryData, paths: list):
    """Vistas JPEGs without labels (e.g. testing/images): files or a folder."""
    from samtune.datasets.folder2d import ImageFilesSource

    classes = read_classes(section.root, section.version)
    if section.cityscapes_classes:
        cityscapes_lut(classes, section.version)  # refuses v2.0 and a config the table does not fit
        return ImageFilesSource(paths, CLASS_NAMES, (".jpg",), "*")
    return ImageFilesSource(paths, classes.names, (".jpg",), "*")
