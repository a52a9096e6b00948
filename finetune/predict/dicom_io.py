"""``samtune predict`` on DICOM series, as PACS exports them, with DICOM-SEG out.

An ``--input`` folder that holds no NIfTI file is searched for DICOM image series (any file names,
non-DICOM files skipped; ``samtune.datasets.dicom_series``); one series per folder, chosen by
``--series UID`` when the folder holds several. The series is read once as a RAS volume and
handed to the same volume prediction as a NIfTI scan (written to a temporary ``.nii`` in the
output folder, removed afterwards), so a patient predicted from its DICOM series and from its NIfTI
conversion gets the same label on the same grid. Outputs (``--output-format``):

- ``nifti``: ``<name>.nii.gz`` (+ ``.json``, ``.ctbl``, ``_itksnap.txt``) on the series' grid;
- ``dicom-seg``: ``<name>.seg.dcm``, a DICOM-SEG referencing the series' instances, one segment per
  class with its codes (``samtune.datasets.dicom_seg``), and the ``.json`` summary;
- ``both`` (the default for DICOM inputs).

Voxel prompts (``--prompts`` with ``"coordinates": "voxel"``) index the volume as samtune reads
the series: i = column, j = row, k = slice in order along the slice normal (the NIfTI output's
voxel indices).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from samtune import SamtuneError
from samtune.datasets.nifti import NIFTI_SUFFIXES

OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
SEG_SUFFIX = ".seg.dcm"
NIFTI_ONLY = (".nii.gz", ".ctbl", "_itksnap.txt")  # what --output-format dicom-seg leaves out


@dataclass(frozen=True)
class DicomInput:
    folder: Path  # as given on the command line
    info: object  # samtune.datasets.dicom_series.SeriesInfo
    name: str  # output file stem


def split_dicom_inputs(inputs: list[str], series_uid: str | None) -> tuple[list[DicomInput], list[str]]:
    """(DICOM series folders, every other input): a folder without NIfTI files that holds DICOM
    image series is read as DICOM."""
    from samtune.datasets.dicom_series import choose_series, find_series

    dicom, rest = [], []
    for item in inputs:
        folder = Path(item)
        if not folder.is_dir() or any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.rglob("*")):
            rest.append(item)
            continue
        found, skipped = find_series(folder)
        if not found:  # neither NIfTI nor DICOM images: the NIfTI listing names the empty folder
            rest.append(item)
            continue
        info = choose_series(found, series_uid, where=str(folder), skipped=skipped)
        dicom.append(DicomInput(folder, info, folder.resolve().name))
    if series_uid is not None and not dicom:
        raise SamtuneError(f"--series {series_uid}: no --input is a folder of DICOM series; --series chooses a series in one.")
    names = [d.name for d in dicom]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SamtuneError(f"--input: several DICOM folders are named {', '.join(twice)}; their outputs would overwrite each other. Rename or predict them one at a time.")
    return dicom, rest


def check_output_format(output_format: str | None, dicom: list[DicomInput], others: list) -> str:
    """The format to write: ``both`` for DICOM inputs and ``nifti`` otherwise when not given;
    DICOM-SEG needs DICOM inputs."""
    if output_format is None:
        return "both" if dicom else "nifti"
    if output_format not in OUTPUT_FORMATS:
        raise SamtuneError(f"--output-format {output_format!r}: choose {', '.join(OUTPUT_FORMATS)}.")
    if output_format != "nifti" and others:
        raise SamtuneError(f"--output-format {output_format}: DICOM-SEG references the source DICOM series, and "
                           f"{others[0]} is not a DICOM folder; use --output-format nifti for NIfTI inputs.")  # fmt: skip
    return output_format


def predict_dicom(predictor, source_of, predict_volume, d: DicomInput, out: Path, output_format: str, resample: bool,
                  seg_type: str = "BINARY") -> dict:  # fmt: skip
    """Read the series, predict it as a volume (``predict_volume(source, path, input_label)``, with
    ``source_of(path)`` opening the temporary NIfTI), and write the outputs ``output_format`` asks for."""
    import nibabel as nib

    from samtune.datasets.dicom_series import read_series

    volume = read_series(d.info, resample=resample)
    if volume.resampled and output_format != "nifti":
        raise SamtuneError(f"{d.folder}: the series was resampled (--resample), so its slices no longer match the source "
                           "instances a DICOM-SEG must reference; use --output-format nifti, or predict without --resample.")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".samtune-dicom-"))
    try:
        path = tmp / f"{d.name}.nii"
        nib.save(volume.image, str(path))
        record = predict_volume(source_of(path), path, f"{d.folder} (series {d.info.uid})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label_path = out / f"{d.name}.nii.gz"
    if output_format != "nifti":
        record["dicom_seg"] = str(write_prediction_seg(predictor, volume, label_path, out / f"{d.name}{SEG_SUFFIX}", seg_type))
        record["summary"] += f" and {record['dicom_seg']}"
    if output_format == "dicom-seg":
        for suffix in NIFTI_ONLY:
            (out / f"{d.name}{suffix}").unlink(missing_ok=True)
    return record


def write_prediction_seg(predictor, volume, label_path: Path, target: Path, seg_type: str = "BINARY") -> Path:
    """The predicted label (read back from its NIfTI, which is on the series' grid in the same
    voxel order) as a DICOM-SEG: one segment per class, the checkpoint's codes, samtune named as
    the algorithm."""
    import nibabel as nib
    import numpy as np

    from samtune import __version__
    from samtune.datasets.dicom_seg import write_seg

    label = np.asanyarray(nib.load(str(label_path)).dataobj)
    checkpoint = Path(predictor.loaded.checkpoint)
    model = predictor.loaded.recipe.model.name
    return write_seg(label, volume.sources, predictor.classes, target, algorithm_version=__version__,
                     checkpoint=str(checkpoint), series_description=f"samtune {model} {checkpoint.name}",
                     segmentation_type=seg_type)  # fmt: skip
