"""Predictions back onto the scan: display slices -> the original NIfTI file's voxel grid and header,
and prompt points (voxel indices or world millimetres) -> display pixels.

``volume.py`` turns a scan into display slices in three steps; each is undone (labels) or
followed (points) here:

1. closest canonical orientation: the voxel array is flipped and its axes permuted into RAS+ order,
   ``apply_orientation(data, io_orientation(affine))``, as ``nibabel.as_closest_canonical``. Only
   whole-axis flips and permutations, never interpolation, so the inverse is exact;
2. display layout (``to_display``): canonical X×Y×Z -> Z×H×W with H = Y reversed (rows run
   anterior to posterior) and W = X (columns along +x);
3. optionally in-plane resampling to ``data.spacing_mm`` (``resample_in_plane``): OpenCV aligns
   pixel areas, so display pixel ``r'`` of ``H'`` is centred on canonical row ``(r' + 0.5) H / H' - 0.5``.

World points: NIfTI world coordinates are RAS millimetres; DICOM/ITK use LPS (x and y negated).
A point goes to voxel indices through the inverse of the file's affine, nibabel's choice of
sform (code > 0), else qform, as ``read_case`` uses it for the orientation.

Labels are written with the reference's header copied field for field (sform and qform matrices
and codes, pixdim, units, dim_info), so any viewer overlays them on the scan exactly; only the
fields that describe voxel values change (shape, dtype, scaling, intent, cal_min/max, description).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from samtune import SamtuneError

_RAS = np.array([[0, 1], [1, 1], [2, 1]], float)  # nibabel orientation of a canonical (RAS+) array
_TO_RAS = {"RAS": np.array([1.0, 1.0, 1.0]), "LPS": np.array([-1.0, -1.0, 1.0])}  # and back: the same signs


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (3×2) taking the file's voxel axes to the closest RAS+ order: row ``a`` is
    (canonical axis of file axis ``a``, 1 kept or -1 reversed), exactly as ``as_closest_canonical``."""
    from nibabel.orientations import io_orientation

    return io_orientation(affine)


def label_dtype(label: np.ndarray) -> np.dtype:
    """The integer dtype a label map is stored as: uint8 up to 255, else int16, else uint16."""
    label = np.asarray(label)
    if label.dtype.kind not in "biu":
        raise ValueError(f"a label map must hold integers, not {label.dtype}")
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"label values {lo}..{hi} do not fit a label map (0..65535)")
    return np.dtype(np.uint8 if hi <= 255 else np.int16 if hi <= 32767 else np.uint16)


class _Grid(NamedTuple):
    path: Path
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm, as nibabel chooses it (sform, else qform)
    shape: tuple[int, int, int]  # the file's first three axes
    ornt: np.ndarray  # file -> canonical
    canonical: tuple[int, int, int]  # x, y, z
    zhw: tuple[int, int, int]  # display slices as cached (in-plane size after resampling)


def _load(reference_path):
    import nibabel as nib

    path = Path(reference_path)
    try:
        img = nib.load(str(path))  # lazy: the header only
    except FileNotFoundError:
        raise SamtuneError(f"{path}: the scan is missing; predictions are written onto the scan they were made from.") from None
    except Exception as exc:  # noqa: BLE001  (nibabel raises several types for files that are not NIfTI)
        raise SamtuneError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(img, nib.Nifti1Pair) or len(img.shape) < 3:  # Nifti1Image and Nifti2Image included
        raise SamtuneError(f"{path}: expected a 3D (or 4D) NIfTI scan, found {type(img).__name__} of shape {img.shape}.")
    return img


