"""What a NIfTI dataset folder holds, as users have it: nnU-Net v2 raw datasets, Medical
Segmentation Decathlon tasks and plain ``images/`` + ``labels/`` folders (``discover_dataset``).

- nnU-Net v2: ``dataset.json`` (``labels`` name -> int, ``file_ending``), ``imagesTr/{case}_{channel:04d}``
  (one file per channel; ``data.channel`` picks the channel), ``labelsTr/{case}``;
- MSD: ``dataset.json`` (``labels`` int -> name, ``training`` list), images possibly 4D with
  the modalities on the 4th axis (``data.channel`` picks one);
- plain folders: ``images/`` (or ``imagesTr/``) and ``labels/`` (or ``labelsTr/``), matched by
  case name; class names from ``data.class_names`` or ``class_<k>`` for each label value found.

An image without its label (nnU-Net v2 and plain folders) is an image still to be labelled, as in a
``samtune serve`` studies folder: it is left out of training with a note, not refused.

Bad files raise, or with ``data.on_bad_case: skip`` are recorded; suspicious layouts are warned about.
"""


from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path


from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import BadCase, handle_bad, list_data_files
from samtune.datasets.splits import split_by_fraction

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path | None  # None: a scan without labels, opened for prediction
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
    warnings: list[str] = field(default_factory=list)  # legal but suspicious (no dataset.json, v1 labels, ...)


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


def _nnunet_classes(labels: dict, path: Path, ds: NiftiDataset) -> dict[int, str]:
    """Foreground classes (value -> name) of an nnU-Net v2 ``labels`` map (name -> int). An MSD /
    nnU-Net v1 map (``"1": "liver"``, value -> name) is read as such, with a warning."""
    if labels and all(re.fullmatch(r"\d+", str(k)) for k in labels) and all(isinstance(v, str) for v in labels.values()):
        example = ", ".join(f'"{k}": "{v}"' for k, v in list(labels.items())[:2])
        v2 = ", ".join(f'"{v}": {int(k)}' for k, v in list(labels.items())[:2])
        ds.warnings.append(
            f"{path}: 'labels' maps label values to names ({{{example}}}), the MSD / nnU-Net v1 style, but there is no "
            "'training' list, so the folder is read as nnU-Net v2 (imagesTr/{case}_0000, labelsTr/); samtune reads the "
            f"map as value -> name. nnU-Net v2 itself expects names -> values: write {{{v2}, ...}} to use this "
            "dataset.json with nnU-Net"
        )  # fmt: skip
        return {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    classes = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SamtuneError(
                f"{path}: label {name!r} has value {value!r}: a region (a list of label values, nnU-Net's region-based "
                "training) is not supported; samtune trains one class per label value. Give each class a single "
                'integer value, e.g. {"background": 0, "liver": 1}.'
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise SamtuneError(
                f"{path}: label {name!r} has value {value!r}; nnU-Net v2 'labels' map each class name to an integer "
                'label value, e.g. {"background": 0, "liver": 1} (MSD / nnU-Net v1 map values to names: '
                '{"0": "background", "1": "liver"}). Write the values as integers.'
            )
        if value != 0:
            classes[value] = name
    return classes


def _channels_in_file(path: Path) -> int:
    """Channels on the 4th axis of a NIfTI image, from its header (1 for 3D; 0 when unreadable)."""
    import nibabel as nib  # only here: this module is imported with the recipe schema

    try:
        shape = nib.load(str(path)).shape
    except Exception:  # unreadable files are reported when the case is read
        return 0
    shape = tuple(shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    return int(shape[3]) if len(shape) == 4 else 1


def _nnunet(root: Path, meta: dict, channel: int, ds: NiftiDataset, on_bad: str) -> None:
    ending = meta.get("file_ending", ".nii.gz")
    ds.classes = _nnunet_classes(meta["labels"], root / "dataset.json", ds)
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
        index = 0
        first = root / "imagesTr" / f"{name}_0000{ending}"
        if channel > 0 and not image.is_file() and first.is_file() and _channels_in_file(first) > 1:
            image, index = first, channel  # all channels in one 4D file: data.channel indexes its 4th axis
        if image.is_file() and not label.is_file():
            ds.notes.append(f"{image}: left out (no label {label.relative_to(root)} yet: an image still to be labelled)")
            continue
        if not image.is_file():
            handle_bad(BadCase(name, image, "the file is missing", "every case needs each channel file"), on_bad, ds.skipped)
            continue
        ds.cases.append(Case(name, image, label, index))
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
        else:  # an image still to be labelled (e.g. in a `samtune serve` studies folder): not a training case
            ds.notes.append(f"{path}: left out (no label {label_dir.name}/{stem}.nii.gz yet: an image still to be labelled)")
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
        if not class_names and _looks_like_nnunet(plain[0], ds):
            ds.warnings.append(
                f"{meta_path}: missing, but {root.name}/ looks like an nnU-Net dataset ({plain[0].name}/{{case}}_0000.nii.gz "
                f"with {plain[1].name}/); it is read as plain image/label folders and its classes are named class_<k> "
                'after the label values found. Add dataset.json with "labels" (nnU-Net v2: {"background": 0, '
                '"liver": 1, ...}), or set data.class_names (e.g. {1: liver})'
            )  # fmt: skip
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


def _looks_like_nnunet(image_dir: Path, ds: NiftiDataset) -> bool:
    """imagesTr/ (nnU-Net's folder name) or images named ``{case}_0000.nii.gz`` (channel files)."""
    return image_dir.name == "imagesTr" or any(re.search(r"_\d{4}\.nii(\.gz)?$", c.image.name) for c in ds.cases)


def read_dataset(root: str | Path) -> tuple[list[Case], dict[int, str]]:
    """Cases and foreground classes (label value -> name) of a dataset folder (errors on bad files)."""
    ds = discover_dataset(root)
    return ds.cases, ds.classes


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Patient-level split: a seeded shuffle, at least one case on each side."""
    return split_by_fraction(cases, val_fraction, seed, name=lambda c: c.name)
