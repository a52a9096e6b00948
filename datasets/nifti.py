"""NIfTI volumes as users have them: nnU-Net v2 raw datasets, Medical Segmentation Decathlon tasks,
and plain ``images/`` + ``labels/`` folders; served as axial slices from the preprocessing cache.

Layouts are recognised by ``nifti_layouts.py`` (nnU-Net v2, MSD, plain images/ + labels/ folders);
this module declares the ``data.kind: nifti`` recipe section and serves the cases' slices.

Slices are canonical (RAS+) axial planes, intensities mapped to 0-255 (see ``volume.py``); each
slice is one grey plane, or with ``context_slices`` = k the slices z-k, z, z+k (clamped at the
ends) as the three channels of an RGB image (2.5D).
"""

from __future__ import annotations

import copy

import logging
import re
import zlib
from pathlib import Path
from typing import Literal, Optional

import cv2
import numpy as np
from pydantic import Field, model_validator

from samtune import SamtuneError
from samtune.constants import DEFAULT_WINDOW_HU, INTENSITY_PRESETS, MR_PERCENTILE
from samtune.datasets.cache import VolumeSettings, default_cache_dir, prepare_cases
from samtune.datasets.checks import list_input_files
from samtune.datasets.nifti_layouts import (  # noqa: F401  (re-exported: the NIfTI format's public names)
    NIFTI_SUFFIXES, Case, NiftiDataset, _channels_in_file, _strip_suffix, discover_dataset, read_dataset, split_cases,
)  # fmt: skip
from samtune.datasets.formats import CaseSplitKeys, DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit, SliceSource
from samtune.datasets.splits import choose_split, split_by_fraction, unify_class_names
from samtune.datasets.volume import read_case, scale_to_0_255
from samtune.schema import Section
from samtune.suggest import did_you_mean

log = logging.getLogger(__name__)


