"""Geometry of a DICOM image stack: each image's plane, the checks that the planes form a regular
volume, the voxel -> RAS affine (the one place where DICOM's LPS becomes NIfTI's RAS) and the
resampling of irregular stacks when the user asks for it.

Sources: DICOM PS3.3 C.7.6.2.1.1 (Image Position and Image Orientation (Patient)): the centre of
the pixel in column ``i``, row ``j`` of an image lies at, in LPS millimetres (+x patient Left,
+y Posterior, +z Superior),

    P(i, j) = ImagePositionPatient + i · PixelSpacing[1] · row_dir + j · PixelSpacing[0] · col_dir,

where ImageOrientationPatient = (row_dir, col_dir): row_dir is the direction along a row (the column
index grows), col_dir the direction down a column (the row index grows); PixelSpacing = (distance
between rows, distance between columns). Slices are stacked along normal = row_dir × col_dir.
Enhanced (multi-frame) images carry the same attributes in functional groups (PS3.3 C.7.6.16:
PlanePositionSequence per frame; PlaneOrientationSequence and PixelMeasuresSequence per frame or
shared). NIfTI's sform maps voxel (i, j, k) to RAS+ millimetres (nifti1.h), so x and y are negated.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from samtune import SamtuneError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient LPS -> NIfTI RAS: negate x and y
# Tolerances. Positions are decimal strings (DS) that scanners round to 2-6 decimals.
DUPLICATE_MM = 0.01  # two slices closer than this along the normal share one position
# a slice may sit 1% of the slice distance (at least 0.01 mm) off the regular grid
Z_TOL_FRACTION, Z_TOL_MM = 0.01, 0.01
GAP_FACTOR = 1.5  # a step over 1.5 × the median step is a gap (missing slices), not unevenness
TILT_TOL_FRACTION = 0.1  # in-plane drift under 0.1 pixel (at least 0.01 mm) changes no voxel visibly
COSINE_TOL = 1e-4  # direction cosines that differ by less are the same orientation (~0.006°)
SPACING_TOL_MM = 1e-4  # pixel spacings that differ by less are the same
RESAMPLE_HINT = ("or ask for resampling onto a regular grid (linear interpolation): `samtune predict --resample`, "
                 "or `data.resample: true` in a recipe")


class Plane(NamedTuple):
    """Where one image (a single-frame instance or one frame of a multi-frame instance) lies."""

    position: np.ndarray  # ImagePositionPatient, LPS mm: centre of the first pixel
    orientation: np.ndarray  # ImageOrientationPatient: row_dir (3) then col_dir (3)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    shape: tuple[int, int]  # (rows, columns)
    label: str  # for messages: "instance 12 (file 1A2B)" or "frame 7 of file 1A2B"


class Stack(NamedTuple):
    """Planes sorted along the slice normal, and how far they are from a regular grid."""

    order: np.ndarray  # plane indices, first slice (smallest height) first
    heights: np.ndarray  # mm along the normal from the first sorted slice
    offsets: np.ndarray  # K × 2: in-plane drift (along row_dir, col_dir) from the first sorted slice, mm
    spacing: float  # slice distance of the regular grid through the first and last slice, mm
    problems: list[str]  # tilt / gaps / uneven spacing; empty for a regular stack


def functional_group(ds, frame_item, keyword: str):
    """The first item of functional group sequence ``keyword`` for one frame: per-frame if the
    frame's item holds it, else shared (PS3.3 C.7.6.16); None when neither does."""
    for holder in (frame_item, *ds.get("SharedFunctionalGroupsSequence", [])):
        if holder is not None and keyword in holder and len(holder[keyword].value):
            return holder[keyword].value[0]
    return None


