"""One NIfTI case, read and checked, then preprocessed into the slices SAM sees.

Steps (each once per case; ``cache.py`` stores the result):
1. read image and label, checking every way they can be wrong (``checks.BadCase``);
2. reorient both to the closest canonical orientation (RAS+, as ``nibabel.as_closest_canonical``);
3. map intensities to 0-255 by a preset window (CT, HU) or the volume's percentiles (MR);
4. optionally resample in-plane to ``spacing_mm`` (image linear, labels nearest neighbour);
5. lay the volume out as Z×H×W display slices (rows anterior→posterior, columns along +x),
   and index, per slice, the classes present with pixel counts and connected-component sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from samtune.constants import IGNORE_INDEX, INTENSITY_PRESETS, MR_PERCENTILE, MR_PERCENTILES
from samtune.datasets.checks import BadCase, check_finite_image, check_label_values

_EIGHT_CONNECTED = np.ones((3, 3), bool)  # components as the prompt sampler splits them


@dataclass
class RawCase:
    """A checked case in canonical orientation: X×Y×Z arrays (RAS+), spacing in mm along x, y, z."""

    image: np.ndarray  # float32
    label: np.ndarray  # uint8
    spacing_mm: tuple[float, float, float]
    axcodes: str  # orientation as stored, e.g. "LPS"
    shape: tuple[int, int, int]
    warnings: list[str] = field(default_factory=list)
    channels: int = 1  # channels on the 4th axis of the image file (4D multi-modal: more than 1)


# nibabel and scipy are imported where they are used: this module is imported with the recipe
# schema (the NIfTI format declares its recipe section), and `samtune validate` / `recipe-keys`
# should not pay ~0.4 s for libraries that only reading a volume needs.


def _load(path: Path, case: str):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise BadCase(case, path, "the file is missing", "every image needs its label file and vice versa") from None
    except Exception as exc:  # nibabel raises several types for files that are not NIfTI
        raise BadCase(case, path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})", "re-export or re-download it") from None


def _data(img, path: Path, case: str, index: tuple = ()) -> np.ndarray:
    try:  # the voxels are only read (and decompressed) here: truncated .gz files fail now
        return np.asarray(img.dataobj[index] if index else img.dataobj)
    except Exception as exc:
        raise BadCase(
            case, path, f"the voxel data cannot be read, the file is truncated or corrupt ({type(exc).__name__}: {exc})",
            "re-export or re-download it",
        ) from None  # fmt: skip


def _squeeze_extra_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop size-1 axes after the third (NIfTI writers often store 3D as X×Y×Z×1)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def value_counts(label: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount`` of an unsigned label array, in chunks: bincount converts its input to int64,
    which for a 512×512×600 uint8 volume would be a 1.3 GB copy."""
    flat = label.reshape(-1)
    counts = np.zeros(max(minlength, int(flat.max(initial=0)) + 1), np.int64)
    step = 1 << 22
    for start in range(0, flat.size, step):
        chunk = np.bincount(flat[start : start + step], minlength=len(counts))
        counts[: len(chunk)] += chunk
    return counts