def load_case(case: Case, window_hu: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Canonical (RAS+) X×Y×Z image scaled to uint8 by the HU window, label as uint8, spacing in mm
    (no cache; what the cache stores, before the display layout)."""
    raw = read_case(case.name, case.image, case.label, case.channel)
    return np.round(scale_to_0_255(raw.image, window_hu)).astype(np.uint8), raw.label, raw.spacing_mm


class NiftiSliceSource(SliceSource):
    """Axial slices of the given cases, from the preprocessing cache (``cache_dir``) or, without
    one, preprocessed into memory. ``empty_slice_ratio``: slices without any ``foreground`` class
    kept per foreground slice of each case (seeded); None keeps every slice."""

    volumetric = True

    def __init__(
        self,
        cases: list[Case],
        classes: dict[int, str] | None,
        intensity: str | tuple[float, float] = DEFAULT_WINDOW_HU,
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
        self.has_labels = all(c.label is not None for c in cases)
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

    def every_slice(self) -> "NiftiSliceSource":
        if len(self.slices) == sum(len(c.label) for c in self.cases):
            return self
        view = copy.copy(self)
        view.slices = [(ci, z) for ci, case in enumerate(self.cases) for z in range(len(case.label))]
        return view

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
        """The H×W uint8 grey slice (or, with ``context_slices`` k, the H×W×3 neighbours z-k, z,
        z+k as RGB) and the H×W uint8 label. A grey slice stays one plane: the model family's
        preprocessing repeats it into three channels after resizing, a third of the work."""
        ci, z = self.slices[index]
        case = self.cases[ci]
        volume = case.image
        k = self.context_slices
        if k == 0:
            return np.array(volume[z]), np.array(case.label[z])
        last = volume.shape[0] - 1
        # cv2.merge interleaves three planes ~20x faster than np.stack/np.repeat (hot path)
        image = cv2.merge([volume[max(z - k, 0)], volume[z], volume[min(z + k, last)]])
        return image, np.array(case.label[z])


class VolumeKeys(Section):
    """Keys of the volume formats (``nifti``, ``dicom``): intensities, slices, the slice cache."""

    intensity: str | tuple[float, float] | None = Field(None, description="intensity to 0-255: `ct_abdomen` [-160, 240] HU (W400/L40), `ct_samed` [-125, 275], `ct_lung` [-1350, 150] (W1500/L-600), `ct_bone` [-500, 1300] (W1800/L400), `mr_percentile` (0.5-99.5 percentile of each volume), or [low, high]; default: `window_hu`")
    window_hu: tuple[float, float] = Field(DEFAULT_WINDOW_HU, description="CT intensity window [low, high] in HU, scaled to 0-255 (default: abdomen W400/L40); used when `intensity` is not set")
    spacing_mm: tuple[float, float] | None = Field(None, description="resample slices in-plane to this pixel spacing [x, y] in mm (image linear, labels nearest neighbour); default: keep the scan's")
    context_slices: int = Field(0, ge=0, description="2.5D: 0 = the slice repeated as RGB; k = slices z-k, z, z+k as the three channels (clamped at the volume ends)")
    empty_slice_ratio: float = Field(0.0, ge=0, description="slices without foreground kept per slice with foreground, per case (seeded); 0 keeps none. Prompted samples need an object, so kept empty slices are counted by `samtune inspect` but not trained on")
    cache_dir: Optional[str] = Field(None, description="preprocessing cache (memory-mapped uint8 slices + slice index), rebuilt when files or settings change (kind dicom: also the series converted to NIfTI, in `dicom_nifti/`); default `<root>/.samtune_cache`, or `~/.cache/samtune` when `root` is read-only")

    class_codes: Optional[dict[str, dict]] = Field(None, description="per class name its standard code and display colour (DICOM-SEG, Slicer and ITK-SNAP files), e.g. `{liver: {type: 'SCT:10200004'}, kidney_left: {type: 'SCT:64033007', modifier: 'SCT:7771000', color: [185, 102, 83]}}`; `category` defaults to SCT 91723000 Anatomical Structure. Classes not given take the codes of their DICOM-SEG segments (kind dicom), else are looked up by name in samtune's organ table (datasets/label_codes.py); the rest are written as 'Unknown' with a warning, never as a guessed organ")

    @model_validator(mode="after")
    def _check_intensity(self):
        problems = []
        if self.class_codes:
            from samtune.datasets.label_codes import ClassCode  # pydicom's code tables: not on the path of --help

            for name, given in self.class_codes.items():
                try:
                    ClassCode.from_dict(given, name)
                except SamtuneError as exc:
                    problems.append(f"data.class_codes: {exc}")
        presets = sorted(INTENSITY_PRESETS) + [MR_PERCENTILE]
        if isinstance(self.intensity, str) and self.intensity not in presets:
            problems.append(f"data.intensity={self.intensity!r} is not a preset; {did_you_mean(self.intensity, presets)}(presets: {', '.join(presets)}, or [low, high])")
        for key in ("intensity", "window_hu"):
            value = getattr(self, key)
            if isinstance(value, tuple) and not value[0] < value[1]:
                problems.append(f"data.{key}={list(value)}: low must be below high")
        if self.spacing_mm is not None and min(self.spacing_mm) <= 0:
            problems.append(f"data.spacing_mm={list(self.spacing_mm)}: spacings must be positive (mm)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def intensity_setting(self) -> str | tuple[float, float]:
        """``intensity`` (preset or [low, high]) when set, else the explicit ``window_hu``."""
        if self.intensity is None:
            return tuple(float(v) for v in self.window_hu)
        return self.intensity if isinstance(self.intensity, str) else tuple(float(v) for v in self.intensity)


class NiftiData(VolumeKeys, DataSectionBase, CaseSplitKeys, DemoKeys):
    """``data:`` for ``kind: nifti``."""

    kind: Literal["nifti"] = Field(description="`nifti`: nnU-Net v2, MSD, or images/ + labels/ NIfTI folders")
    channel: int = Field(0, ge=0, description="input channel: the index on the 4th axis of a multi-modal (4D) MSD image, or nnU-Net's `_000<channel>` file")


def _class_ids(names: list[str] | None, class_names: dict[int, str] | None) -> set[int] | None:
    """Label values of the classes named in ``data.classes`` (None: every class)."""
    if not names:
        return None
    if class_names is not None:
        return {k for k, v in class_names.items() if v in names}
    return {int(m.group(1)) for n in names if (m := re.fullmatch(r"class_(\d+)", n))}


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.synthetic import generate_ct_phantom

    return generate_ct_phantom(folder, seed=seed)


def _image_channels(case) -> int:
    """Channels of a cached case's image file (cache entries written before samtune recorded
    them: read from the header)."""
    channels = case.meta.get("channels")
    return int(channels) if channels is not None else _channels_in_file(Path(case.meta.get("image_file", "")))


def _channel_warning(cases: list, ds: NiftiDataset, channel: int, chosen: bool) -> str | None:
    """Cases whose image is 4D (several modalities in one file): which channel is used, and how
    to choose; a warning only when ``data.channel`` was left at its default."""
    multi = [(c, n) for c in cases if (n := _image_channels(c)) > 1]
    if not multi:
        return None
    case = multi[0][0]
    counts = sorted({n for _, n in multi})
    used = f"channel {channel}" + (f" ({ds.channel_names[channel]})" if channel in ds.channel_names else "")
    if chosen:
        log.info("data.channel=%d: %s of the 4D images is used", channel, used)
        return None
    names = f" (dataset.json: {', '.join(f'{k}: {v}' for k, v in sorted(ds.channel_names.items()))})" if len(ds.channel_names) > 1 else ""
    listed = " (after listing every channel in dataset.json channel_names)" if ds.channel_names and len(ds.channel_names) < min(counts) else ""
    v2 = (
        "; nnU-Net v2 itself expects one 3D file per channel ({case}_0000, {case}_0001, ...)" if ds.layout == "nnunet_v2" else ""
    )  # fmt: skip
    return (
        f"{len(multi)} of {len(cases)} cases have a 4D image holding {'/'.join(map(str, counts))} channels (modalities) "
        f"in one file, e.g. case {case.name}: {case.meta.get('image_file')}; {used} is used, as data.channel is not "
        f"set. Set data.channel to 0..{min(counts) - 1} to choose the channel{names}{listed}{v2}"
    )


@register_format(NiftiData, make_demo=_make_demo)
def open_nifti(section: NiftiData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """Cases split per patient, preprocessed into the slice cache, served as axial slices."""
    ds = discover_dataset(Path(section.root), section.channel, section.class_names, on_bad_case)
    chosen = "channel" in section.model_fields_set
    return serve_cases(section, ds, seed=seed, on_bad_case=on_bad_case, progress=progress, channel=(section.channel, chosen))


def volume_cache_dir(section: VolumeKeys) -> Path:
    """``data.cache_dir``, else ``<root>/.samtune_cache`` (or the user cache when root is read-only)."""
    return Path(section.cache_dir).expanduser() if section.cache_dir else default_cache_dir(Path(section.root))


def split_patients(cases: list[Case], section, root: Path, seed: int, skipped: list[dict], patients: dict[str, str] | None):
    """Train/val cases (``choose_split``); with ``patients`` (case name -> patient) holding a patient
    twice (two labelled scans), the fraction split draws patients, so no patient is on both sides
    (scans of one patient are not independent samples). A split file names cases: a patient it
    puts on both sides gets a warning, returned."""
    grouped = patients is not None and len(set(patients.values())) < len(patients)
    if grouped and not section.split_file:
        names = sorted(set(patients.values()))
        train_p, val_p = split_by_fraction(names, section.val_fraction, seed, name=str)
        val_set = set(val_p)
        train = [c for c in cases if patients[c.name] not in val_set]
        val = [c for c in cases if patients[c.name] in val_set]
        log.info("patients: %d train, %d val (%s); cases: %d train, %d val", len(train_p), len(val_p), ", ".join(val_p[:20]), len(train), len(val))
        return train, val, []
    train, val = choose_split(cases, section, root, seed, skipped)
    if not patients:
        return train, val, []
    both = sorted({patients[c.name] for c in train} & {patients[c.name] for c in val})
    warning = (f"{section.split_file}: patients {both[:10]} have cases on both sides of the split (train and val); "
               "their scans are not independent: put all cases of a patient on one side") if both else None  # fmt: skip
    return train, val, [warning] if warning else []


def serve_cases(
    section: VolumeKeys, ds: NiftiDataset, *, seed: int, on_bad_case: str, progress: bool,
    channel: tuple[int, bool] | None = None, patients: dict[str, str] | None = None, codes: dict | None = None,
) -> DataSplit:
    """The volume formats after their cases are found (``nifti``, and ``dicom`` converted to NIfTI):
    split per patient, slices from the cache (``NiftiSliceSource``), warnings logged, ``DataSplit``.
    ``section`` has the ``VolumeKeys`` and ``SplitKeys``; ``channel``: (data.channel, set by
    the user) of a format whose images may be 4D; ``patients``: case -> patient where a patient
    may have several cases; ``codes``: class name -> code found in the data (DICOM-SEG)."""
    root = Path(section.root)
    train_cases, val_cases, split_warnings = split_patients(ds.cases, section, root, seed, ds.skipped, patients)
    cache_dir = volume_cache_dir(section)
    common = dict(
        spacing_mm=tuple(section.spacing_mm) if section.spacing_mm else None, cache_dir=cache_dir,
        context_slices=section.context_slices, empty_slice_ratio=section.empty_slice_ratio,
        foreground=_class_ids(section.classes, ds.classes), seed=seed, on_bad_case=on_bad_case, progress=progress,
    )  # fmt: skip
    train = NiftiSliceSource(train_cases, ds.classes, section.intensity_setting(), desc="train cases", **common)
    val = NiftiSliceSource(val_cases, ds.classes, section.intensity_setting(), desc="val cases", **common)
    if ds.classes is None:
        unify_class_names(train, val)
    found = list(ds.warnings) + split_warnings
    multi_channel = _channel_warning([c for src in (train, val) for c in src.cases], ds, *channel) if channel else None
    if multi_channel:
        found.append(multi_channel)
    for warning in found:
        log.warning("%s", warning)
    warnings = found + [w for src in (train, val) for c in src.cases for w in c.meta["warnings"]]
    background = [c.name for src in (train, val) for c in src.cases if c.meta["warnings"]]
    if background:
        log.warning("%d cases have an all-background label (legal, but check them): %s", len(background), ", ".join(background[:10]))
    skipped = ds.skipped + train.skipped + val.skipped
    return DataSplit(train, val, ds.layout, skipped, ds.notes, warnings, cache_dir, ds.channel_names, codes=dict(codes or {}))


@register_images(NiftiData)
def open_nifti_images(section: NiftiData, paths: list) -> NiftiSliceSource:
    """Scans without labels, every slice served (prediction). nnU-Net channel files
    ``{case}_{XXXX}`` are grouped by case and ``data.channel`` picks the file; class names come
    from ``data.class_names`` or the dataset.json at ``data.root``, when there is one."""
    classes = section.class_names
    if classes is None and (Path(section.root) / "dataset.json").is_file():
        classes = discover_dataset(section.root, section.channel, None, "skip").classes
    return scan_source(section, scan_cases(paths, section.channel), {int(k): str(v) for k, v in (classes or {}).items()})


def scan_cases(paths: list, channel: int) -> list[Case]:
    """The NIfTI scans among ``paths`` (files, or folders of them) as label-free cases: nnU-Net
    channel files ``{case}_{XXXX}`` named by case, only ``channel``'s file taken."""
    cases, seen = [], set()
    for path in list_input_files(paths, NIFTI_SUFFIXES):
        stem = _strip_suffix(path.name)
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        if m:
            if int(m.group(2)) != channel:
                continue
            cases.append(Case(m.group(1), path, None))
        else:
            cases.append(Case(stem, path, None, channel))
        if cases[-1].name in seen:
            raise SamtuneError(f"{path}: a second scan named {cases[-1].name!r}; give each scan its own name.")
        seen.add(cases[-1].name)
    return cases


def scan_source(section: VolumeKeys, cases: list[Case], classes: dict[int, str]) -> NiftiSliceSource:
    """Label-free ``cases`` with the section's intensity, spacing and 2.5D settings, every slice
    served, in memory (no cache: a scan to predict on is read once)."""
    return NiftiSliceSource(
        cases, classes, section.intensity_setting(),
        spacing_mm=tuple(section.spacing_mm) if section.spacing_mm else None, cache_dir=None,
        context_slices=section.context_slices, empty_slice_ratio=None,
    )  # fmt: skip