def plane_of(ds, label: str, frame_item=None, where: str = "") -> Plane:
    """The Plane of a single-frame image header, or of one frame (its PerFrameFunctionalGroups item).
    ``label`` names the image and ``where`` its series in messages."""
    position, orientation, measures = ds, ds, ds
    if frame_item is not None:
        position = functional_group(ds, frame_item, "PlanePositionSequence")
        orientation = functional_group(ds, frame_item, "PlaneOrientationSequence")
        measures = functional_group(ds, frame_item, "PixelMeasuresSequence")
    missing = [kw for kw, holder in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation),
                                     ("PixelSpacing", measures)) if holder is None or kw not in holder]
    if missing or "Rows" not in ds or "Columns" not in ds:
        place = f"{where}: " if where else ""
        raise SamtuneError(f"{place}{label}: no {', '.join(missing) or 'Rows/Columns'} in the header, so its place in "
                           "the patient is unknown (a screenshot, secondary capture or localizer?). Choose a CT/MR "
                           "series of slices with --series UID.")
    return Plane(np.array(position.ImagePositionPatient, float), np.array(orientation.ImageOrientationPatient, float),
                 tuple(float(v) for v in measures.PixelSpacing), (int(ds.Rows), int(ds.Columns)), label)


def slice_normal(orientation, where: str) -> np.ndarray:
    """row_dir × col_dir, after checking both are unit vectors at right angles (to 1e-3: DS rounding)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col)) > 1e-3:
        raise SamtuneError(f"{where}: ImageOrientationPatient {list(orientation)} is not two unit vectors at right "
                           "angles; the header is damaged. Re-export the series from PACS.")
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def common_plane(planes: list[Plane], where: str) -> Plane:
    """The first plane, after checking every plane has its orientation, pixel spacing and size: a
    stack mixing them is several series in one (resampling cannot fix that)."""
    first = planes[0]
    for plane in planes[1:]:
        spacing_change = np.abs(np.subtract(plane.pixel_spacing, first.pixel_spacing)).max()
        for what, differs in (
            ("orientation (ImageOrientationPatient)", np.abs(plane.orientation - first.orientation).max() > COSINE_TOL),
            ("pixel spacing (PixelSpacing)", spacing_change > SPACING_TOL_MM),
            ("image size (Rows × Columns)", plane.shape != first.shape),
        ):
            if differs:
                raise SamtuneError(
                    f"{where}: mixed {what}: {first.label} has {_describe(first, what)}, {plane.label} has "
                    f"{_describe(plane, what)}. One series must hold one stack of parallel, equal images; "
                    "split it (e.g. by acquisition) or export the reconstruction you want as its own series.")
    return first


def _describe(plane: Plane, what: str) -> str:
    if what.startswith("orientation"):
        return str([round(float(v), 5) for v in plane.orientation])
    return f"{plane.pixel_spacing} mm" if what.startswith("pixel") else f"{plane.shape[0]} × {plane.shape[1]}"


def build_stack(planes: list[Plane], where: str) -> Stack:
    """Sort the planes along the slice normal and measure the stack (common_plane first). Duplicate
    positions raise; tilt, gaps and uneven spacing are listed in ``problems`` (resampling fixes them)."""
    first = planes[0]
    normal = slice_normal(first.orientation, where)
    raw = np.array([p.position for p in planes]) @ normal
    order = np.argsort(raw, kind="stable")
    positions = np.array([planes[k].position for k in order])
    heights = (positions - positions[0]) @ normal
    drift = (positions - positions[0]) - heights[:, None] * normal
    offsets = np.stack([drift @ first.orientation[:3], drift @ first.orientation[3:]], axis=1)
    steps = np.diff(heights)
    duplicates = np.flatnonzero(steps < DUPLICATE_MM)
    if duplicates.size:
        s = duplicates[0]
        raise SamtuneError(
            f"{where}: {planes[order[s]].label} and {planes[order[s + 1]].label} lie at the same position "
            f"({raw[order[s]]:.3f} mm along the slice normal). The series holds several images per position "
            "(echoes, phases, time points or a repeated slice); export one volume per series, or remove the "
            "extra images.")
    if len(planes) == 1:
        return Stack(order, heights, offsets, float("nan"), [])
    spacing = float(heights[-1] / (len(planes) - 1))
    labels = [planes[k].label for k in order]
    gaps = _gaps(steps, labels)  # a gap also makes the spacing uneven: report the gap alone
    problems = _tilt(offsets, heights, first) + gaps + ([] if gaps else _uneven(heights, spacing, labels))
    return Stack(order, heights, offsets, spacing, problems)


def _tilt(offsets: np.ndarray, heights: np.ndarray, first: Plane) -> list[str]:
    tolerance = max(0.01, TILT_TOL_FRACTION * min(first.pixel_spacing))
    drift = np.linalg.norm(offsets, axis=1)
    if drift.max() <= tolerance:
        return []
    angle = np.degrees(np.arctan2(drift[-1], heights[-1]))
    return [f"gantry tilt: the slice positions drift {drift.max():.3f} mm across the slice planes over "
            f"{heights[-1]:.1f} mm along the normal (a tilt of {angle:.2f}°; tolerance {tolerance:.3f} mm: a tenth "
            "of a pixel, at least 0.01 mm), so the slices do not stack along their normal"]


def _gaps(steps: np.ndarray, labels: list[str]) -> list[str]:
    median = float(np.median(steps))
    found = []
    for s in np.flatnonzero(steps > GAP_FACTOR * median):
        missing = max(1, round(steps[s] / median) - 1)
        found.append(f"missing slices: {labels[s]} and {labels[s + 1]} are {steps[s]:.2f} mm apart, "
                     f"{steps[s] / median:.1f} × the usual {median:.2f} mm: about {missing} slice(s) missing")
    return found


def _uneven(heights: np.ndarray, spacing: float, labels: list[str]) -> list[str]:
    tolerance = max(Z_TOL_MM, Z_TOL_FRACTION * spacing)
    off = heights - spacing * np.arange(len(heights))
    worst = int(np.argmax(np.abs(off)))
    if abs(off[worst]) <= tolerance:
        return []
    steps = np.diff(heights)
    return [f"uneven slice spacing: distances between neighbouring slices range {steps.min():.3f} .. "
            f"{steps.max():.3f} mm; {labels[worst]} lies {off[worst]:+.3f} mm off the regular {spacing:.3f} mm grid "
            f"(tolerance {tolerance:.3f} mm: 1% of the slice distance, at least {Z_TOL_MM} mm)"]


def affine_ras(origin_lps, orientation, pixel_spacing, slice_spacing: float) -> np.ndarray:
    """4×4 affine from voxel (i = column, j = row, k = slice) to RAS+ mm: PS3.3 C.7.6.2.1.1 in LPS
    (column index along row_dir by PixelSpacing[1], row index along col_dir by PixelSpacing[0],
    slice index along the normal by ``slice_spacing``), then x and y negated for NIfTI."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * pixel_spacing[1]
    lps[:3, 1] = col * pixel_spacing[0]
    lps[:3, 2] = normal / np.linalg.norm(normal) * slice_spacing
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


