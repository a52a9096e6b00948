"""DICOM as PACS exports it, for training: a folder tree of studies, each image series labelled by
the DICOM-SEG that references it (``data.kind: dicom``).

Why through NIfTI: each labelled series is converted once into a NIfTI image + label pair in the
cache folder (``<cache_dir>/dicom_nifti/``), then served by the NIfTI machinery (``nifti.serve_cases``:
split per patient, slice cache, warnings), so both formats train on the same slices. A conversion
is keyed by the DICOM files' paths, sizes and mtimes (as ``cache.case_key`` keys NIfTI files), the
``resample`` setting and the class values, so a changed export is converted again; files are
written to temporary siblings and renamed, the key file last (an interrupted run leaves no entry).

Cases: every image series that exactly one DICOM-SEG references (``dicom_series.find_series`` lists
them, ``dicom_seg.read_seg`` reads them); named by PatientID, plus ``_<SeriesNumber>`` when a
patient has several labelled series (they stay on one side of the split). ``data.series`` keeps
only the series with that SeriesInstanceUID or SeriesDescription. Series without a SEG are left
out with a note.

Classes come from the SEGs' Segment Labels, matched by name across studies (case, spaces, ``_``
and ``-`` ignored, as ``label_codes.normalize_name``): the same organ may be segment 1 in one
study and segment 3 in another. The label space is every name found, valued 1..N in alphabetical
order of the normalised names: the values do not depend on which patients the folder holds or in
which order (adding patients with the same organs changes no value, so no conversion is redone);
only a new class name renumbers. The codes of each class (SNOMED CT category/type/modifier) come
from the first study, alphabetically by case, that codes it; ``DataSplit.codes`` returns them.

Bad cases (``data.on_bad_case``): a SEG whose series is not in the folder, two SEGs for one series,
a series that cannot be read (geometry: tilt, gaps, uneven spacing unless ``data.resample``), a
SEG that does not fit its series or has overlapping segments. A class segmented in some studies
only is legal but warned about: where its segment is missing, its voxels are trained as background.
A class found only in cases later skipped stays in the label space without voxels (inspect warns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.cache import _stat
from samtune.datasets.checks import BadCase, handle_bad
from samtune.datasets.formats import DataSectionBase, DemoKeys, SplitKeys, register_format, register_images
from samtune.datasets.nifti import NiftiSliceSource, VolumeKeys, scan_cases, scan_source, serve_cases, volume_cache_dir
from samtune.datasets.nifti_layouts import Case, NiftiDataset
from samtune.datasets.source import DataSplit

log = logging.getLogger(__name__)

CONVERTED = "dicom_nifti"  # sub-folder of the cache folder holding the converted cases
CONVERT_VERSION = 1  # bump when the conversion changes what it writes


class DicomData(VolumeKeys, DataSectionBase, SplitKeys, DemoKeys):
    """``data:`` for ``kind: dicom``."""

    kind: Literal["dicom"] = Field(description="`dicom`: a folder tree of DICOM studies (any file names), each image series labelled by the DICOM-SEG that references it; classes are the SEGs' segment labels, matched by name across studies")
    resample: bool = Field(False, description="interpolate tilted/gappy/uneven series onto a regular grid (image linear, labels nearest neighbour) instead of refusing them as bad cases")
    series: Optional[str] = Field(None, description="train only on the series with this SeriesInstanceUID or SeriesDescription (where studies hold several labelled series); default: every series a DICOM-SEG references")


@dataclass
class Study:
    """One labelled image series: a case to convert."""

    name: str  # case name
    patient: str
    info: object  # dicom_series.SeriesInfo
    seg: Path
    segments: list[str]  # Segment Labels, in segment order


def _key(name: str) -> str:
    from samtune.datasets.label_codes import normalize_name

    return normalize_name(name) or name


def _seg_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001  (find_series read it a moment ago: the file changed)
        raise BadCase(None, path, f"the DICOM-SEG cannot be read ({type(exc).__name__}: {exc})", "re-export it") from None


def _patient(info) -> str:
    """PatientID; an anonymised export without one: the study, by a short hash of its UID."""
    return info.patient_id.strip() or f"study-{hashlib.sha1(info.study_uid.encode()).hexdigest()[:8]}"


def _case_names(infos: list) -> dict[str, str]:
    """Series UID -> case name: the PatientID, with ``_<SeriesNumber>`` when the patient has several."""
    by_patient = defaultdict(list)
    for info in infos:
        by_patient[_patient(info)].append(info)
    names = {}
    for patient, group in by_patient.items():
        for info in group:
            names[info.uid] = patient if len(group) == 1 else f"{patient}_{info.number or 'x'}"
    counts = defaultdict(int)
    for name in names.values():
        counts[name] += 1
    for uid, name in names.items():  # two studies of a patient with the same series number
        if counts[name] > 1:
            names[uid] = f"{name}_{hashlib.sha1(uid.encode()).hexdigest()[:6]}"
    return names


def _chosen(infos: list, series: str | None, root: Path, notes: list[str]) -> list:
    """The labelled series ``data.series`` picks (all without it)."""
    if series is None:
        return infos
    want = series.strip()
    kept = [i for i in infos if i.uid == want or i.description.strip().casefold() == want.casefold()]
    if not kept:
        listing = "\n".join(i.line() for i in infos)
        raise SamtuneError(f"data.series={series!r}: no labelled series under {root} has this SeriesInstanceUID or "
                           f"SeriesDescription. The labelled series are:\n{listing}\nSet data.series to one of them, or remove it.")
    notes.extend(f"{i.label()}: left out (data.series={series!r})" for i in infos if i not in kept)
    return kept


def find_studies(root: Path, section: DicomData, on_bad_case: str, ds: NiftiDataset, cache_dir: Path) -> list[Study]:
    """The labelled series under ``root``; bad ones raise or are recorded in ``ds.skipped``, files
    ignored are noted in ``ds.notes``."""
    from samtune.datasets.dicom_series import find_series

    found, skipped = find_series(root)
    cache = cache_dir.resolve()
    ds.notes.extend(f"{p}: ignored ({why})" for p, why in skipped.not_dicom if cache not in p.resolve().parents)
    ds.notes.extend(f"{o.path}: ignored ({o.modality}: samtune reads labels from DICOM-SEG only)" for o in skipped.non_image if o.modality != "SEG")
    by_uid = {info.uid: info for info in found}
    segs: dict[str, list[Path]] = defaultdict(list)
    for path, ref in skipped.segmentations:
        if ref in by_uid:
            segs[ref].append(path)
            continue
        try:
            patient = str(_seg_header(path).get("PatientID", "") or "") or None
        except BadCase:
            patient = None
        where = f"series {ref}, which is not under {root}" if ref else "no series (no ReferencedSeriesSequence)"
        handle_bad(BadCase(patient, path, f"this DICOM-SEG references {where}; {len(found)} image series were found there",
                           "export the image series together with its segmentation, or move the SEG out of data.root"), on_bad_case, ds.skipped)
    labelled = _chosen([i for i in found if segs.get(i.uid)], section.series, root, ds.notes)
    ds.notes.extend(f"{i.label()}: left out (no DICOM-SEG references it)" for i in found if not segs.get(i.uid))
    names = _case_names(labelled)
    studies = []
    for info in labelled:
        if len(segs[info.uid]) > 1:
            files = ", ".join(str(p) for p in segs[info.uid])
            handle_bad(BadCase(names[info.uid], Path(info.files[0]).parent, f"{len(segs[info.uid])} DICOM-SEGs reference {info.label()}: {files}",
                               "keep one SEG per series (merge them, or move the others out of data.root)"), on_bad_case, ds.skipped)
            continue
        try:
            header = _seg_header(segs[info.uid][0])
        except BadCase as bad:
            handle_bad(BadCase(names[info.uid], bad.file, bad.problem), on_bad_case, ds.skipped)
            continue
        labels = [str(item.get("SegmentLabel", "") or f"segment_{item.get('SegmentNumber', '?')}") for item in header.get("SegmentSequence", [])]
        studies.append(Study(names[info.uid], _patient(info), info, segs[info.uid][0], labels))
    return studies


def label_space(studies: list[Study]) -> tuple[dict[str, int], dict[str, str]]:
    """(normalised name -> value 1..N, alphabetical; normalised name -> name as first spelled, in case order)."""
    spelled: dict[str, str] = {}
    for study in sorted(studies, key=lambda s: s.name):
        for name in study.segments:
            spelled.setdefault(_key(name), name)
    if len(spelled) >= IGNORE_INDEX:
        raise SamtuneError(f"{len(spelled)} different segment labels in the DICOM-SEGs; samtune stores up to {IGNORE_INDEX - 1} "
                           "classes per label map. Use data.series to train on fewer series, or rename segments.")
    return {key: value for value, key in enumerate(sorted(spelled), 1)}, spelled


def _label_on_grid(label: np.ndarray, headers: list, where: str) -> np.ndarray:
    """A label on the original slices (i, j, k; ``headers`` in stack order) put on the grid
    ``read_series(resample=True)`` made: each target slice takes its nearest original slice
    (nearest neighbour: label values are never blended), shifted in-plane by its tilt drift."""
    from scipy import ndimage

    from samtune.datasets import dicom_geometry as geometry

    planes = [geometry.plane_of(h, f"instance {h.get('InstanceNumber', '?')}", where=where) for h in headers]
    stack = geometry.build_stack(planes, where)  # the stack read_series built: headers are in its order
    targets = geometry.regular_heights(stack)
    nearest = np.abs(stack.heights[None, :] - targets[:, None]).argmin(axis=1)
    shifts = stack.offsets[:, ::-1] / np.asarray(planes[0].pixel_spacing, float)  # (rows, columns), pixels
    out = np.empty((*label.shape[:2], len(targets)), label.dtype)
    for t, k in enumerate(nearest):
        plane = label[..., k]
        out[..., t] = ndimage.shift(plane, shifts[k][::-1], order=0, mode="constant", cval=0) if np.abs(shifts[k]).max() > 1e-6 else plane
    return out


def _save_nifti(data: np.ndarray | None, image, path: Path) -> None:
    """``image`` (or a label ``data`` on its grid) written to a temporary sibling, then renamed."""
    import nibabel as nib

    if data is not None:
        image = nib.Nifti1Image(data, image.affine)
        image.set_sform(image.affine, code=1)  # scanner coordinates, as the image's
        image.set_qform(image.affine, code=1)
        image.header.set_xyzt_units("mm")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii")
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(study: Study, values: dict[str, int], resample: bool):
    """The series volume and its label in the global values, plus the SEG's classes."""
    from samtune.datasets.dicom_seg import read_seg
    from samtune.datasets.dicom_series import read_series

    folder = Path(study.info.files[0]).parent
    try:
        volume = read_series(study.info, resample=resample)
    except SamtuneError as exc:
        raise BadCase(study.name, folder, str(exc)) from None
    try:
        label, classes = read_seg(study.seg, volume.sources)
    except SamtuneError as exc:
        raise BadCase(study.name, study.seg, str(exc)) from None
    lut = np.zeros(int(max([c.value for c in classes], default=0)) + 1, np.uint8)
    for c in classes:
        lut[c.value] = values[_key(c.name)]
    label = lut[label]
    if volume.resampled:
        label = _label_on_grid(label, volume.sources, study.info.label())
    return volume, label, classes


