"""DICOM series in: find the image series in a folder tree, choose one, read it as a NIfTI-like volume.

Why: scans leave PACS as DICOM series, one file per slice (or one Enhanced multi-frame file), with
any file names, often without a ``.dcm`` suffix, sometimes mixed with other series, reports and
segmentations. ``find_series`` groups the instances by SeriesInstanceUID, ``choose_series`` picks
one (or says how to pick), ``read_series`` returns the voxels in a ``nibabel.Nifti1Image`` with the
RAS affine, plus each slice's source header (without pixel data) for DICOM-SEG references.

Geometry (LPS -> RAS, stack checks, resampling) lives in ``dicom_geometry.py``. A stack that is not
a regular grid (gantry tilt, missing slices, uneven spacing) is an error that names the slices,
never a volume with a silently wrong affine; ``resample=True`` interpolates instead, with a warning.

Memory: headers are read without pixel data; slices are decoded one at a time into one
preallocated slices × rows × columns array, which the image holds as its (columns, rows, slices)
transposed view (no copy). Values are RescaleSlope · stored + RescaleIntercept (HU for CT), int16
when that is exact (slope 1, integral intercept, values in range), else float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from samtune import SamtuneError
from samtune.datasets import dicom_geometry as geometry

log = logging.getLogger(__name__)

CODECS_INSTALL = 'pip install "samtune[dicom-codecs]"'  # pylibjpeg + pylibjpeg-openjpeg + pylibjpeg-libjpeg
# Objects that hold no image volume: segmentations, structure sets, reports, presentation states, ...
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "FID",
                        "PLAN"}


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found on disk (headers only)."""

    uid: str  # SeriesInstanceUID
    modality: str
    description: str  # SeriesDescription ("" when absent)
    study_uid: str
    patient_id: str
    files: tuple[Path, ...]
    n_slices: int  # images: instances, or frames of multi-frame instances
    number: str = ""  # SeriesNumber

    @property
    def n_instances(self) -> int:
        return len(self.files)

    def label(self) -> str:
        """How messages name the series."""
        return (f"series {self.uid} ({self.modality}, '{self.description}', {self.n_slices} slices, "
                f"in {_folder(self.files)})")

    def line(self) -> str:
        """One row of a listing."""
        return (f"  {self.uid}  {self.modality:<3} '{self.description}'  {self.n_slices} slices  "
                f"(series number {self.number or '?'})")


class NonImage(NamedTuple):
    """A DICOM object that is not an image slice (SEG, RTSTRUCT, SR, ...): listed for later steps."""

    path: Path
    modality: str
    series_uid: str
    referenced_series: tuple[str, ...]  # SeriesInstanceUIDs of the images it refers to


@dataclass
class Skipped:
    """What ``find_series`` did not take as image slices."""

    not_dicom: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    non_image: list[NonImage] = field(default_factory=list)

    @property
    def segmentations(self) -> list[tuple[Path, str]]:
        """(file, referenced series UID) of every DICOM-SEG; "" when it names no series."""
        return [(o.path, (o.referenced_series or ("",))[0]) for o in self.non_image if o.modality == "SEG"]

    def summary(self) -> str:
        kinds = sorted({o.modality for o in self.non_image})
        return (f"{len(self.not_dicom)} file(s) not DICOM or unreadable, {len(self.non_image)} non-image "
                f"object(s){' (' + ', '.join(kinds) + ')' if kinds else ''}")


@dataclass
class DicomVolume:
    """A series read as a volume. ``image``'s data is (columns i, rows j, slices k); its sform and
    qform (code 1, scanner) map voxels to RAS mm. ``sources[k]`` is the header (no pixel data) of
    the instance slice k came from and ``frames[k]`` its frame number (1-based) in a multi-frame
    instance (None for single-frame series). After resampling, slices no longer come from one
    instance: ``resampled`` is True and ``sources`` holds the original headers in stack order."""

    info: SeriesInfo
    image: nib.Nifti1Image
    sources: list
    frames: list[int] | None
    modality: str
    units: str  # RescaleType: "HU" for CT; "" when the series does not say
    resampled: bool = False

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.image.header.get_zooms()[:3])


def _folder(files) -> str:
    return str(Path(files[0]).parent) if files else "?"


