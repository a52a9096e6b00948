"""Synthetic DICOM written from numpy volumes: CT / MR single-frame series and Enhanced CT files.

Why: the DICOM reader (``dicom_series.py``), its tests, dcm2niix comparisons, DICOM-SEG writing
(highdicom references these instances) and ``samtune demo-data --kind dicom`` need series with the
headers a scanner export carries, in any geometry, without patient data. Knobs for the failure
cases a reader must catch (uneven slice distances, gaps, duplicate positions, gantry tilt) are
parameters; a test that needs something rarer edits the written files with pydicom.

Conventions, from DICOM PS3.3 C.7.6.2.1.1 (Image Plane Module): ``orientation`` is
ImageOrientationPatient, the row direction (along which the column index grows) then the column
direction (along which the row index grows), unit vectors in patient LPS; ``spacing_mm`` is (row
spacing = PixelSpacing[0], the distance between rows; column spacing = PixelSpacing[1]; slice
distance). Slice ``k`` of ``volume`` (shape slices × rows × columns, *stored* values) lies at
``origin_lps + offsets[k] · normal``, normal = row direction × column direction.

This module computes the geometry on its own (it imports nothing from the reader), so reading
back what it writes is a real test of the reader.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)
from samtune import SamtuneError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to patient Left, columns to Posterior: normal +S
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # columns run to Inferior: normal -P (anterior)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# What write_series can encode here: uncompressed, RLE (pydicom itself), JPEG 2000 lossless (pylibjpeg +
# pylibjpeg-openjpeg), JPEG-LS lossless (pyjpegls). Lossy syntaxes are left out on purpose: the reader's
# tests compare voxel values exactly. JPEG Lossless Process 14 has no encoder in pydicom 3.
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class SeriesIds:
    """Who and what a series belongs to. UIDs derive from ``seed`` (the same seed, the same UIDs),
    so two series of one study share ``study_uid`` and ``frame_of_reference_uid`` by sharing ids."""

    seed: str = "samtune"
    patient_id: str = "SAMTUNE-0001"
    patient_name: str = "Phantom^Synthetic"
    study_description: str = "Synthetic abdomen"
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    date: str = "20240102"  # StudyDate/SeriesDate/ContentDate (DA: YYYYMMDD)
    extra: dict = field(default_factory=dict)  # any further top-level keyword -> value

    def uid(self, *parts) -> str:
        return generate_uid(entropy_srcs=[self.seed, *map(str, parts)])

    def study(self) -> str:
        return self.study_uid or self.uid("study")

    def frame_of_reference(self) -> str:
        return self.frame_of_reference_uid or self.uid("frame-of-reference")


def slice_positions(n_slices, *, spacing_mm, orientation, origin_lps, slice_offsets_mm=None, gantry_tilt_deg=0.0):
    """ImagePositionPatient of each slice (n × 3, LPS mm). ``slice_offsets_mm``: distance of each
    slice from the origin along the normal (default ``k · spacing_mm[2]``); ``gantry_tilt_deg`` shears
    the stack: slice ``k`` also moves ``offset · tan(tilt)`` along the column direction, as a CT
    scanner with a tilted gantry writes it (positions follow the table, planes follow the gantry)."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    offsets = np.arange(n_slices) * spacing_mm[2] if slice_offsets_mm is None else np.asarray(slice_offsets_mm, float)
    if offsets.shape != (n_slices,):
        raise SamtuneError(f"slice_offsets_mm: {offsets.shape[0]} offsets for {n_slices} slices; give one per slice.")
    shear = np.tan(np.radians(gantry_tilt_deg)) * offsets
    return np.asarray(origin_lps, float) + offsets[:, None] * normal + shear[:, None] * col_dir