def convert(study: Study, values: dict[str, int], folder: Path, resample: bool) -> tuple[Case, dict, bool]:
    """The study as a NIfTI case in ``folder`` (converted, or reused when its key matches), the
    codes of its classes (normalised name -> code dict or None) and whether it was converted now."""
    from samtune.datasets.label_codes import code_to_dict

    files = sorted(Path(p) for p in study.info.files)
    mine = sorted({_key(n) for n in study.segments})
    data = {"version": CONVERT_VERSION, "files": [_stat(p, study.name) for p in files], "seg": _stat(study.seg, study.name),
            "resample": bool(resample), "values": [[k, values[k]] for k in mine]}  # fmt: skip
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", study.name)[:60] + "-" + hashlib.sha1(study.info.uid.encode()).hexdigest()[:10]
    image, label, meta_path = folder / f"{stem}_0000.nii", folder / f"{stem}.nii", folder / f"{stem}.json"
    case = Case(study.name, image, label, 0)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == key and image.is_file() and label.is_file():
        return case, meta["codes"], False
    volume, label_map, classes = _read(study, values, resample)
    folder.mkdir(parents=True, exist_ok=True)
    _save_nifti(None, volume.image, image)
    _save_nifti(label_map, volume.image, label)
    meta = {"key": key, "series": study.info.uid, "seg": str(study.seg), "modality": volume.modality, "resampled": volume.resampled,
            "codes": {_key(c.name): code_to_dict(c.code) for c in classes}}  # fmt: skip
    from samtune.files import write_json_atomic

    write_json_atomic(meta_path, meta)  # last: a key file whose files exist marks a complete entry
    return case, meta["codes"], True