def regular_heights(stack: Stack) -> np.ndarray:
    """The regular grid from the first to the last slice at the median slice distance (stretched so
    the last slice lands on it): the target of ``resample_stack``."""
    steps = np.diff(stack.heights)
    span = float(stack.heights[-1])
    count = int(round(span / float(np.median(steps)))) + 1
    return np.linspace(0.0, span, count)


def resample_stack(volume: np.ndarray, stack: Stack, pixel_spacing, fill: float) -> tuple[np.ndarray, float]:
    """``volume`` (K × rows × columns, slices in stack order) onto ``regular_heights``: each target
    slice blends its two neighbours linearly along the normal, each first shifted in-plane (bilinear)
    by its drift, so a tilted stack becomes one whose slices stack along the normal, in the first
    slice's frame (as dcm2niix corrects gantry tilt). Pixels that leave the frame take ``fill``.
    Returns the float32 volume and its slice distance (mm)."""
    from scipy import ndimage

    targets = regular_heights(stack)
    shifts = stack.offsets[:, ::-1] / np.asarray(pixel_spacing, float)  # (rows, columns) in pixels
    tilted = np.abs(shifts).max() > 1e-6
    out = np.empty((len(targets), *volume.shape[1:]), np.float32)

    def shifted(k: int) -> np.ndarray:
        if not tilted:
            return volume[k].astype(np.float32)
        return ndimage.shift(volume[k].astype(np.float32), shifts[k], order=1, mode="constant", cval=fill)

    for t, z in enumerate(targets):
        above = int(np.clip(np.searchsorted(stack.heights, z), 1, len(stack.heights) - 1))
        below = above - 1
        w = (z - stack.heights[below]) / (stack.heights[above] - stack.heights[below])
        out[t] = shifted(below) * np.float32(1 - w) + shifted(above) * np.float32(w)
    spacing = float(targets[1] - targets[0]) if len(targets) > 1 else stack.spacing
    return out, spacing
