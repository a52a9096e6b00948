"""Label maps as files: 8-bit PNGs of class values, overlays to look at, and predicted label
volumes as NIfTI on each scan's own grid (``samtune predict``, ``eval.save_predictions``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samtune import SamtuneError
from samtune.datasets.source import LabelSpace
from samtune.files import write_atomic


def write_label_png(values: np.ndarray, path: Path) -> Path:
    """An 8-bit single-channel PNG of label values (written atomically)."""
    import cv2

    if values.max(initial=0) > 255:
        raise SamtuneError(f"{path}: label values above 255 do not fit an 8-bit PNG.")
    ok, encoded = cv2.imencode(".png", values.astype(np.uint8))
    if not ok:
        raise SamtuneError(f"{path}: PNG encoding failed.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encoded.tobytes())
    return path


# a fixed palette: class k gets colour k (tab10-like, then repeated)
_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
], np.float32)  # fmt: skip


def tint_labels(image: np.ndarray, labels: np.ndarray, space: LabelSpace, values=None) -> np.ndarray:
    """H×W(×3) uint8 image -> H×W×3 uint8 with each class's pixels tinted in its palette colour
    (50%); class k is the label value ``values[k]`` (default: the values written to files)."""
    rgb = np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image[..., :3]
    rgb = rgb.astype(np.float32)
    for k, v in enumerate(space.file_values() if values is None else values):
        mask = labels == v
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * _PALETTE[k % len(_PALETTE)]
    return rgb.round().astype(np.uint8)


def write_overlay(image: np.ndarray, values: np.ndarray, space: LabelSpace, path: Path) -> Path:
    """The image with each class's pixels tinted in its palette colour (50%)."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(tint_labels(image, values, space), cv2.COLOR_RGB2BGR))
    if not ok:
        raise SamtuneError(f"{path}: PNG encoding failed.")
    return write_atomic(path, encoded.tobytes())


def write_label_volumes(volumes: dict[str, np.ndarray], source, space: LabelSpace, folder: Path) -> list[Path]:
    """Semantic evaluation's predicted label volumes (display layout, source ids) as NIfTI files on
    each validation case's own grid (``eval.save_predictions``)."""
    from samtune.datasets.nifti_geometry import display_to_file_order, write_label_like

    written = []
    for case in source.cases:
        if case.name in volumes:
            scan = Path(case.meta["image_file"])
            written.append(write_label_like(display_to_file_order(volumes[case.name], scan, case.meta), scan, folder / f"{case.name}.nii.gz"))
    return written


def label_classes(space: LabelSpace, codes: dict | None) -> list:
    """Each class as written to files (``LabelClass``: file value, name, code): the codes stored in
    the checkpoint's classes.json, or, for checkpoints saved before samtune stored them, looked up
    by class name (``samtune.datasets.label_codes``; unknown names stay UNKNOWN, with a warning)."""
    from samtune.datasets.label_codes import LabelClass, code_from_dict, resolve_codes

    resolved = {n: code_from_dict(codes[n], n) for n in space.names} if codes else resolve_codes(space.names)
    return [LabelClass(value, name, resolved[name]) for name, value in zip(space.names, space.file_values())]


def write_viewer_tables(stem: Path, classes: list) -> list[Path]:
    """``<stem>.ctbl`` (3D Slicer colour table) and ``<stem>_itksnap.txt`` (ITK-SNAP label
    description) beside a NIfTI label, so that it opens named and coloured."""
    from samtune.datasets.label_codes import write_itksnap_labels, write_slicer_color_table

    slicer, itksnap = Path(f"{stem}.ctbl"), Path(f"{stem}_itksnap.txt")
    write_slicer_color_table(slicer, classes)
    write_itksnap_labels(itksnap, classes)
    return [slicer, itksnap]