def _class_warnings(studies: list[Study], used: set[str], spelled: dict[str, str]) -> list[str]:
    """Classes segmented in some of the studies used only."""
    out = []
    for key, name in sorted(spelled.items()):
        lacking = [s.name for s in studies if s.name in used and key not in {_key(n) for n in s.segments}]
        if lacking and len(lacking) < len(used):
            out.append(f"class {name!r} is segmented in {len(used) - len(lacking)} of {len(used)} studies; its DICOM-SEG "
                       f"lacks it in {', '.join(lacking[:10])}{' ...' if len(lacking) > 10 else ''}, where its voxels are trained "
                       "as background. Add the segment there, or leave those studies out if the organ is in them")  # fmt: skip
    return out


def _codes(found: list[tuple[str, dict]], spelled: dict[str, str], warnings: list[str]) -> dict[str, object]:
    """Class name -> ClassCode (or UNKNOWN): the first study's code that is known; disagreeing codes warned."""
    from samtune.datasets.label_codes import UNKNOWN, code_from_dict

    codes: dict[str, object] = {}
    firsts: dict[str, tuple[str, dict]] = {}
    for case, study_codes in found:
        for key, d in study_codes.items():
            if d is None:
                continue
            seen = firsts.setdefault(key, (case, d))
            if (seen[1]["category"], seen[1]["type"], seen[1]["modifier"]) != (d["category"], d["type"], d["modifier"]):
                warnings.append(f"class {spelled[key]!r}: case {case}'s DICOM-SEG codes it {d['type']} (modifier {d['modifier']}), "
                                f"case {seen[0]}'s {seen[1]['type']} (modifier {seen[1]['modifier']}); {seen[0]}'s code is kept. "
                                "Check the segment labels: one name, one structure")  # fmt: skip
    for key, name in spelled.items():
        codes[name] = code_from_dict(firsts[key][1], name) if key in firsts else UNKNOWN
    return codes