def _read_header(path: Path):
    """The header without pixel data, or (None, why) for a file that is not readable DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True), ""
    except InvalidDicomError:
        return None, "not DICOM (no 'DICM' marker at byte 128)"
    except Exception as exc:  # noqa: BLE001  (truncated or damaged files raise many types)
        return None, f"unreadable DICOM ({type(exc).__name__}: {exc})"


def _referenced_series(ds) -> tuple[str, ...]:
    """Series UIDs a SEG / PR (ReferencedSeriesSequence), SR (evidence) or RTSTRUCT (frame of
    reference -> study -> series) refers to."""
    found = [item.SeriesInstanceUID for item in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item]
    for evidence in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        found += [s.SeriesInstanceUID for s in evidence.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in s]
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            series = study.get("RTReferencedSeriesSequence", [])
            found += [s.SeriesInstanceUID for s in series if "SeriesInstanceUID" in s]
    return tuple(dict.fromkeys(found))


def _is_image(ds) -> bool:
    return "Rows" in ds and "Columns" in ds and str(ds.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES


def find_series(root) -> tuple[list[SeriesInfo], Skipped]:
    """Every image series under ``root`` (all files, any name, recursively; hidden ones left out), sorted by series number
    then UID, and what was skipped: files that are not DICOM, and non-image objects (SEG, RTSTRUCT,
    SR, ...) with the series they refer to."""
    root = Path(root)
    if not root.exists():
        raise SamtuneError(f"{root}: no such folder; give the folder the DICOM series were exported to.")
    # hidden files and folders are no export's content: samtune's own caches (.samtune_cache), macOS
    # forks (._*), version control; reading them as DICOM would only cost time and fill the log
    paths = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    groups: dict[str, list] = {}
    skipped = Skipped()
    for path in paths:
        ds, why = _read_header(path)
        if ds is None or "SeriesInstanceUID" not in ds:
            skipped.not_dicom.append((path, why or "DICOM without a SeriesInstanceUID (a DICOMDIR or media index?)"))
        elif not _is_image(ds):
            skipped.non_image.append(NonImage(path, str(ds.get("Modality", "")), str(ds.SeriesInstanceUID),
                                              _referenced_series(ds)))
        else:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    found = [_series_info(uid, members) for uid, members in groups.items()]
    found.sort(key=lambda s: (int(s.number) if s.number.lstrip("-").isdigit() else 0, s.uid))
    if skipped.not_dicom or skipped.non_image:
        log.info("%s: %d image series; skipped %s", root, len(found), skipped.summary())
    return found, skipped


def _series_info(uid: str, members: list) -> SeriesInfo:
    first = members[0][1]
    return SeriesInfo(
        uid=uid, modality=str(first.get("Modality", "")), description=str(first.get("SeriesDescription", "")),
        study_uid=str(first.get("StudyInstanceUID", "")), patient_id=str(first.get("PatientID", "")),
        files=tuple(path for path, _ in members),
        n_slices=sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in members),
        number=str(first.get("SeriesNumber", "") or ""),
    )


def choose_series(found: list[SeriesInfo], uid: str | None = None, *, where="",
                  skipped: Skipped | None = None) -> SeriesInfo:
    """The series to read: the one with ``uid``, else the only image series. ``where`` names the
    folder searched (for messages); ``skipped`` (from ``find_series``) explains an empty result."""
    place = f"{where}: " if where else ""
    listing = "\n".join(s.line() for s in found)
    if not found:
        extra = f" (skipped {skipped.summary()})" if skipped else ""
        raise SamtuneError(f"{place}no DICOM image series found{extra}. Point to the folder holding the exported "
                           "CT/MR series.")
    if uid is not None:
        match = [s for s in found if s.uid == str(uid).strip()]
        if not match:
            raise SamtuneError(f"{place}no image series with UID {uid}. The series found are:\n{listing}\n"
                               "Pass one of these UIDs (--series UID on the command line, data.series in a recipe).")
        return match[0]
    if len(found) > 1:
        raise SamtuneError(f"{place}{len(found)} image series found; say which one to read with --series UID "
                           f"(command line) or data.series: UID (recipe):\n{listing}")
    return found[0]


class _Slice(NamedTuple):
    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file
    header: object  # pydicom Dataset without pixel data
    plane: geometry.Plane
    rescale: tuple[float, float]  # slope, intercept


def _rescale(holder) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept); absent means stored values are the values (PS3.3 C.11.1)."""
    if holder is None:
        return 1.0, 0.0
    return float(holder.get("RescaleSlope", 1.0) or 1.0), float(holder.get("RescaleIntercept", 0.0) or 0.0)