def _grid(reference_path, meta: dict) -> _Grid:
    img = _load(reference_path)
    path = Path(reference_path)
    shape = tuple(int(n) for n in img.shape[:3])
    ornt = canonical_ornt(img.affine)
    if np.isnan(ornt).any():
        raise SamtuneError(f"{path}: the affine is degenerate (a voxel axis has no direction); fix the header's sform/qform.")
    canonical = [0, 0, 0]
    for axis in range(3):
        canonical[int(ornt[axis, 0])] = shape[axis]
    canonical = tuple(canonical)
    if tuple(meta["original_shape"]) != canonical:
        raise SamtuneError(
            f"{path}: this scan is {canonical[0]}×{canonical[1]}×{canonical[2]} voxels (x, y, z canonical) but the "
            f"prediction was made on one of {'×'.join(map(str, meta['original_shape']))}; pass the scan it was made from."
        )
    zhw = tuple(int(n) for n in meta.get("shape_zhw", (canonical[2], canonical[1], canonical[0])))
    return _Grid(path, np.asarray(img.affine, float), shape, ornt, canonical, zhw)


def display_to_file_order(label_zhw: np.ndarray, reference_path, meta: dict) -> np.ndarray:
    """A Z×H×W label in display layout (at ``meta["shape_zhw"]``) -> the same label in the reference
    file's voxel order and (first three axes') shape, dtype from ``label_dtype``. Reads the header only."""
    from nibabel.orientations import apply_orientation, ornt_transform

    grid = _grid(reference_path, meta)
    label = np.asarray(label_zhw)
    if label.shape != grid.zhw:
        raise ValueError(f"label of shape {label.shape} for display slices of shape {grid.zhw} ({grid.path})")
    label = label.astype(label_dtype(label), copy=False)
    x, y, _ = grid.canonical
    if label.shape[1:] != (y, x):  # undo the in-plane resampling, pixel centres aligned as cv2 did it
        label = np.stack([cv2.resize(plane, (x, y), interpolation=cv2.INTER_NEAREST_EXACT) for plane in label])
    canonical = label[:, ::-1, :].transpose(2, 1, 0)  # undo to_display: rows back to +y, Z×H×W -> X×Y×Z
    # Fortran order: NIfTI stores i fastest, so the writer streams it as it lies, and for the usual
    # orientations the copy reads the display slices in their own memory order (a C-order copy of a
    # 512×512×300 label transposed in memory took 1 s of a 1.6 s serve click on a 2-core CPU)
    return np.asfortranarray(apply_orientation(canonical, ornt_transform(_RAS, grid.ornt)))


