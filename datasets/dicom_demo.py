"""The synthetic CT phantom as a PACS export: one DICOM CT series and its ground-truth DICOM-SEG per patient.

Why: ``samtune demo-data --kind dicom`` lets train -> predict -> DICOM-SEG run offline on data laid
out as hospitals hand it over (files without suffix, one folder per patient and series), and lets
a prediction be compared with a reference SEG on the very same series. The patients are those of
``synthetic.generate_ct_phantom`` with the same arguments (case ``i`` = ``phantom_{i:03d}`` =
``PHANTOM_{i:03d}``): the NIfTI phantom is generated into the temporary build folder and converted,
so the two demo sets can never drift apart.

Layout (``out_dir/DicomCTPhantom``): ``README.txt``; ``PHANTOM_000/CT/<16 hex>`` one file per slice
(CT Image Storage, stored = HU + 1024 with RescaleIntercept -1024, series "CT abdomen phantom");
``PHANTOM_000/SEG/<16 hex>`` the labels as a BINARY DICOM-SEG on that series, one segment per
class named as in the NIfTI ``dataset.json``, with its SNOMED CT code from ``label_codes``.

Geometry: NIfTI voxel axis i becomes the DICOM column index, j the row index, k the slice; the
affine's RAS columns, made LPS, give the row and column directions and spacings. A DICOM stack is
ordered along row × column direction; where the affine's k axis points the other way (a left-handed
voxel grid), the slices are written last-first, and a reader gives the volume back flipped in k.

Determinism and atomicity: UIDs derive from the seed and case (``SeriesIds``), dates are fixed, and
the random UIDs and clock times highdicom puts in a SEG are replaced, so a seed gives byte-identical
files. The tree is built with ``synthetic._build`` (hidden temp folder, renamed into place; only a
folder carrying the synthetic marker is ever replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pydicom
import samtune
from samtune import SamtuneError
from samtune.datasets import dicom_seg, dicom_series, label_codes, synthetic, synthetic_dicom
from samtune.datasets.synthetic import CT_DATASET_NAME

DICOM_DATASET_NAME = "DicomCTPhantom"
SERIES_DESCRIPTION = "CT abdomen phantom"
SEG_DESCRIPTION = "CT abdomen phantom ground truth"
SEG_ALGORITHM = "samtune phantom ground truth"
SEG_CONTENT = "Ground truth of the samtune synthetic CT phantom"  # LO: at most 64 characters
STUDY_DESCRIPTION = "CT abdomen (synthetic phantom)"
_DATE, _TIME = "20240102", "120000"  # every DA / TM of the export: fixed, so files do not change by day
_RESCALE = (1.0, -1024.0)  # stored = HU + 1024, as most CT scanners export
_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS: negate x and y
_TOL_MM = 1e-4


class SeriesGeometry(NamedTuple):
    """A NIfTI affine as DICOM image-plane attributes (see synthetic_dicom's conventions)."""

    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, column direction (LPS)
    spacing_mm: tuple[float, float, float]  # (PixelSpacing[0] = between rows, [1] = between columns, slices)
    origin_lps: tuple[float, float, float]  # ImagePositionPatient of the first slice written
    reversed: bool  # the affine's k axis runs against row × column: slices are written k = n-1 first


def series_geometry(affine, n_slices: int) -> SeriesGeometry:
    """DICOM geometry of a NIfTI grid (voxel i -> column, j -> row, k -> slice). Refuses affines a
    single-frame series cannot hold: sheared or degenerate ones (axes not orthogonal)."""
    lin = np.asarray(affine, float)[:3, :3] * _LPS[:, None]  # voxel -> LPS
    lengths = np.linalg.norm(lin, axis=0)
    if lengths.min() <= 0:
        raise SamtuneError(f"affine {np.asarray(affine).tolist()}: a voxel axis has zero length.")
    unit = lin / lengths
    if np.abs(unit.T @ unit - np.eye(3)).max() > 1e-4:  # DICOM planes stack along their normal
        raise SamtuneError(f"affine {np.asarray(affine).tolist()}: the voxel axes are not orthogonal (sheared grid); "
                           "a DICOM series cannot hold it. Resample the volume first.")  # fmt: skip
    reverse = bool(np.cross(unit[:, 0], unit[:, 1]) @ unit[:, 2] < 0)
    origin = np.asarray(affine, float)[:3, 3] * _LPS + (lin[:, 2] * (n_slices - 1) if reverse else 0.0)
    return SeriesGeometry(
        orientation=tuple(float(v) for v in (*unit[:, 0], *unit[:, 1])),
        spacing_mm=(float(lengths[1]), float(lengths[0]), float(lengths[2])),
        origin_lps=tuple(float(v) for v in origin), reversed=reverse,
    )  # fmt: skip


def _case_ids(seed: int, case: int) -> synthetic_dicom.SeriesIds:
    """Patient PHANTOM_{case}, one study; UIDs from (seed, case), so CT and SEG share study and frame."""
    return synthetic_dicom.SeriesIds(
        seed=f"samtune-dicom-phantom/{seed}/{case}", patient_id=f"PHANTOM_{case:03d}",
        patient_name=f"Phantom^Case{case:03d}", study_description=STUDY_DESCRIPTION, date=_DATE,
        extra={"InstanceCreationDate": _DATE, "InstitutionName": "samtune synthetic data"},
    )  # fmt: skip


def _write_ct(folder: Path, image: nib.Nifti1Image, ids) -> tuple[dicom_series.DicomVolume, bool]:
    """The CT series of one case, read back with the reader: its headers are what the SEG references."""
    hu = np.asarray(image.dataobj)
    geo = series_geometry(image.affine, hu.shape[2])
    stored = (hu.astype(np.int32) - int(_RESCALE[1])).astype(np.int16)  # HU + 1024: 0..4095
    frames = stored.transpose(2, 1, 0)  # (i, j, k) -> slices × rows × columns
    synthetic_dicom.write_series(
        folder, frames[::-1] if geo.reversed else frames, spacing_mm=geo.spacing_mm, orientation=geo.orientation,
        origin_lps=geo.origin_lps, modality="CT", rescale=_RESCALE, ids=ids, description=SERIES_DESCRIPTION,
        series_number=2,  # 1 is where a scanner puts its scout
    )  # fmt: skip
    found, skipped = dicom_series.find_series(folder)
    volume = dicom_series.read_series(dicom_series.choose_series(found, where=str(folder), skipped=skipped))
    return volume, geo.reversed


def _check_same(volume: dicom_series.DicomVolume, image: nib.Nifti1Image, reverse: bool) -> None:
    """A contract, not a statistic: the DICOM read back is the NIfTI case (k flipped when reversed)."""
    data, affine = np.asarray(image.dataobj), image.affine
    if reverse:
        flip_k = nib.affines.from_matvec(np.diag([1, 1, -1]), [0, 0, data.shape[2] - 1])
        data, affine = data[:, :, ::-1], affine @ flip_k
    got = np.asarray(volume.image.dataobj)
    same_grid = np.allclose(volume.image.affine, affine, atol=_TOL_MM)
    if got.shape != data.shape or not np.array_equal(got, data) or not same_grid:
        raise RuntimeError(f"{volume.info.label()}: the series read back differs from the NIfTI phantom case")


def _reproducible(path: Path, ids, number: str) -> None:
    """Replace the SEG's random UIDs (series, instance, dimension organisation) by ones derived from
    the case, and its clock dates/times by the export's: the same seed, the same bytes."""
    ds = pydicom.dcmread(path)
    own = {ds.SOPInstanceUID: ids.uid("seg-instance", number), ds.SeriesInstanceUID: ids.uid("seg-series", number)}
    own.update({str(item.DimensionOrganizationUID): ids.uid("seg-dimensions", number)
                for item in ds.get("DimensionOrganizationSequence", [])})  # fmt: skip
    fixed = {"DA": _DATE, "TM": _TIME, "DT": _DATE + _TIME}

    def settle(dataset, element) -> None:
        if element.VR == "UI" and str(element.value) in own:
            element.value = own[str(element.value)]
        elif element.VR in fixed and element.value:
            element.value = fixed[element.VR]

    ds.walk(settle)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ContentDescription = SEG_CONTENT  # write_seg describes a model's output
    ds.ManufacturerModelName = "samtune.datasets.dicom_demo"
    ds.save_as(path, enforce_file_format=True)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Raise one logger to WARNING for a block, then restore its level."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_seg(folder: Path, label: np.ndarray, volume, classes, ids, seed: int) -> Path:
    """The ground truth as a BINARY DICOM-SEG on the case's CT series."""
    name = hashlib.sha1(ids.uid("seg-instance", 1).encode()).hexdigest()[:16].upper()  # as the CT files: no suffix
    with _quiet("highdicom"):  # it logs each module it copies at INFO: 9 lines per case, none to act on
        path = dicom_seg.write_seg(
            label, volume.sources, classes, folder / name, algorithm_version=samtune.__version__,
            checkpoint=f"none (generated, seed {seed})", algorithm_name=SEG_ALGORITHM,
            series_description=SEG_DESCRIPTION,
        )  # fmt: skip
    _reproducible(path, ids, "1")
    return path


def _classes(dataset_json: Path) -> list[label_codes.LabelClass]:
    """The phantom's classes (dataset.json names and values) with their SNOMED CT codes."""
    labels = {name: int(value) for name, value in json.loads(dataset_json.read_text())["labels"].items() if int(value)}
    codes = label_codes.resolve_codes(labels)
    return [label_codes.LabelClass(value, name, codes[name]) for name, value in labels.items()]


def _readme(n_cases, shape, spacing_mm, seed, classes) -> str:
    segments = "".join(f"\n          {c.value} {c.name}: {c.code}" for c in classes)
    return f"""samtune synthetic abdominal CT phantom, as a PACS export would look (DICOM)

Generated by samtune.datasets.dicom_demo (samtune demo-data --kind dicom), seed {seed}.
Not patient data: every image is computed. Same patients as {CT_DATASET_NAME} generated with the
same arguments: PHANTOM_000 here is phantom_000 there, voxel for voxel.

{n_cases} patient folder(s), PHANTOM_000 ... PHANTOM_{n_cases - 1:03d}, each one study with
  CT/   the image series "{SERIES_DESCRIPTION}": {shape[2]} slices of {shape[1]} rows x {shape[0]} columns,
        {spacing_mm[0]} x {spacing_mm[1]} mm pixels, {spacing_mm[2]} mm slices; one file per slice, no suffix;
        stored value = HU + 1024 (RescaleIntercept -1024)
  SEG/  the ground-truth labels as a DICOM-SEG (BINARY) referencing that series, algorithm
        "{SEG_ALGORITHM}"; segments (class value, name in dataset.json, SNOMED CT code):{segments}

Use: `samtune predict --input PHANTOM_000/CT ...` writes a DICOM-SEG on the same series, to compare
with PHANTOM_000/SEG. Other files here (README.txt, .samtune_synthetic) are not DICOM; readers skip them.
"""


def generate_dicom_phantom(out_dir, n_cases=8, shape=(128, 128, 32), spacing_mm=(3.0, 3.0, 5.0), seed=0) -> Path:
    """Write ``out_dir/DicomCTPhantom`` (see the module docstring) and return that folder. Arguments
    as ``synthetic.generate_ct_phantom``, whose cases these are: ``shape`` is voxels (x, y, z), at
    least (40, 40, 10); ``spacing_mm`` mm per voxel."""

    def write(tmp: Path) -> None:
        nifti = synthetic.generate_ct_phantom(tmp / ".nifti", n_cases=n_cases, shape=shape,
                                              spacing_mm=spacing_mm, seed=seed)  # fmt: skip
        classes = _classes(nifti / "dataset.json")
        root = tmp / DICOM_DATASET_NAME
        for case in range(n_cases):
            image = nib.load(nifti / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz")
            label = np.asarray(nib.load(nifti / "labelsTr" / f"phantom_{case:03d}.nii.gz").dataobj)
            ids, patient = _case_ids(seed, case), root / f"PHANTOM_{case:03d}"
            volume, reverse = _write_ct(patient / "CT", image, ids)
            _check_same(volume, image, reverse)
            _write_seg(patient / "SEG", label[:, :, ::-1] if reverse else label, volume, classes, ids, seed)
        (root / "README.txt").write_text(_readme(n_cases, shape, spacing_mm, seed, classes))
        (root / synthetic._MARKER).write_text(json.dumps({"kind": "dicom", "seed": seed}) + "\n")

    synthetic._build(out_dir, [DICOM_DATASET_NAME], write)
    return Path(out_dir) / DICOM_DATASET_NAME