def _slices_of(path: Path, ds, where: str) -> list[_Slice]:
    """One _Slice per image: the instance itself, or each frame of a multi-frame instance."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SamtuneError(f"{where}: {path}: {ds.NumberOfFrames} frames without per-frame functional groups, so "
                           "no frame has a position (a cine loop, NM or ultrasound object?). Choose a CT/MR series "
                           "of slices.")
    if not frames:
        label = f"instance {ds.get('InstanceNumber', '?')} (file {path.name})"
        return [_Slice(path, None, ds, geometry.plane_of(ds, label, where=where), _rescale(ds))]
    out = []
    for index, item in enumerate(frames):
        label = f"frame {index + 1} of file {path.name}"
        value = geometry.functional_group(ds, item, "PixelValueTransformationSequence")
        out.append(_Slice(path, index, ds, geometry.plane_of(ds, label, item, where), _rescale(value)))
    return out


def _headers(info: SeriesInfo) -> list[_Slice]:
    slices = []
    for path in info.files:
        ds, why = _read_header(Path(path))
        if ds is None:
            raise SamtuneError(f"{path}: {why}; it belonged to {info.label()} when the folder was searched. "
                               "Search the folder again (find_series) or restore the file.")
        slices += _slices_of(Path(path), ds, info.label())
    return slices


def _check_decoder(path: Path, ds) -> None:
    """Fail before decoding when pydicom has no working decoder for the file's transfer syntax."""
    from pydicom.pixels import get_decoder

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise SamtuneError(f"{path}: its pixel data is compressed as {syntax.name} ({syntax}), which pydicom cannot "
                           "decode. Convert the series to an uncompressed transfer syntax first (e.g. "
                           "`gdcmconv --raw` or `dcmdjpeg`).") from None
    if not decoder.is_available:
        raise SamtuneError(f"{path}: its pixel data is compressed as {syntax.name} ({syntax}) and no decoder for it is "
                           f"installed ({'; '.join(decoder.missing_dependencies) or 'no plugin'}). Install the "
                           f"codecs: {CODECS_INSTALL} (pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg).")


def _decoded(path: Path, ds):
    """Yield (frame index, stored 2-D array) of one file, a frame at a time."""
    from pydicom.pixels import iter_pixels

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "?")
    try:
        for index, frame in enumerate(iter_pixels(str(path))):
            if frame.ndim != 2:
                raise SamtuneError(f"{path}: frames of shape {frame.shape} (SamplesPerPixel "
                                   f"{ds.get('SamplesPerPixel')}): colour images are not a CT/MR volume; "
                                   "choose another series.")
            yield index, frame
    except SamtuneError:
        raise
    except Exception as exc:  # noqa: BLE001  (decoder plugins raise their own types)
        name = getattr(syntax, "name", syntax)
        raise SamtuneError(f"{path}: the pixel data ({name}) could not be decoded ({type(exc).__name__}: {exc}). If "
                           f"a codec is missing, install it: {CODECS_INSTALL}; else the file is damaged: "
                           "re-export it.") from None