def _modality_warnings(section: DicomData, modalities: set[str]) -> list[str]:
    if "MR" in modalities and not {"intensity", "window_hu"} & section.model_fields_set:
        return [f"the series are {'/'.join(sorted(modalities))}, and data.intensity is not set: MR values are mapped with "
                "the CT window (window_hu). Set data.intensity: mr_percentile for MR"]  # fmt: skip
    if len(modalities) > 1:
        return [f"the series mix modalities {sorted(modalities)} under one intensity mapping; use data.series to train on one"]
    return []


def _make_demo(folder: Path, seed: int) -> Path:
    try:
        from samtune.datasets.dicom_demo import generate_dicom_phantom
    except ImportError as exc:
        if exc.name != "samtune.datasets.dicom_demo":
            raise
        raise SamtuneError("data.generate_demo: this samtune has no DICOM demo generator (samtune.datasets.dicom_demo); "
                           "point data.root at a DICOM export instead.") from None
    return generate_dicom_phantom(folder, seed=seed)


@register_format(DicomData, make_demo=_make_demo)
def open_dicom(section: DicomData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """Labelled series converted to NIfTI (once), then split per patient and served as NIfTI slices."""
    root = Path(section.root)
    cache_dir = volume_cache_dir(section)
    ds = NiftiDataset(root, "dicom", [], {})
    studies = find_studies(root, section, on_bad_case, ds, cache_dir)
    if not studies and not ds.skipped:
        raise SamtuneError(f"{root}: no image series with a DICOM-SEG referencing it ({len(ds.notes)} files or series "
                           "ignored, see `samtune inspect`). data.root must hold the exported CT/MR series and their DICOM-SEG labels.")
    values, spelled = label_space(studies)
    ds.classes = {value: spelled[key] for key, value in values.items()}
    found, converted = [], 0
    for study in tqdm(studies, desc="DICOM -> NIfTI", unit="case", disable=not progress, leave=False):
        try:
            case, codes, new = convert(study, values, cache_dir / CONVERTED, section.resample)
        except BadCase as bad:
            handle_bad(bad, on_bad_case, ds.skipped)
            continue
        ds.cases.append(case)
        found.append((study.name, codes))
        converted += new
    log.info("DICOM %s: %d labelled series (%d converted to NIfTI now, %d reused from %s)", root, len(ds.cases), converted,
             len(ds.cases) - converted, cache_dir / CONVERTED)
    used = {c.name for c in ds.cases}
    ds.warnings += _class_warnings(studies, used, spelled)
    codes = _codes(sorted(found), spelled, ds.warnings)
    ds.warnings += _modality_warnings(section, {s.info.modality for s in studies if s.name in used})
    patients = {s.name: s.patient for s in studies if s.name in used}
    return serve_cases(section, ds, seed=seed, on_bad_case=on_bad_case, progress=progress, patients=patients, codes=codes)


@register_images(DicomData)
def open_dicom_images(section: DicomData, paths: list) -> NiftiSliceSource:
    """Scans without labels, every slice served (prediction): NIfTI files, as ``samtune predict``
    hands over the DICOM series it read. Classes are the checkpoint's (its label space), not read here."""
    return scan_source(section, scan_cases(paths, 0), {})
