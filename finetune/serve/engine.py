"""The one model a server holds, and the volumes it has open: the automatic proposal of a volume
and click corrections that start from it, with every slice's image embeddings kept, so a click
costs decoder passes, not encoder passes.

Coordinates: MONAI Label's clicks are ``[i, j, k]`` voxel indices of the file the server holds
(3D Slicer multiplies a point's RAS position by the volume's RASToIJK matrix and rounds; OHIF uses
``worldToIndex``). They are mapped to samtune's display slices (``z, row, col``) with the file's own
geometry (``samtune.datasets.nifti_geometry.voxel_to_display``), and answers are written back in the
file's voxel order on its grid, so a volume stored with permuted or flipped axes gets clicks and
labels on the right voxels.

Answers (what the Slicer module reads): ``auto`` numbers classes 1..N in the order of
``label_names``; ``clicks`` is binary, 1 = the clicked class, whatever its index in the checkpoint
(Slicer imports it into the segment the user clicked in).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samtune import SamtuneError
from samtune.finetune.serve.errors import BadRequest

OPEN_VOLUMES = 2  # volumes whose embeddings stay in memory (mobile-sam at 512 px: ~1 MB per slice)


@dataclass
class OpenVolume:
    path: Path
    source: object  # the volume as a one-case SliceSource, slices in display order
    meta: dict
    corrector: object  # samtune.finetune.corrections.VolumeCorrector
    automatic: np.ndarray | None = None  # D×H×W class indexes (K = background), display order
    seconds: dict = field(default_factory=dict)


class ServeModel:
    """A loaded checkpoint behind a lock: requests that touch the model run one at a time."""

    def __init__(self, loaded, batch_size: int | None = None):
        from samtune.finetune.predict.prediction import Predictor

        recipe = loaded.recipe
        self.predictor = Predictor(loaded, batch_size or recipe.eval.batch_size, recipe.automatic.threshold)
        self.lock = threading.Lock()
        self._volumes: OrderedDict[tuple, OpenVolume] = OrderedDict()
        section = recipe.data
        if "class_names" in type(section).model_fields:  # the checkpoint's classes, not the training folder's
            section = section.model_copy(update={"class_names": dict(zip(self.predictor.space.ids, self.predictor.space.names))})
        self.section = section

    @property
    def names(self) -> list[str]:
        return list(self.predictor.space.names)

    @property
    def label_names(self) -> dict[str, int]:
        """Class name -> value in ``auto`` answers: 1..N in the checkpoint's class order."""
        return {n: i + 1 for i, n in enumerate(self.names)}

    @property
    def automatic_mode(self) -> bool:
        return self.predictor.automatic

    def open(self, path: Path) -> OpenVolume:
        """The volume at ``path``, from the cache while the file is unchanged."""
        from samtune.datasets.formats import open_images
        from samtune.finetune.corrections import VolumeCorrector

        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key in self._volumes:
            self._volumes.move_to_end(key)
            return self._volumes[key]
        p = self.predictor
        source = open_images(self.section, [path])
        if len(source) == 0:
            raise BadRequest("image", f"{path.name}: no slices to read")
        case = source.cases[0]
        corrector = VolumeCorrector(p.model, p.family, p.transform, p.device, lambda z: source.load(z)[0], case.image.shape[0])
        volume = OpenVolume(path, source, case.meta, corrector)
        self._volumes[key] = volume
        while len(self._volumes) > OPEN_VOLUMES:
            self._volumes.popitem(last=False)
        return volume

    def automatic(self, path: Path) -> tuple[np.ndarray, dict]:
        """The ``auto`` answer: file-order uint8 labels (0 background, 1..N by ``label_names``) and timings."""
        if not self.automatic_mode:
            raise BadRequest("model", "this checkpoint has no automatic mode (trained with task: promptable); use the clicks model")
        start = time.perf_counter()
        volume = self.open(path)
        if volume.automatic is None:
            volume.automatic = volume.corrector.automatic()
        k = len(self.names)
        values = np.where(volume.automatic < k, volume.automatic + 1, 0).astype(np.uint8)
        return self._to_file(values, volume), {"infer_s": round(time.perf_counter() - start, 3), "encoded_slices": volume.corrector.encoded}

    def clicks(self, path: Path, class_name: str, foreground: list, background: list, roi: list | None) -> tuple[np.ndarray, dict]:
        """The ``clicks`` answer: a binary file-order uint8 mask of ``class_name`` after the clicks,
        starting from the volume's automatic proposal when it has one (an empty mask otherwise)."""
        if class_name not in self.names:
            raise BadRequest("params.label", f"{class_name!r} is not a class of this checkpoint; name the segment one of {self.names}")
        if not foreground and not background:
            raise BadRequest("params.foreground", "no click given: add a foreground or background point")
        start = time.perf_counter()
        volume = self.open(path)
        index = self.names.index(class_name)
        fg = [self._display(p, volume, f"params.foreground[{i}]") for i, p in enumerate(foreground)]
        bg = [self._display(p, volume, f"params.background[{i}]") for i, p in enumerate(background)]
        shape = volume.source.cases[0].image.shape
        current = volume.automatic == index if volume.automatic is not None else np.zeros(shape, bool)
        mask = volume.corrector.correct(current, index if self.automatic_mode else None, fg, bg, key=class_name)  # one cache per class
        values = self._to_file(mask.view(np.uint8), volume)  # bool and uint8 share their bytes: no copy
        if roi is not None:
            values = _crop_to_roi(values, roi)
        return values, {"infer_s": round(time.perf_counter() - start, 3), "encoded_slices": volume.corrector.encoded}

    def _display(self, ijk, volume: OpenVolume, where: str) -> tuple[int, int, int]:
        from samtune.datasets.nifti_geometry import voxel_to_display

        try:
            point = np.asarray(ijk, float)
            if point.shape != (3,):
                raise ValueError
        except (TypeError, ValueError):
            raise BadRequest(where, f"a click is [i, j, k] (voxel indices of the image file), got {ijk!r}") from None
        try:
            z, row, col = voxel_to_display(point, volume.path, volume.meta)
        except SamtuneError:  # outside the volume (its message names the server's path: not sent)
            shape = "×".join(str(n) for n in nib_shape(volume.path))
            raise BadRequest(where, f"{point.tolist()} lies outside the image ({shape} voxels; indices start at 0)") from None
        return int(round(z)), int(round(row)), int(round(col))

    def _to_file(self, display: np.ndarray, volume: OpenVolume) -> np.ndarray:
        from samtune.datasets.nifti_geometry import display_to_file_order

        return display_to_file_order(display, volume.path, volume.meta)

    def forget(self, path: Path) -> None:
        for key in [k for k in self._volumes if k[0] == str(path)]:
            del self._volumes[key]


def nib_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(nib.load(str(path)).shape[:3])


def _crop_to_roi(values: np.ndarray, roi: list) -> np.ndarray:
    """Keep the answer inside MONAI Label's ``roi`` ``[i0, i1, j0, j1, k0, k1]`` (voxel indices,
    either order per axis, both ends included)."""
    if len(roi) != 6:
        raise BadRequest("params.roi", f"[i0, i1, j0, j1, k0, k1] is 6 numbers, got {roi!r}")
    keep = np.zeros(values.shape, bool)
    bounds = []
    for axis in range(3):
        a, b = sorted(int(round(v)) for v in roi[2 * axis : 2 * axis + 2])
        bounds.append(slice(max(a, 0), min(b, values.shape[axis] - 1) + 1))
    keep[tuple(bounds)] = True
    return np.where(keep, values, 0).astype(values.dtype)
