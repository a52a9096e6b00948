"""NIfTI volumes as users have them: nnU-Net v2 raw datasets and Medical Segmentation Decathlon tasks.

Volumes are reoriented to the closest canonical (RAS+) orientation and sliced axially; CT
intensities are clipped to a Hounsfield window and scaled to 0-255, each slice repeated to three
channels (MedSAM's convention). Cases are split into train/val at the patient level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from samtune import SamtuneError


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


def read_dataset(root: str | Path) -> tuple[list[Case], dict[int, str]]:
    """Cases and foreground classes (label value -> name) of an nnU-Net v2 or MSD dataset folder."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise SamtuneError(
            f"{meta_path}: missing. data.root must be an nnU-Net v2 dataset (DatasetXXX_Name/) or an "
            "MSD task (TaskXX_Name/) folder holding dataset.json, imagesTr/ and labelsTr/."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise SamtuneError(f"{meta_path}: not valid JSON ({exc}).") from None
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        raise SamtuneError(f"{meta_path}: no 'labels' mapping.")
    if "training" in meta:  # MSD: labels int-as-string -> name, explicit training list
        classes = {int(k): v for k, v in labels.items() if int(k) != 0}
        cases = []
        for entry in meta["training"]:
            image = (root / entry["image"]).resolve()
            cases.append(Case(image.name.split(".")[0], image, (root / entry["label"]).resolve()))
    else:  # nnU-Net v2: labels name -> int, files {case}_0000{file_ending}
        ending = meta.get("file_ending", ".nii.gz")
        classes = {}
        for name, value in labels.items():
            if not isinstance(value, int):
                raise SamtuneError(
                    f"{meta_path}: label {name!r} has value {value!r}; samtune reads integer labels "
                    "(nnU-Net region-based labels are not supported)."
                )
            if value != 0:
                classes[value] = name
        cases = []
        for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
            if image.name.startswith("._"):  # macOS resource forks
                continue
            name = image.name[: -len(f"_0000{ending}")]
            cases.append(Case(name, image, root / "labelsTr" / f"{name}{ending}"))
    if not cases:
        raise SamtuneError(f"{root}: dataset.json found but no training cases in imagesTr/.")
    for case in cases:
        for path in (case.image, case.label):
            if not path.is_file():
                raise SamtuneError(f"case {case.name}: {path} is missing; every image needs its label file.")
    return cases, classes


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Patient-level split: a seeded shuffle, at least one case on each side."""
    if len(cases) < 2:
        raise SamtuneError(f"need at least 2 cases to split into train and val, found {len(cases)}.")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c.name)
    train = sorted((cases[i] for i in order[n_val:]), key=lambda c: c.name)
    return train, val


def load_case(case: Case, window_hu: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Canonical (RAS+) image scaled to uint8 by the HU window, label as uint8, spacing in mm."""
    try:
        image_nii = nib.as_closest_canonical(nib.load(case.image))
        label_nii = nib.as_closest_canonical(nib.load(case.label))
        image = image_nii.get_fdata(dtype=np.float32)
        label = np.asarray(label_nii.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated or corrupt files
        raise SamtuneError(f"case {case.name}: cannot read {case.image} / {case.label}: {exc}") from None
    if image.ndim != 3 or label.shape != image.shape:
        raise SamtuneError(
            f"case {case.name}: image {case.image} has shape {image.shape} but label {case.label} has "
            f"shape {label.shape}; both must be the same 3D grid."
        )
    if not np.allclose(image_nii.affine, label_nii.affine, atol=1e-3):
        raise SamtuneError(f"case {case.name}: image and label affines differ; resample the label onto the image grid.")
    lo, hi = window_hu
    scaled = (np.clip(image, lo, hi) - lo) * (255.0 / (hi - lo))
    spacing = tuple(float(s) for s in image_nii.header.get_zooms()[:3])
    return np.round(scaled).astype(np.uint8), np.round(label).astype(np.uint8), spacing


class NiftiSliceSource:
    """Axial slices of the given cases, held in memory (volumes are read once)."""

    ignore_index = 255

    def __init__(self, cases: list[Case], classes: dict[int, str], window_hu: tuple[float, float]):
        self.class_names = dict(classes)
        self.slices: list[tuple[str, int]] = []
        self.volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.spacing_mm: dict[str, tuple[float, ...]] = {}
        for case in cases:
            image, label, spacing = load_case(case, window_hu)
            self.volumes[case.name] = (image, label)
            self.spacing_mm[case.name] = spacing
            self.slices.extend((case.name, z) for z in range(image.shape[2]))

    def __len__(self) -> int:
        return len(self.slices)

    def item_id(self, index: int) -> str:
        case, z = self.slices[index]
        return f"{case}/z{z:03d}"

    @staticmethod
    def _to_display(plane: np.ndarray) -> np.ndarray:
        # canonical x (R) × y (A) plane -> rows anterior-to-posterior, columns left-to-right
        return np.ascontiguousarray(plane.T[::-1])

    def load_label(self, index: int) -> np.ndarray:
        case, z = self.slices[index]
        return self._to_display(self.volumes[case][1][:, :, z])

    def slice_classes(self, index: int) -> dict[int, int]:
        ids, counts = np.unique(self.load_label(index), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        case, z = self.slices[index]
        image, label = self.volumes[case]
        plane = self._to_display(image[:, :, z])
        return np.repeat(plane[:, :, None], 3, axis=2), self._to_display(label[:, :, z])