def _put(volume: np.ndarray, t: int, frame: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    """Store slice ``t`` as slope · stored + intercept. An int16 volume becomes float32 (one copy)
    the first time a slice's values leave the int16 range (e.g. unsigned 16-bit MR)."""
    slope, intercept = rescale
    if volume.dtype == np.int16:
        if frame.dtype.kind in "iu":  # (Float Pixel Data is never exact in int16)
            values = frame.astype(np.int32) + int(intercept)
            if values.size == 0 or (values.min() >= -32768 and values.max() <= 32767):
                volume[t] = values
                return volume
        volume = volume.astype(np.float32)
    volume[t] = frame * slope + intercept
    return volume


def _fill(slices: list[_Slice], order: np.ndarray, shape: tuple[int, int], where: str) -> np.ndarray:
    """Decode every image into a K × rows × columns array in stack order, rescaled; each file is
    read once and decoded a frame at a time."""
    target = {(s.path, s.frame or 0): t for t, s in enumerate(slices[k] for k in order)}
    exact = all(s.rescale[0] == 1 and float(s.rescale[1]).is_integer() for s in slices)
    volume = np.empty((len(order), *shape), np.int16 if exact else np.float32)
    files = {s.path: s.header for s in slices}
    filled = 0
    for path, ds in files.items():
        _check_decoder(path, ds)
        for index, frame in _decoded(path, ds):
            t = target.get((path, index))
            if t is None or frame.shape != tuple(shape):
                raise SamtuneError(f"{path}: frame {index + 1} of shape {frame.shape} does not match its header "
                                   f"(NumberOfFrames {ds.get('NumberOfFrames', 1)}, {shape[0]} × {shape[1]}); "
                                   f"the file is damaged: re-export {where}.")
            volume = _put(volume, t, frame, slices[order[t]].rescale)
            filled += 1
    if filled != len(order):
        raise SamtuneError(f"{where}: {len(order) - filled} of {len(order)} images had no pixel data; "
                           "the files are damaged or truncated: re-export the series.")
    return volume


def _nifti(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The image over (columns, rows, slices): a transposed view of the K × rows × columns array."""
    image = nib.Nifti1Image(volume.transpose(2, 1, 0), affine)
    image.set_sform(affine, code=1)  # 1 = scanner anatomical coordinates, as dcm2niix writes them
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def _units(first: _Slice, modality: str) -> str:
    """RescaleType of the header or of the frame's value transformation; CT values are HU when unsaid
    (PS3.3 C.8.2.1)."""
    holder = first.header
    if first.frame is not None:
        item = first.header.PerFrameFunctionalGroupsSequence[first.frame]
        holder = geometry.functional_group(first.header, item, "PixelValueTransformationSequence") or {}
    return str(holder.get("RescaleType", "") or ("HU" if modality == "CT" else ""))


def _tilt_tag(slices: list[_Slice]) -> float:
    """GantryDetectorTilt (degrees, PS3.3 C.8.2.1), 0 when absent: informative only, the positions decide."""
    return max((abs(float(s.header.get("GantryDetectorTilt", 0) or 0)) for s in slices), default=0.0)


def _irregular(problems: list[str], tag: float, where: str, resample: bool) -> None:
    """Raise for an irregular stack, or warn that it is resampled."""
    tilted = any(p.startswith("gantry tilt") for p in problems)
    if tag and tilted:
        problems = [f"{p} (GantryDetectorTilt {tag:g}°)" if p.startswith("gantry tilt") else p for p in problems]
    if not resample:
        export = "reconstructed without gantry tilt" if tilted else "complete, every slice"
        raise SamtuneError(f"{where}: the slices do not form a regular grid: " + "; ".join(problems)
                           + f". Re-export the series from PACS ({export}), {geometry.RESAMPLE_HINT}.")
    log.warning("%s: %s; resampling onto a regular grid along the slice normal (linear interpolation)",
                where, "; ".join(problems))


def read_series(info: SeriesInfo, *, resample: bool = False) -> DicomVolume:
    """Read one image series (from ``find_series`` / ``choose_series``) as a volume: slices sorted
    along the slice normal, values rescaled, geometry checked (see dicom_geometry). ``resample``:
    interpolate a tilted, gappy or unevenly spaced stack onto a regular grid instead of refusing it."""
    where = info.label()
    slices = _headers(info)
    planes = [s.plane for s in slices]
    first = geometry.common_plane(planes, where)
    stack = geometry.build_stack(planes, where)
    tag = _tilt_tag(slices)
    if stack.problems:
        _irregular(stack.problems, tag, where, resample)
    elif tag:
        log.info("%s: GantryDetectorTilt %g° but the positions stack along the normal: the orientation carries it",
                 where, tag)
    volume = _fill(slices, stack.order, first.shape, where)
    spacing = stack.spacing
    if stack.problems:
        volume, spacing = geometry.resample_stack(volume, stack, first.pixel_spacing, float(volume.min()))
    if len(slices) == 1:  # one image: its thickness, if any, is the best slice distance there is
        spacing = float(slices[0].header.get("SliceThickness", 0) or 0) or 1.0
    origin = slices[stack.order[0]].plane.position
    affine = geometry.affine_ras(origin, first.orientation, first.pixel_spacing, spacing)
    multiframe = any(s.frame is not None for s in slices)
    units = _units(slices[0], info.modality)
    return DicomVolume(
        info=info, image=_nifti(volume, affine), sources=[slices[k].header for k in stack.order],
        frames=[slices[k].frame + 1 for k in stack.order] if multiframe else None,
        modality=info.modality, units=units, resampled=bool(stack.problems),
    )