def distinct_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a bincount for small unsigned labels (np.unique sorts every voxel)."""
    if label.dtype.kind == "u" and label.size and int(label.max()) < 65536:
        return np.flatnonzero(value_counts(label))
    return np.unique(label)


def read_case(
    name: str, image_path: Path, label_path: Path | None, channel: int = 0, classes: set[int] | None = None
) -> RawCase:
    """Read, check and canonicalise one case. ``channel`` indexes the 4th axis of a 4D image.
    ``label_path`` None: a scan without labels (prediction); its label is all background."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation

    image_nii = _load(image_path, name)
    label_nii = _load(label_path, name) if label_path is not None else None
    image_shape = _squeeze_extra_axes(image_nii.shape)
    label_shape = _squeeze_extra_axes(label_nii.shape) if label_nii is not None else image_shape[:3]
    if label_nii is not None and len(label_shape) != 3:
        raise _label_dims(name, label_path, label_nii.shape, len(label_shape), len(image_shape))
    if len(image_shape) == 4:
        if not 0 <= channel < image_shape[3]:
            raise BadCase(
                name, image_path, f"data.channel={channel} but this 4D image has {image_shape[3]} channels",
                f"set data.channel to 0..{image_shape[3] - 1}",
            )  # fmt: skip
        index = (slice(None),) * 3 + (channel,) + (0,) * (len(image_nii.shape) - 4)
    elif len(image_shape) == 3:
        index = (slice(None),) * 3 + (0,) * (len(image_nii.shape) - 3)
    else:
        raise BadCase(
            name, image_path, f"the image is {len(image_shape)}D (shape {image_nii.shape}); expected a 3D volume (or 4D "
            "with channels)", "for 2D images use data.kind: folder2d (PNG/TIFF images with PNG label maps)"
            if len(image_shape) < 3 else "save one 3D volume per case (one file per channel, as nnU-Net v2)",
        )  # fmt: skip
    if label_nii is not None and image_shape[:3] != label_shape:
        raise BadCase(
            name, label_path, f"image {image_path} has shape {image_shape[:3]} but label {label_path} has shape "
            f"{label_shape}; both must be the same 3D grid", "resample the label onto the image grid (nearest neighbour)",
        )  # fmt: skip
    if label_nii is not None and not np.allclose(image_nii.affine, label_nii.affine, atol=1e-3, rtol=1e-4):
        raise BadCase(
            name, label_path, f"the affines of image {image_path} and label {label_path} differ (voxel-to-mm maps "
            f"{nib.aff2axcodes(image_nii.affine)} vs {nib.aff2axcodes(label_nii.affine)})",
            "resample the label onto the image grid (e.g. nibabel.processing.resample_from_to, order=0), or copy "
            "the image header to the label if only the header is wrong",
        )  # fmt: skip
    image = _data(image_nii, image_path, name, index if len(image_nii.shape) > 3 else ())
    if label_nii is None:
        label = np.zeros(image.shape[:3], np.uint8)
    else:
        label = _data(label_nii, label_path, name, (slice(None),) * 3 + (0,) * (len(label_nii.shape) - 3) if len(label_nii.shape) > 3 else ())
    image = image.astype(np.float32, copy=False)  # scl_slope/inter are already applied by dataobj
    check_finite_image(image, name, image_path)
    label_values = distinct_values(label)
    check_label_values(label_values, classes, IGNORE_INDEX, name, label_path)
    label = label.astype(np.uint8)
    warnings = []
    if label_nii is not None and set(label_values.tolist()) <= {0, IGNORE_INDEX}:
        warnings.append(f"case {name}: {label_path}: the label is all background (no class present)")
    # Closest canonical orientation, exactly as nibabel.as_closest_canonical reorients the array.
    ornt = io_orientation(image_nii.affine)
    zooms = np.asarray(image_nii.header.get_zooms()[:3], float)
    spacing = tuple(float(zooms[int(np.flatnonzero(ornt[:, 0] == axis)[0])]) for axis in range(3))
    image, label = apply_orientation(image, ornt), apply_orientation(label, ornt)
    axcodes = "".join(c or "?" for c in nib.aff2axcodes(image_nii.affine))
    channels = int(image_shape[3]) if len(image_shape) == 4 else 1
    return RawCase(image, label, spacing, axcodes, tuple(int(n) for n in image.shape), warnings, channels)


def _label_dims(name: str, label_path: Path, shape: tuple, ndim: int, image_ndim: int) -> BadCase:
    """The problem with a label that is not one 3D volume: a 2D slice, or channels (one-hot)."""
    if ndim < 3:
        return BadCase(
            name, label_path, f"the label is {ndim}D (shape {shape}); samtune needs one 3D label volume per case, on "
            "the same grid as its image",
            "save the segmentation of every slice of the scan as one 3D label map (integer class values)"
            if image_ndim >= 3 else "for 2D images and label maps use data.kind: folder2d",
        )  # fmt: skip
    return BadCase(
        name, label_path, f"the label is {ndim}D (shape {shape}); samtune needs one 3D label volume per case, not "
        "one channel per class (one-hot) or per time point",
        "save a single 3D integer label map (class k as value k, e.g. numpy.argmax over the channel axis)",
    )  # fmt: skip


def resolve_window(intensity, image: np.ndarray) -> tuple[float, float]:
    """[low, high] input values mapped to 0 and 255: a preset, the MR percentiles, or explicit."""
    if isinstance(intensity, str):
        if intensity == MR_PERCENTILE:
            lo, hi = (float(v) for v in np.percentile(image, MR_PERCENTILES))
            if hi <= lo:  # (nearly) constant volume: keep a valid, if degenerate, mapping
                hi = lo + 1.0
            return lo, hi
        if intensity not in INTENSITY_PRESETS:
            raise ValueError(f"unknown intensity preset {intensity!r}; choose from {sorted(INTENSITY_PRESETS) + [MR_PERCENTILE]}")
        return INTENSITY_PRESETS[intensity]
    lo, hi = (float(v) for v in intensity)
    return lo, hi