def write_label_like(label_file_order: np.ndarray, reference_path, out_path) -> Path:
    """Write a label map in the reference's voxel order as a NIfTI file on the reference's grid.

    The header is the reference's, field for field (sform/qform matrices and codes, pixdim,
    xyzt_units, dim_info, slice timing), in the same NIfTI version; for a 4D reference the output
    is 3D (pixdim[4:] 1, time units and toffset cleared). Changed: dtype (``label_dtype``), scaling
    (none: slope 1, intercept 0), intent NIFTI_INTENT_LABEL, cal_min/max 0..max label, description;
    header extensions are not carried over. Always little-endian. ``.nii.gz`` suffix: compressed.
    Written through a temporary file in the same folder, renamed into place."""
    import nibabel as nib

    out = Path(out_path)
    suffix = ".nii.gz" if out.name.endswith(".nii.gz") else out.suffix
    if suffix not in (".nii", ".nii.gz"):
        raise SamtuneError(f"{out}: a label map is written as .nii or .nii.gz; change the output name.")
    ref = _load(reference_path)
    label = np.asarray(label_file_order)
    if label.shape != tuple(ref.shape[:3]):
        raise ValueError(f"label of shape {label.shape} for {reference_path} of shape {ref.shape[:3]}")
    dtype = label_dtype(label)
    klass = nib.Nifti2Image if isinstance(ref.header, nib.Nifti2Header) else nib.Nifti1Image
    # Every field of the reference, bit for bit, parsed from its bytes (extensions are separate).
    hdr = klass.header_class(ref.header.binaryblock, endianness=ref.header.endianness, check=False)
    if hdr.endianness != "<":
        hdr = hdr.as_byteswapped("<")
    pixdim = hdr["pixdim"].copy()
    hdr.set_data_shape(label.shape)  # also sets pixdim[4:] to 1
    if len(ref.shape) == 3:
        hdr["pixdim"] = pixdim
    else:  # keep the spatial part only
        hdr["xyzt_units"] = int(hdr["xyzt_units"]) % 8
        hdr["toffset"] = 0.0
    hdr.set_data_dtype(dtype)
    hdr.set_intent("label")
    hdr["cal_min"], hdr["cal_max"] = 0.0, float(label.max()) if label.size else 0.0
    hdr["descrip"] = b"samtune prediction"
    hdr["aux_file"] = b""
    # affine None: nibabel leaves the header's sform/qform alone (an affine that differs from them is
    # written into both, codes changed); scl_slope/inter are reset, and integers are written unscaled
    # (the file stores slope 1, intercept 0).
    img = klass(np.asfortranarray(label, dtype=dtype), None, hdr)  # the file's own order: written as it lies
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")  # suffix: gzip or not
    try:
        img.to_filename(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _display_point(ijk: np.ndarray, grid: _Grid, what: str, extent: str) -> tuple[float, float, float]:
    """Continuous file voxel indices -> (z, row, col) of the display slices (after resampling)."""
    shape = np.asarray(grid.shape, float)
    if not np.all((ijk >= -0.5) & (ijk <= shape - 0.5)):  # a voxel reaches half a voxel past its centre
        raise SamtuneError(
            f"{what} lies outside {grid.path}: it falls at voxel ({', '.join(f'{v:.1f}' for v in ijk)}) of an image of "
            f"{grid.shape[0]}×{grid.shape[1]}×{grid.shape[2]} voxels ({extent}); check the point and its coordinate system."
        )
    canonical = np.empty(3)
    for axis, (to, flip) in enumerate(grid.ornt):
        canonical[int(to)] = ijk[axis] if flip > 0 else shape[axis] - 1 - ijk[axis]
    x, y, _ = grid.canonical
    _, h, w = grid.zhw
    row = (y - 1 - canonical[1] + 0.5) * h / y - 0.5  # rows are y reversed
    col = (canonical[0] + 0.5) * w / x - 0.5
    return float(canonical[2]), float(row), float(col)


def voxel_to_display(ijk, reference_path, meta: dict) -> tuple[float, float, float]:
    """A point in the reference file's voxel indices (i, j, k; fractions allowed) -> (z, row, col) in
    the display slices described by ``meta``. Outside the image: SamtuneError."""
    grid = _grid(reference_path, meta)
    point = np.asarray(ijk, float).reshape(3)
    extent = f"indices -0.5..{grid.shape[0] - 0.5}, -0.5..{grid.shape[1] - 0.5}, -0.5..{grid.shape[2] - 0.5}"
    return _display_point(point, grid, f"voxel point {tuple(point.tolist())}", extent)


def world_to_display(xyz_mm, system: str, reference_path, meta: dict) -> tuple[float, float, float]:
    """A point in world millimetres, ``system`` "RAS" (NIfTI, nibabel) or "LPS" (DICOM, ITK,
    SimpleITK: x and y negated) -> (z, row, col) in the display slices. Outside: SamtuneError."""
    if system not in _TO_RAS:
        raise ValueError(f"coordinate system {system!r}: choose RAS or LPS")
    grid = _grid(reference_path, meta)
    sign = _TO_RAS[system]
    point = np.asarray(xyz_mm, float).reshape(3)
    ijk = np.linalg.solve(grid.affine, np.append(point * sign, 1.0))[:3]
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in grid.shape], indexing="ij")).reshape(3, -1)
    world = (grid.affine[:3, :3] @ corners + grid.affine[:3, 3:]).T * sign
    extent = ", ".join(f"{a} {lo:.1f}..{hi:.1f}" for a, lo, hi in zip("xyz", world.min(0), world.max(0)))
    return _display_point(ijk, grid, f"point {tuple(point.tolist())} mm ({system})", f"{system} extent {extent} mm")
