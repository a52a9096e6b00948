"""DICOM studies in the studies folder: image series under ``STUDIES/dicom/`` (as PACS exports them,
any file names) served as images, and their corrected labels saved as DICOM-SEG beside them, so
``data.kind: dicom`` with ``data.root: STUDIES/dicom`` trains on them as it is.

- An image id is the series' SeriesInstanceUID (digits and dots: a plain name).
- The viewer gets the series as NIfTI: read once (``dicom_series.read_series``: slices sorted along
  the normal, geometry checked) into ``STUDIES/.samtune/dicom/{uid}.nii.gz``; clicks and labels are
  on that grid.
- A final label is written as ``STUDIES/dicom/<the series' folder>/../samtune_seg/{uid}.seg.dcm``
  (SEMIAUTOMATIC segments: a proposal a reader corrected), and kept as NIfTI in
  ``STUDIES/.samtune/labels/final/{uid}.nii.gz`` for download. A series that already has a DICOM-SEG
  from elsewhere is labelled (its SEG is the training label) and refuses a new one with 409:
  ``data.kind: dicom`` takes exactly one SEG per series.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from samtune.finetune.serve.errors import RequestError
from samtune.finetune.serve.paths import ID_PATTERN, inside, temp_in, write_atomic

RESCAN_S = 10  # a listing re-reads the DICOM headers at most this often
OUR_SEG = "samtune_seg"


class Conflict(RequestError):
    status = 409


class DicomStudies:
    def __init__(self, root: Path, meta_dir: Path):
        self.folder = Path(root) / "dicom"
        self.meta_dir = meta_dir
        self._series: dict[str, object] = {}
        self._segs: dict[str, list[Path]] = {}
        self._scanned = 0.0
        self._lock = threading.Lock()

    def scan(self, force: bool = False) -> dict[str, object]:
        """SeriesInstanceUID -> SeriesInfo of every image series (re-read at most every RESCAN_S)."""
        from samtune.datasets.dicom_series import find_series

        with self._lock:
            if not self.folder.is_dir():
                return {}
            if force or time.time() - self._scanned > RESCAN_S:
                found, skipped = find_series(self.folder)
                root = self.folder.resolve()
                self._series = {s.uid: s for s in found if ID_PATTERN.match(s.uid) and all(f.resolve().is_relative_to(root) for f in s.files)}
                self._segs = {}
                for path, uid in skipped.segmentations:
                    self._segs.setdefault(uid, []).append(path)
                self._scanned = time.time()
            return self._series

    def ids(self) -> list[str]:
        return sorted(self.scan())

    def has(self, uid: str) -> bool:
        return uid in self.scan()

    def labelled(self, uid: str) -> bool:
        self.scan()
        return bool(self._segs.get(uid))

    def image_path(self, uid: str) -> Path:
        """The series as NIfTI (converted on first use)."""
        import nibabel as nib

        from samtune.datasets.dicom_series import read_series

        target = inside(self.meta_dir, self.meta_dir / "dicom" / f"{uid}.nii.gz", "image")
        if not target.is_file():
            volume = read_series(self.scan()[uid])
            tmp = temp_in(target.parent, ".nii.gz")
            nib.save(volume.image, str(tmp))
            write_atomic(tmp, target)
        return target

    def save_seg(self, uid: str, label: np.ndarray, classes: list, checkpoint: str) -> Path:
        """The final label (the series' NIfTI grid, class values) as a DICOM-SEG beside the series."""
        from samtune import __version__
        from samtune.datasets.dicom_seg import write_seg
        from samtune.datasets.dicom_series import read_series

        info = self.scan(force=True)[uid]
        folder = Path(info.files[0]).parent.parent / OUR_SEG
        target = inside(self.folder, folder / f"{uid}.seg.dcm", "image")
        foreign = [p for p in self._segs.get(uid, []) if p.resolve() != target]
        if foreign:
            raise Conflict("image", f"series {uid} already has a DICOM-SEG ({foreign[0].name}); data.kind: dicom takes one SEG per series")
        volume = read_series(info)
        write_seg(label, volume.sources, classes, target, algorithm_version=__version__, checkpoint=checkpoint,
                  series_description="samtune serve: corrected label", algorithm_type="SEMIAUTOMATIC",
                  content_description="Model proposal corrected by a reader")  # fmt: skip
        self.scan(force=True)
        return target