def _ds_number(value: float) -> str:
    """A DS (decimal string, at most 16 characters) that keeps ~1e-6 mm: positions round-trip exactly
    enough for the 1e-4 mm comparisons the tests make."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _common(ds: Dataset, ids: SeriesIds, modality: str, series_uid: str, description: str, series_number: int) -> None:
    """Patient, General Study, General Series, Frame of Reference and General Equipment modules."""
    ds.PatientName, ds.PatientID = ids.patient_name, ids.patient_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "", "O", ""
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = ids.study(), "1", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ids.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.StudyDescription, ds.ReferringPhysicianName = ids.study_description, ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
    ds.SeriesDescription, ds.BodyPartExamined, ds.PatientPosition = description, "ABDOMEN", "HFS"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids.frame_of_reference(), ""
    ds.Manufacturer, ds.ManufacturerModelName = "samtune", "synthetic_dicom"
    ds.InstanceCreationDate, ds.InstanceCreationTime = datetime.date.today().strftime("%Y%m%d"), "120000"
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in ids.extra.items():
        setattr(ds, keyword, value)


def _acquisition(ds: Dataset, modality: str, thickness: float) -> None:
    """CT Image / MR Image module attributes of types 1 and 2 (PS3.3 C.8.2.1, C.8.3.1)."""
    ds.SliceThickness = _ds_number(thickness)
    ds.AcquisitionNumber = 1
    if modality == "CT":
        ds.KVP, ds.ConvolutionKernel, ds.XRayTubeCurrent = "120", "STANDARD", 200
        return
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime = "2D", "500", "15"
    ds.EchoTrainLength, ds.MagneticFieldStrength, ds.ImagingFrequency = 1, "1.5", "63.87"
    ds.SpacingBetweenSlices = _ds_number(thickness)


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID, meta.ImplementationClassUID = UID(transfer_syntax), PYDICOM_IMPLEMENTATION_UID
    return meta


def _pixels(ds: Dataset, frames: np.ndarray, transfer_syntax: str, where: str) -> None:
    """Pixel data (one frame or frames × rows × columns) as 16-bit MONOCHROME2, encoded in ``transfer_syntax``."""
    # sets Rows, Columns, BitsAllocated/Stored, HighBit, PixelRepresentation (from the dtype), NumberOfFrames
    ds.set_pixel_data(frames, "MONOCHROME2", 16, generate_instance_uid=False)
    if UID(transfer_syntax).is_compressed:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        except (RuntimeError, ValueError) as exc:  # pydicom: no encoder plugin / data it cannot encode
            raise SamtuneError(f"{where}: cannot encode as {UID(transfer_syntax).name} here ({exc}); "
                               f"install the codec packages (pip install \"samtune[dicom-codecs]\" pyjpegls) "
                               f"or choose one of {[UID(u).name for u in TRANSFER_SYNTAXES]}.") from None
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)


def _check_volume(volume, modality, transfer_syntax, where) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype not in (np.int16, np.uint16):
        raise SamtuneError(f"{where}: the volume must be slices × rows × columns of int16 or uint16 stored values, "
                           f"not {volume.dtype} of shape {volume.shape}; cast it with volume.astype(np.int16).")
    if modality not in _SOP_CLASS:
        raise SamtuneError(f"{where}: modality {modality!r} is not written here; use 'CT' or 'MR'.")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise SamtuneError(f"{where}: transfer syntax {transfer_syntax} is not offered; use one of "
                           f"{[f'{UID(u)} ({UID(u).name})' for u in TRANSFER_SYNTAXES]}.")
    return volume


def _names(file_names, n: int, seed: str) -> list[str]:
    """Given names, else random-looking hex names without a suffix (as PACS exports name files)."""
    if file_names is not None:
        if len(file_names) != n:
            raise SamtuneError(f"file_names: {len(file_names)} names for {n} slices; give one per slice.")
        return [str(name) for name in file_names]
    return [hashlib.sha1(f"{seed}/{k}".encode()).hexdigest()[:16].upper() for k in range(n)]


def write_series(folder, volume, *, spacing_mm=(0.8, 0.7, 2.5), orientation=AXIAL, origin_lps=(0.0, 0.0, 0.0),
                 modality="CT", rescale=(1.0, -1024.0), transfer_syntax=ExplicitVRLittleEndian, ids=None,
                 series_uid=None, description="synthetic", series_number=1, file_names=None,
                 slice_offsets_mm=None, gantry_tilt_deg=0.0) -> list[Path]:
    """Write ``volume`` (slices × rows × columns of stored int16/uint16 values) as a single-frame
    CT or MR series, one file per slice, and return the paths in slice order (k = 0 first).

    ``rescale`` = (RescaleSlope, RescaleIntercept): real value = stored · slope + intercept (HU for CT).
    ``series_uid`` defaults to one derived from ``ids.seed`` and ``description``.
    """
    ids = ids or SeriesIds()
    folder = Path(folder)
    volume = _check_volume(volume, modality, transfer_syntax, folder)
    series_uid = series_uid or ids.uid("series", description, series_number)
    positions = slice_positions(len(volume), spacing_mm=spacing_mm, orientation=orientation, origin_lps=origin_lps,
                                slice_offsets_mm=slice_offsets_mm, gantry_tilt_deg=gantry_tilt_deg)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(_names(file_names, len(volume), series_uid)):
        sop_instance = ids.uid("instance", series_uid, k)
        ds = Dataset()
        ds.file_meta = _file_meta(_SOP_CLASS[modality], sop_instance, transfer_syntax)
        ds.SOPClassUID, ds.SOPInstanceUID = _SOP_CLASS[modality], sop_instance
        _common(ds, ids, modality, series_uid, description, series_number)
        _acquisition(ds, modality, spacing_mm[2])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds_number(v) for v in orientation]
        ds.SliceLocation = _ds_number(float(positions[k] @ normal))
        ds.PixelSpacing = [_ds_number(spacing_mm[0]), _ds_number(spacing_mm[1])]
        if gantry_tilt_deg and modality == "CT":
            ds.GantryDetectorTilt = _ds_number(gantry_tilt_deg)
        if modality == "CT" or tuple(rescale) != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = _ds_number(rescale[0]), _ds_number(rescale[1])
            ds.RescaleType = "HU" if modality == "CT" else "US"
        _pixels(ds, np.ascontiguousarray(volume[k]), transfer_syntax, folder / name)
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def _functional_groups(spacing_mm, orientation, rescale, positions, frame_order) -> tuple[Dataset, list[Dataset]]:
    """Enhanced CT functional groups (PS3.3 C.7.6.16): pixel measures, plane orientation and the value
    transformation are shared; each frame has its plane position and frame content (stack position)."""
    measures, plane, value = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [_ds_number(spacing_mm[0]), _ds_number(spacing_mm[1])]
    measures.SliceThickness = _ds_number(spacing_mm[2])
    plane.ImageOrientationPatient = [_ds_number(v) for v in orientation]
    value.RescaleSlope, value.RescaleIntercept, value.RescaleType = _ds_number(rescale[0]), _ds_number(rescale[1]), "HU"
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelValueTransformationSequence = DicomSequence([value])
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    per_frame = []
    for k in frame_order:
        position, content = Dataset(), Dataset()
        position.ImagePositionPatient = [_ds_number(v) for v in positions[k]]
        content.StackID, content.InStackPositionNumber = "1", int(k) + 1
        content.DimensionIndexValues = [1, int(k) + 1]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([position])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    return shared, per_frame


def _dimensions(ds: Dataset, organization_uid: str) -> None:
    """Multi-frame Dimension Module: frames indexed by (stack, position in stack), PS3.3 C.7.6.17."""
    org = Dataset()
    org.DimensionOrganizationUID = organization_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    ds.DimensionIndexSequence = DicomSequence()
    frame_content = 0x00209111  # FrameContentSequence: holds StackID (0020,9056), InStackPositionNumber (0020,9057)
    for index_tag in (0x00209056, 0x00209057):
        item = Dataset()
        item.DimensionOrganizationUID, item.DimensionIndexPointer = organization_uid, index_tag
        item.FunctionalGroupPointer = frame_content
        ds.DimensionIndexSequence.append(item)


def write_enhanced_ct(path, volume, *, spacing_mm=(0.8, 0.7, 2.5), orientation=AXIAL, origin_lps=(0.0, 0.0, 0.0),
                      rescale=(1.0, -1024.0), transfer_syntax=ExplicitVRLittleEndian, ids=None, series_uid=None,
                      description="synthetic enhanced", series_number=2, frame_order=None,
                      slice_offsets_mm=None) -> Path:
    """Write ``volume`` (slices × rows × columns, stored int16/uint16) as one Enhanced CT Image file.
    ``frame_order``: which slice each frame holds (default 0..n-1); a shuffled order tests that a
    reader sorts frames by their PlanePositionSequence rather than trusting the frame order."""
    ids, path = ids or SeriesIds(), Path(path)
    volume = _check_volume(volume, "CT", transfer_syntax, path)
    frame_order = list(range(len(volume))) if frame_order is None else [int(k) for k in frame_order]
    if sorted(frame_order) != list(range(len(volume))):
        raise SamtuneError(f"{path}: frame_order must be a permutation of 0..{len(volume) - 1}.")
    series_uid = series_uid or ids.uid("series", description, series_number)
    positions = slice_positions(len(volume), spacing_mm=spacing_mm, orientation=orientation, origin_lps=origin_lps,
                                slice_offsets_mm=slice_offsets_mm)
    sop_instance = ids.uid("enhanced", series_uid)
    ds = Dataset()
    ds.file_meta = _file_meta(EnhancedCTImageStorage, sop_instance, transfer_syntax)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, sop_instance
    _common(ds, ids, "CT", series_uid, description, series_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber, ds.AcquisitionNumber, ds.KVP = 1, 1, "120"
    ds.ContentQualification, ds.BurnedInAnnotation, ds.LossyImageCompression = "PRODUCT", "NO", "00"
    ds.PresentationLUTShape, ds.AcquisitionDateTime = "IDENTITY", ids.date + "120000"
    shared, per_frame = _functional_groups(spacing_mm, orientation, rescale, positions, frame_order)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _dimensions(ds, ids.uid("dimensions", series_uid))
    _pixels(ds, np.ascontiguousarray(volume[frame_order]), transfer_syntax, path)
    ds.NumberOfFrames = len(volume)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def rotation_orientation(axis: str, degrees: float, base: Sequence[float] = AXIAL) -> tuple[float, ...]:
    """``base`` orientation rotated by ``degrees`` about the LPS axis ``axis`` ("x", "y" or "z"):
    oblique series for tests (the right-hand rule in LPS)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i = "xyz".index(axis)
    a, b = [n for n in range(3) if n != i]
    rot = np.eye(3)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    row, col = rot @ np.asarray(base[:3], float), rot @ np.asarray(base[3:], float)
    return tuple(float(v) for v in (*row, *col))