def scale_to_0_255(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """float32 values in [0, 255] (not yet rounded): clip to the window, scale linearly."""
    lo, hi = window
    out = np.clip(image, lo, hi)  # one new array, then in place: a 512×512×600 CT is 630 MB per float32 copy
    out -= lo
    out *= 255.0 / (hi - lo)
    return out


def to_display(volume_xyz: np.ndarray) -> np.ndarray:
    """Canonical X×Y×Z -> Z×H×W slices, rows anterior-to-posterior (y reversed), columns along x."""
    return np.ascontiguousarray(volume_xyz.transpose(2, 1, 0)[:, ::-1, :])


def resample_in_plane(
    image_zhw: np.ndarray, label_zhw: np.ndarray, spacing_xy_mm: tuple[float, float], target_mm: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize every slice to the target pixel spacing (x = columns, y = rows); image bilinear
    (float in, float out), labels nearest neighbour (values kept exactly)."""
    z, h, w = image_zhw.shape
    new_w = max(1, int(round(w * spacing_xy_mm[0] / target_mm[0])))
    new_h = max(1, int(round(h * spacing_xy_mm[1] / target_mm[1])))
    if (new_h, new_w) == (h, w):
        return image_zhw, label_zhw
    image = np.empty((z, new_h, new_w), np.float32)
    label = np.empty((z, new_h, new_w), label_zhw.dtype)
    for k in range(z):  # cv2 aligns pixel areas (half-pixel centres), like an image resize should
        image[k] = cv2.resize(image_zhw[k], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        label[k] = cv2.resize(label_zhw[k], (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def index_slices(label_zhw: np.ndarray) -> list[dict[str, list]]:
    """Per slice: ``{"<class id>": [pixels, [component sizes, largest first]]}`` for every class
    present (not background 0, not ignored 255); components are 8-connected."""
    from scipy import ndimage

    out = []
    for plane in label_zhw:
        counts = np.bincount(plane.ravel(), minlength=256)
        entry = {}
        for value in np.flatnonzero(counts).tolist():
            if value in (0, IGNORE_INDEX):
                continue
            components, n = ndimage.label(plane == value, structure=_EIGHT_CONNECTED)
            sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
            entry[str(value)] = [int(counts[value]), sorted((int(s) for s in sizes), reverse=True)]
        out.append(entry)
    return out


def preprocess(raw: RawCase, intensity, spacing_mm: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """RawCase -> (Z×H×W uint8 image, Z×H×W uint8 label, meta with the window, spacing, index)."""
    window = resolve_window(intensity, raw.image)
    scaled = scale_to_0_255(raw.image, window)
    label = to_display(raw.label)
    spacing = list(raw.spacing_mm)
    if spacing_mm is not None:  # resampled before rounding, in float
        image, label = resample_in_plane(to_display(scaled), label, (spacing[0], spacing[1]), spacing_mm)
        spacing[:2] = [float(spacing_mm[0]), float(spacing_mm[1])]
        image = np.rint(image, out=image).astype(np.uint8)  # rint = np.round(x): half to even
    else:  # rounded before the display layout is copied: the copy is uint8 (a 512×512×600 CT: 160 MB, not 630)
        image = to_display(np.rint(scaled, out=scaled).astype(np.uint8))
    del scaled
    voxels = value_counts(raw.label, minlength=256)
    meta = {
        "window": [float(window[0]), float(window[1])],
        "spacing_mm": spacing,  # x, y, z of the cached slices
        "original_spacing_mm": list(raw.spacing_mm),
        "original_shape": list(raw.shape),  # canonical x, y, z
        "axcodes": raw.axcodes,
        "shape_zhw": list(image.shape),
        "voxels": {str(v): int(voxels[v]) for v in np.flatnonzero(voxels).tolist() if v not in (0, IGNORE_INDEX)},
        "slices": index_slices(label),
        "warnings": list(raw.warnings),
        "channels": int(raw.channels),  # of the image file; > 1: a 4D multi-modal image, one channel used
    }
    return image, label, meta
