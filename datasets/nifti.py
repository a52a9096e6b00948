"""NIfTI volumes as users have them: nnU-Net v2 raw datasets, Medical Segmentation Decathlon tasks,
and plain ``images/`` + ``labels/`` folders; served as axial slices from the preprocessing cache.

Layouts (``data.root``):
- nnU-Net v2: ``dataset.json`` (``labels`` name -> int, ``file_ending``), ``imagesTr/{case}_{channel:04d}``
  (one file per channel; ``data.channel`` picks the channel), ``labelsTr/{case}``;
- MSD: ``dataset.json`` (``labels`` int -> name, ``training`` list), images possibly 4D with
  the modalities on the 4th axis (``data.channel`` picks one);
- plain folders: ``images/`` (or ``imagesTr/``) and ``labels/`` (or ``labelsTr/``), matched by
  case name (``{case}.nii.gz`` or ``{case}_0000.nii.gz`` for the image); class names from
  ``data.class_names`` or ``class_<k>`` for each label value found.

Slices are canonical (RAS+) axial planes, intensities mapped to 0-255 (see ``volume.py``); each
slice is an RGB image: the slice repeated, or with ``context_slices`` = k the slices z-k, z, z+k
(clamped at the ends) as the three channels (2.5D).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from samtune import SamtuneError
from samtune.datasets.cache import VolumeSettings, prepare_cases
from samtune.datasets.checks import BadCase, handle_bad, list_data_files
from samtune.datasets.splits import split_by_fraction
from samtune.datasets.volume import IGNORE_INDEX, read_case, scale_to_0_255

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path
    channel: int = 0  # index on the 4th axis when the image is 4D (MSD multi-modal)


@dataclass
class NiftiDataset:
    """What a dataset folder holds: its cases, classes (label value -> name, None = from the labels)."""

    root: Path
    layout: str  # "nnunet_v2" | "msd" | "folders"
    cases: list[Case]
    classes: dict[int, str] | None
    channel_names: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # files ignored
    skipped: list[dict] = field(default_factory=list)  # bad cases found while listing (skip mode)


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SamtuneError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise SamtuneError(f"{path}: no 'labels' mapping (nnU-Net v2: name -> int; MSD: \"1\" -> name).")
    return meta


def _check_channel(channel: int, names: dict[int, str], where: Path) -> None:
    if names and channel not in names:
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(names.items()))
        raise SamtuneError(f"data.channel={channel}: {where} has channels {listed}; choose one of them.")


def _nnunet(root: Path, meta: dict, channel: int, ds: NiftiDataset, on_bad: str) -> None:
    ending = meta.get("file_ending", ".nii.gz")
    classes = {}
    for name, value in meta["labels"].items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SamtuneError(
                f"{root / 'dataset.json'}: label {name!r} has value {value!r}; samtune reads integer labels "
                "(nnU-Net region-based labels are not supported)."
            )
        if value != 0:
            classes[value] = name
    ds.classes = classes
    ds.channel_names = {int(k): str(v) for k, v in (meta.get("channel_names") or meta.get("modality") or {}).items()}
    _check_channel(channel, ds.channel_names, root / "dataset.json")
    if not (root / "imagesTr").is_dir():
        raise SamtuneError(f"{root / 'imagesTr'}: no such folder; an nnU-Net v2 dataset keeps its training images there.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    images, bad = list_data_files(root / "imagesTr", (ending.lower(),), "NIfTI image", ds.notes)
    for path in images:
        if not pattern.match(path.name):
            bad.append(BadCase(None, path, f"not named {{case}}_0000{ending} (a 4-digit channel number after the case name)", "rename it or move it out of imagesTr/"))
    for b in bad:
        handle_bad(b, on_bad, ds.skipped)
    names = sorted({m.group(1) for m in map(pattern.match, (p.name for p in images)) if m})
    for name in names:
        image = root / "imagesTr" / f"{name}_{channel:04d}{ending}"
        label = root / "labelsTr" / f"{name}{ending}"
        problem = next((p for p in (image, label) if not p.is_file()), None)
        if problem is not None:
            handle_bad(BadCase(name, problem, "the file is missing", "every image needs its label file (and each channel file)"), on_bad, ds.skipped)
            continue
        ds.cases.append(Case(name, image, label))
    if (root / "labelsTr").is_dir():
        labels, bad = list_data_files(root / "labelsTr", (ending.lower(),), "NIfTI label", ds.notes)
        for b in bad:
            handle_bad(b, on_bad, ds.skipped)
        named = set(names)
        ds.notes.extend(f"{p}: ignored (a label without an image)" for p in labels if p.name[: -len(ending)] not in named)


def _msd(root: Path, meta: dict, channel: int, ds: NiftiDataset, on_bad: str) -> None:
    try:
        ds.classes = {int(k): str(v) for k, v in meta["labels"].items() if int(k) != 0}
    except ValueError:
        raise SamtuneError(f"{root / 'dataset.json'}: MSD 'labels' keys must be integers as strings (\"1\": \"liver\").") from None
    ds.channel_names = {int(k): str(v) for k, v in (meta.get("modality") or {}).items()}
    _check_channel(channel, ds.channel_names, root / "dataset.json")
    for folder in ("imagesTr", "labelsTr"):  # the list is authoritative: other files only get notes
        if (root / folder).is_dir():
            ds.notes.extend(f"{p}: ignored (macOS resource fork)" for p in sorted((root / folder).glob("._*")))
    for entry in meta["training"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            raise SamtuneError(f"{root / 'dataset.json'}: each 'training' entry must be {{\"image\": path, \"label\": path}}, got {entry!r}.")
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        name = _strip_suffix(image.name)
        problem = next((p for p in (image, label) if not p.is_file()), None)
        if problem is not None:
            handle_bad(BadCase(name, problem, "the file is missing", "every image needs its label file; fix dataset.json's training list"), on_bad, ds.skipped)
            continue
        ds.cases.append(Case(name, image, label, channel))


def _folders(root: Path, image_dir: Path, label_dir: Path, channel: int, ds: NiftiDataset, on_bad: str) -> None:
    images, bad = list_data_files(image_dir, NIFTI_SUFFIXES, "NIfTI image", ds.notes)
    labels, bad_labels = list_data_files(label_dir, NIFTI_SUFFIXES, "NIfTI label", ds.notes)
    for b in bad + bad_labels:
        handle_bad(b, on_bad, ds.skipped)
    label_by_name = {_strip_suffix(p.name): p for p in labels}
    used = set()
    for path in images:
        stem = _strip_suffix(path.name)
        m = re.match(r"^(.+)_(\d{4})$", stem)
        if stem in label_by_name:
            name, index = stem, channel  # one file per case, possibly 4D
        elif m and m.group(1) in label_by_name:  # nnU-Net-style channel files
            if int(m.group(2)) != channel:
                continue
            name, index = m.group(1), 0
        else:
            handle_bad(BadCase(stem, path, f"no label file {label_dir.name}/{stem}.nii.gz for this image", "add the label or move the image out"), on_bad, ds.skipped)
            continue
        used.add(name)
        ds.cases.append(Case(name, path, label_by_name[name], index))
    ds.notes.extend(f"{p}: ignored (a label without an image)" for n, p in sorted(label_by_name.items()) if n not in used)


def discover_dataset(
    root: str | Path, channel: int = 0, class_names: dict[int, str] | None = None, on_bad_case: str = "error"
) -> NiftiDataset:
    """Recognise the layout of ``root`` and list its cases; bad files raise or (skip) are recorded."""
    root = Path(root)
    ds = NiftiDataset(root, "", [], None)
    meta_path = root / "dataset.json"
    pairs = [(root / a, root / b) for a, b in (("imagesTr", "labelsTr"), ("images", "labels"))]
    plain = next(((i, l) for i, l in pairs if i.is_dir() and l.is_dir()), None)
    if meta_path.is_file():
        meta = _read_meta(meta_path)
        if "training" in meta:
            ds.layout = "msd"
            _msd(root, meta, channel, ds, on_bad_case)
        else:
            ds.layout = "nnunet_v2"
            _nnunet(root, meta, channel, ds, on_bad_case)
    elif plain is not None:
        ds.layout = "folders"
        _folders(root, *plain, channel, ds, on_bad_case)
    else:
        raise SamtuneError(
            f"{meta_path}: missing, and no images/ + labels/ folders. data.root must be an nnU-Net v2 dataset "
            "(Dataset001_Name/), an MSD task (TaskXX_Name/) folder holding dataset.json, imagesTr/ and labelsTr/, "
            "or a folder with images/ and labels/ NIfTI files matched by case name."
        )
    if class_names:
        bad = [k for k in class_names if not 0 < int(k) < IGNORE_INDEX]
        if bad:
            raise SamtuneError(f"data.class_names: label values {bad} must be 1..254 (0 is background, 255 ignored).")
        ds.classes = {int(k): str(v) for k, v in class_names.items()}
    if ds.classes is not None:
        bad = [k for k in ds.classes if not 0 < k < IGNORE_INDEX]
        if bad:
            raise SamtuneError(f"{meta_path}: label values {bad} are outside 1..254, which samtune stores as uint8 (255 = ignored).")
    if not ds.cases and not ds.skipped:
        raise SamtuneError(f"{root}: dataset found ({ds.layout}) but no training cases in it.")
    return ds


def read_dataset(root: str | Path) -> tuple[list[Case], dict[int, str]]:
    """Cases and foreground classes (label value -> name) of a dataset folder (errors on bad files)."""
    ds = discover_dataset(root)
    return ds.cases, ds.classes


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Patient-level split: a seeded shuffle, at least one case on each side."""
    return split_by_fraction(cases, val_fraction, seed, name=lambda c: c.name)


