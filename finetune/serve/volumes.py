"""Volume files crossing the wire: uploads received with a size cap and checked before use, and
label answers written on the input image's grid as NIfTI or NRRD (``result_extension``).

Viewers upload what they hold: 3D Slicer's MONAI Label module saves the volume as ``.nii.gz`` by
default (its "File Extension" setting may say ``.nrrd``); OHIF sends NIfTI. An NRRD upload is
converted to NIfTI once, so everything after the edge reads one format. NRRD's ``space
directions`` are the columns of the NIfTI affine (one row per voxel axis) and ``space origin`` its
translation, in RAS (``right-anterior-superior``) or LPS (x and y negated) — NRRD format spec,
teem.sourceforge.net/nrrd/format.html. pynrrd reads and writes the files (a maintained library;
nibabel has no NRRD support).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samtune.finetune.serve.errors import BadRequest, TooLarge
from samtune.finetune.serve.paths import temp_in

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
RESULT_EXTENSIONS = (".nii.gz", ".nrrd")
_LPS = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS: x and y change sign


def suffix_of(name: str | None, field: str) -> str:
    name = (name or "upload.nii.gz").lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise BadRequest(field, f"{name!r}: send a NIfTI (.nii.gz, .nii) or NRRD (.nrrd) volume")


def receive(stream, filename: str | None, folder: Path, limit_bytes: int, field: str) -> Path:
    """Copy an upload into a temporary file in ``folder`` (at most ``limit_bytes``), then check it
    is a readable 3D volume; returns a NIfTI path (NRRD converted). Nothing is left on failure."""
    suffix = suffix_of(filename, field)
    tmp = temp_in(folder, suffix)
    try:
        size = 0
        with open(tmp, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > limit_bytes:
                    raise TooLarge(field, f"larger than the server's limit of {limit_bytes // 2**20} MiB (samtune serve --max-upload-mb)")
                out.write(chunk)
        return check_volume(tmp, field)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_volume(path: Path, field: str) -> Path:
    """A readable 3D (or single-volume 4D) numeric volume -> its NIfTI path (NRRD converted in place)."""
    import nibabel as nib

    try:
        if path.name.endswith(".nrrd"):
            return _nrrd_to_nifti(path, field)
        image = nib.load(str(path))
        shape = image.shape
    except BadRequest:
        raise
    except Exception as exc:  # nibabel raises several types for a damaged or foreign file
        raise BadRequest(field, f"not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise BadRequest(field, f"a 3D volume is needed, got shape {shape}")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise BadRequest(field, "its affine is singular or not finite; fix the header (sform/qform)")
    return path


def _nrrd_to_nifti(path: Path, field: str) -> Path:
    import nibabel as nib
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise BadRequest(field, f"not a readable NRRD volume ({type(exc).__name__}: {exc})") from None
    if data.ndim != 3:
        raise BadRequest(field, f"a 3D volume is needed, got shape {data.shape}")
    directions = np.asarray(header.get("space directions", np.eye(3)), float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), float)
    if space in ("left-posterior-superior", "lps"):
        affine[:3] = _LPS @ affine[:3]
    elif space not in ("right-anterior-superior", "ras"):
        raise BadRequest(field, f"NRRD space {space!r}: only RAS and LPS volumes are read")
    out = path.with_name(path.name[: -len(".nrrd")] + ".nii.gz")
    nib.save(nib.Nifti1Image(data, affine), str(out))
    path.unlink(missing_ok=True)
    return check_volume(out, field)


def write_result(values: np.ndarray, reference: Path, target: Path) -> Path:
    """A label (file voxel order of ``reference``) on the reference's grid, as ``target``'s
    extension says (.nii.gz: header copied from the reference; .nrrd: its affine as RAS space)."""
    from samtune.datasets.nifti_geometry import write_label_like

    if target.name.endswith(".nrrd"):
        import nibabel as nib
        import nrrd

        affine = nib.load(str(reference)).affine
        header = {"space": "right-anterior-superior", "space directions": affine[:3, :3].T, "space origin": affine[:3, 3],
                  "kinds": ["domain"] * 3, "encoding": "gzip"}  # fmt: skip
        nrrd.write(str(target), np.ascontiguousarray(values.astype(np.uint8)), header)
        return target
    return write_label_like(values, reference, target)
