"""The studies folder ``samtune serve`` keeps its images and labels in: MONAI Label's datastore,
laid out as an nnU-Net v2 dataset so that corrected labels are training data as they are.

Layout (``data.kind: nifti`` reads it unchanged; images without a label are left out of training):

    STUDIES/dataset.json              {"labels": {"background": 0, "liver": 1, ...}, "channel_names": {"0": "CT"},
                                       "file_ending": ".nii.gz"} (written from the checkpoint's classes when missing)
    STUDIES/imagesTr/{id}_0000.nii.gz the images (uploads land here)
    STUDIES/labelsTr/{id}.nii.gz      the ``final`` labels (class values of dataset.json)
    STUDIES/.samtune/labels/{tag}/{id}.nii.gz   labels of other tags (e.g. ``original``)
    STUDIES/.samtune/info.json        per image: label infos and what MONAI Label records (strategy, ...)

A folder with plain ``images/`` + ``labels/`` NIfTI files is served as it is (``final`` = ``labels/``).

Safety: an image id is a plain name (letters, digits, ``._-``; no separators, no ``..``), and every
path is resolved (symlinks followed) and checked to lie inside the studies folder before it is
touched. Files are written to a temporary name in the target folder and renamed into place, so an
interrupted upload leaves nothing half-written.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samtune.files import write_json_atomic
from samtune.finetune.serve.dicom_studies import DicomStudies
from samtune.finetune.serve.errors import BadRequest, NotFound
from samtune.finetune.serve.paths import ID_PATTERN, check_id, inside, temp_in, write_atomic

FINAL = "final"  # MONAI Label's tag of a finished label; an upload without a tag is final
NIFTI_ENDING = ".nii.gz"


@dataclass(frozen=True)
class Layout:
    images: str  # folder of images, relative to the root
    labels: str  # folder of final labels
    image_suffix: str  # after the id: "_0000.nii.gz" (nnU-Net v2) or ".nii.gz"


NNUNET = Layout("imagesTr", "labelsTr", "_0000" + NIFTI_ENDING)
FOLDERS = Layout("images", "labels", NIFTI_ENDING)


class Studies:
    """MONAI Label's datastore over one studies folder (one server, requests serialised by a lock)."""

    def __init__(self, root: Path, classes: dict[int, str], modality: str = "CT"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.classes = dict(classes)  # label value -> name (the checkpoint's)
        self._lock = threading.RLock()
        self.meta_dir = self.root / ".samtune"
        if (self.root / "images").is_dir() and not (self.root / "dataset.json").is_file():
            self.layout = FOLDERS
        else:
            self.layout = NNUNET
            if not (self.root / "dataset.json").is_file():
                meta = {"name": self.root.name, "labels": {"background": 0, **{n: v for v, n in sorted(self.classes.items())}},
                        "channel_names": {"0": modality}, "file_ending": NIFTI_ENDING, "numTraining": 0}  # fmt: skip
                write_json_atomic(self.root / "dataset.json", meta)
        for folder in (self.layout.images, self.layout.labels):
            (self.root / folder).mkdir(exist_ok=True)
        self.dicom = DicomStudies(self.root, self.meta_dir)
        self.seg_classes: list | None = None  # LabelClass list for DICOM-SEG labels (set by the server)
        self.checkpoint = ""

    # --- paths ---
    def image_path(self, image_id: str) -> Path:
        check_id(image_id, "image")
        path = self.root / self.layout.images / f"{image_id}{self.layout.image_suffix}"
        return inside(self.root, path, "image")

    def is_dicom(self, image_id: str) -> bool:
        return not self.image_path(image_id).is_file() and self.dicom.has(image_id)

    def label_path(self, image_id: str, tag: str = FINAL) -> Path:
        check_id(image_id, "image")
        check_id(tag, "tag")
        nnunet_final = tag == FINAL and not self.is_dicom(image_id)  # a DICOM series' final label is its SEG (+ a NIfTI copy)
        folder = self.root / self.layout.labels if nnunet_final else self.meta_dir / "labels" / tag
        return inside(self.root, folder / f"{image_id}{NIFTI_ENDING}", "label")

    def existing_image(self, image_id: str) -> Path:
        path = self.image_path(image_id)
        if path.is_file():
            return path
        if self.dicom.has(image_id):
            return self.dicom.image_path(image_id)
        raise NotFound("image", f"no image {image_id!r} in the studies folder (GET /datastore/?output=all lists them)")

    def has_final(self, image_id: str) -> bool:
        return self.label_path(image_id).is_file() or (self.is_dicom(image_id) and self.dicom.labelled(image_id))

    # --- listing ---
    def ids(self) -> list[str]:
        folder = self.root / self.layout.images
        suffix = self.layout.image_suffix
        out = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.name.endswith(suffix) or not p.is_file():
                continue
            image_id = p.name[: -len(suffix)]
            if ID_PATTERN.match(image_id) and p.resolve().is_relative_to(self.root.resolve()):  # a symlink out is not served
                out.append(image_id)
        return out + [uid for uid in self.dicom.ids() if uid not in out]

    def tags(self, image_id: str) -> list[str]:
        tags = [FINAL] if self.has_final(image_id) else []
        other = self.meta_dir / "labels"
        if other.is_dir():
            tags += sorted(t.name for t in other.iterdir() if t.name != FINAL and (t / f"{image_id}{NIFTI_ENDING}").is_file())
        return tags

    def labelled(self) -> list[str]:
        return [i for i in self.ids() if self.has_final(i)]

    def unlabelled(self) -> list[str]:
        return [i for i in self.ids() if not self.has_final(i)]

    def json(self) -> dict:
        """``GET /datastore/?output=all``: MONAI Label's local datastore model."""
        info = self._info()
        objects = {}
        for image_id in self.ids():
            entry = info.get(image_id, {})
            labels = {t: {"ext": NIFTI_ENDING, "info": entry.get("labels", {}).get(t, {})} for t in self.tags(image_id)}
            objects[image_id] = {"image": {"ext": NIFTI_ENDING, "info": entry.get("image", {})}, "labels": labels}
        return {"name": self.root.name, "description": "samtune studies folder", "images_dir": self.layout.images,
                "labels_dir": self.layout.labels, "objects": objects}  # fmt: skip

    def status(self) -> dict:
        """``GET /datastore/``: counts."""
        tags: dict[str, int] = {}
        ids = self.ids()
        for image_id in ids:
            for t in self.tags(image_id):
                tags[t] = tags.get(t, 0) + 1
        return {"total": len(ids), "completed": tags.get(FINAL, 0), "label_tags": tags}

    def datalist(self) -> list[dict]:
        """``GET /datastore/?output=train``: image/label pairs of the final labels."""
        return [{"image": str(self.existing_image(i)), "label": str(self.label_path(i))} for i in self.labelled() if self.label_path(i).is_file()]

    # --- writing ---
    def add_image(self, image_id: str, upload: Path) -> Path:
        """Store a checked upload (a temporary file in the studies folder) as image ``image_id``."""
        target = self.image_path(image_id)
        with self._lock:
            write_atomic(upload, target)
            self.update_info(image_id, "image", {"ts": int(time.time())})
        return target

    def save_label(self, image_id: str, tag: str, upload: Path, label_names: dict[str, int] | None) -> Path:
        """Store a label upload (checked against the image, values mapped to dataset.json's class
        values by ``label_names`` {segment name: value in the file}) under ``tag``."""
        import nibabel as nib

        image_path = self.existing_image(image_id)
        target = self.label_path(image_id, tag)
        label = nib.load(str(upload))
        image = nib.load(str(image_path))
        if label.shape[:3] != image.shape[:3]:
            raise BadRequest("label", f"shape {label.shape} differs from image {image_id!r}'s {image.shape[:3]}; upload the label on the image's grid")
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise BadRequest("label", f"its affine differs from image {image_id!r}'s; upload the label on the image's grid")
        values = np.asarray(label.dataobj)
        mapped = self._map_values(values, label_names)
        out = nib.Nifti1Image(mapped, image.affine, image.header)
        out.set_data_dtype(np.uint8)
        tmp = temp_in(target.parent, NIFTI_ENDING)
        nib.save(out, str(tmp))
        with self._lock:
            write_atomic(tmp, target)
            if tag == FINAL and self.is_dicom(image_id):
                self.dicom.save_seg(image_id, mapped, self.seg_classes or [], self.checkpoint)
            self.update_info(image_id, "labels", {tag: {"ts": int(time.time()), "label_names": self.names_by_value()}})
        return target

    def names_by_value(self) -> dict[str, int]:
        return {n: v for v, n in sorted(self.classes.items())}

    def _map_values(self, values: np.ndarray, label_names: dict[str, int] | None) -> np.ndarray:
        """File values -> this folder's class values; unknown names or values are a 400."""
        if values.ndim != 3 or not np.issubdtype(values.dtype, np.integer) and not np.all(np.mod(values, 1) == 0):
            raise BadRequest("label", f"a label volume holds 3D integer class values, got {values.ndim}D {values.dtype}")
        values = values.astype(np.int64)
        known = self.names_by_value()
        if label_names is None:
            lut = {v: v for v in known.values()}
        else:
            unknown = sorted(n for n in label_names if n not in known)
            if unknown:
                raise BadRequest("params.label_info", f"segments {unknown} are not classes of this checkpoint ({sorted(known)}); rename or remove them")
            lut = {int(v): known[n] for n, v in label_names.items()}
        present = set(np.unique(values).tolist()) - {0}
        stray = sorted(present - set(lut))
        if stray:
            raise BadRequest("label", f"values {stray[:10]} have no class (label_info maps {sorted(lut)}); name every segment in label_info")
        table = np.zeros(max(present | {0}) + 1, np.uint8)
        for v, c in lut.items():
            if v < len(table):
                table[v] = c
        return table[values]

    # --- per-image info (what MONAI Label keeps beside each image) ---
    def _info(self) -> dict:
        path = self.meta_dir / "info.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}  # a damaged info file loses only timestamps and strategy records

    def update_info(self, image_id: str, part: str, values: dict) -> None:
        with self._lock:
            info = self._info()
            entry = info.setdefault(image_id, {}).setdefault(part, {})
            entry.update(values)
            write_json_atomic(self.meta_dir / "info.json", info)