def load_case(case: Case, window_hu: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Canonical (RAS+) X×Y×Z image scaled to uint8 by the HU window, label as uint8, spacing in mm
    (no cache; what the cache stores, before the display layout)."""
    raw = read_case(case.name, case.image, case.label, case.channel)
    return np.round(scale_to_0_255(raw.image, window_hu)).astype(np.uint8), raw.label, raw.spacing_mm


class NiftiSliceSource:
    """Axial slices of the given cases, from the preprocessing cache (``cache_dir``) or, without
    one, preprocessed into memory. ``empty_slice_ratio``: slices without any ``foreground`` class
    kept per foreground slice of each case (seeded); None keeps every slice."""

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        cases: list[Case],
        classes: dict[int, str] | None,
        intensity: str | tuple[float, float] = (-160.0, 240.0),
        *,
        spacing_mm: tuple[float, float] | None = None,
        cache_dir: str | Path | None = None,
        context_slices: int = 0,
        empty_slice_ratio: float | None = None,
        foreground: set[int] | None = None,
        seed: int = 0,
        on_bad_case: str = "error",
        progress: bool = False,
        desc: str = "preprocessing",
    ):
        settings = VolumeSettings(intensity, spacing_mm, tuple(sorted(classes)) if classes is not None else None)
        cache = Path(cache_dir) if cache_dir is not None else None
        self.cases, self.skipped = prepare_cases(cases, settings, cache, on_bad_case, progress, desc)
        if classes is None:  # plain folders without class names: every value found is a class
            found = sorted({int(v) for c in self.cases for v in c.meta["voxels"]})
            classes = {v: f"class_{v}" for v in found}
        self.class_names = dict(classes)
        self.context_slices = int(context_slices)
        self.spacing_mm = {c.name: tuple(c.meta["spacing_mm"]) for c in self.cases}
        wanted = {str(k) for k in (foreground if foreground is not None else self.class_names)}
        self.slices: list[tuple[int, int]] = []  # (case index, z)
        for ci, case in enumerate(self.cases):
            index = case.meta["slices"]
            full = [z for z, entry in enumerate(index) if wanted & entry.keys()]
            empty = [z for z, entry in enumerate(index) if not wanted & entry.keys()]
            if empty_slice_ratio is not None:
                n_keep = min(len(empty), int(round(empty_slice_ratio * len(full))))
                rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
                empty = sorted(rng.choice(empty, n_keep, replace=False).tolist()) if n_keep else []
            self.slices.extend((ci, z) for z in sorted(full + empty))

    def __len__(self) -> int:
        return len(self.slices)

    def item_id(self, index: int) -> str:
        ci, z = self.slices[index]
        return f"{self.cases[ci].name}/z{z:03d}"

    def slice_position(self, index: int) -> tuple[str, int]:
        """(case name, z) of a slice: lets evaluation put slice predictions back into volumes."""
        ci, z = self.slices[index]
        return self.cases[ci].name, z

    def case_volume(self, name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The whole Z×H×W label volume of a case (every slice, kept or not) and its voxel spacing
        in mm along (z, rows, columns) = (z, y, x) of the canonical scan."""
        case = next(c for c in self.cases if c.name == name)
        x, y, z = (float(v) for v in case.meta["spacing_mm"])
        return case.label, (z, y, x)

    def slice_classes(self, index: int) -> dict[int, int]:
        ci, z = self.slices[index]
        return {int(k): v[0] for k, v in self.cases[ci].meta["slices"][z].items()}

    def slice_components(self, index: int) -> dict[int, list[int]]:
        """Class id -> sizes (px) of its 8-connected components in this slice, largest first."""
        ci, z = self.slices[index]
        return {int(k): list(v[1]) for k, v in self.cases[ci].meta["slices"][z].items()}

    def load_label(self, index: int) -> np.ndarray:
        ci, z = self.slices[index]
        return np.array(self.cases[ci].label[z])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """H×W×3 uint8 RGB (slice repeated, or neighbours z-k, z, z+k) and the H×W uint8 label."""
        ci, z = self.slices[index]
        case = self.cases[ci]
        volume = case.image
        k = self.context_slices
        last = volume.shape[0] - 1
        # cv2.merge interleaves three planes ~20x faster than np.stack/np.repeat (hot path)
        image = cv2.merge([volume[max(z - k, 0)], volume[z], volume[min(z + k, last)]])
        return image, np.array(case.label[z])
