"""What every data format serves: a ``SliceSource`` (2D images or slices with label maps) and the
``DataSplit`` (train and validation sources plus what was found on the way).

Everything a caller may read is declared here with its default, so evaluation, inspection and the
trainer never probe a source with ``hasattr`` and nothing is set on a source from outside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samtune.constants import IGNORE_INDEX


@dataclass
class LabelSpace:
    """The classes an automatic model predicts, in the order of its class prompts, and how its
    label maps are written; saved with every checkpoint as ``classes.json``.

    ``ids``: the source's class ids (NIfTI label values, Cityscapes trainIds); ``background_id``:
    the source id of a pixel no class claims (0, or 255 for Cityscapes, which has no background
    class); ``file_ids`` / ``file_background``: the values written to prediction files (Cityscapes:
    labelIds, as its ground truth and official evaluator use; otherwise the ids themselves).
    """

    ids: list[int]
    names: list[str]
    background_id: int = 0
    file_ids: list[int] | None = None
    file_background: int = 0

    def to_dict(self) -> dict:
        return {"ids": self.ids, "names": self.names, "background_id": self.background_id,
                "file_ids": self.file_values(), "file_background": self.file_background}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        return cls([int(i) for i in d["ids"]], [str(n) for n in d["names"]], int(d["background_id"]),
                   [int(i) for i in d["file_ids"]], int(d["file_background"]))  # fmt: skip

    def file_values(self) -> list[int]:
        return list(self.file_ids) if self.file_ids is not None else list(self.ids)

    def index_lut(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """256 entries: source id -> class index 0..K-1, K for every other id, 255 for ignored."""
        lut = np.full(256, len(self.ids), np.uint8)
        lut[self.ids] = np.arange(len(self.ids), dtype=np.uint8)
        lut[ignore_index] = IGNORE_INDEX
        return lut

    def to_source_ids(self, index_map: np.ndarray) -> np.ndarray:
        """Class indexes (K = background) -> source ids."""
        return np.asarray([*self.ids, self.background_id], dtype=np.int64)[index_map]

    def to_file_ids(self, index_map: np.ndarray) -> np.ndarray:
        """Class indexes (K = background) -> the values a prediction file holds."""
        return np.asarray([*self.file_values(), self.file_background], dtype=np.int64)[index_map]


class SliceSource(ABC):
    """A list of 2D images with label maps (class ids; ``ignore_index`` never counts).

    Subclasses set ``class_names`` and implement ``__len__``, ``item_id`` and ``load`` (and
    ``slice_classes`` from an index where they have one); volumetric sources also set ``volumetric = True`` and implement
    ``slice_position`` and ``case_volume``. ``skipped`` lists the bad cases left out while
    building the source (``data.on_bad_case: skip``), as ``{"case", "file", "problem"}``.
    """

    class_names: dict[int, str]
    ignore_index: int = IGNORE_INDEX
    volumetric: bool = False  # slices of 3D cases: per-case 3D metrics are possible
    has_labels: bool = True  # False: images opened for prediction; every label map is background
    skipped: list[dict]
    group_name: str | None = None  # e.g. "condition" (ACDC): scores are also reported per group

    @abstractmethod
    def __len__(self) -> int: ...

    def group(self, index: int) -> str | None:
        """The group of image ``index`` (its ACDC condition) for sources with a ``group_name``."""
        return None

    @abstractmethod
    def item_id(self, index: int) -> str:
        """A readable name: the image stem, or ``case/z012`` for a slice."""

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """H×W×3 uint8 RGB (or H×W uint8 grey: CT/MR slices) and the H×W label map."""

    def slice_classes(self, index: int) -> dict[int, int]:
        """Class id -> pixels in this image (ignored pixels not counted). Formats override this
        with counts indexed when the source was built, so prompted datasets never read the image;
        this default reads the label."""
        counts = np.bincount(np.asarray(self.load(index)[1]).ravel())
        return {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c != self.ignore_index}

    def label_space(self, class_ids: list[int]) -> LabelSpace:
        """The automatic model's classes (the given ids of ``class_names``); formats whose files hold
        other values than their class ids (Cityscapes labelIds) override this."""
        return LabelSpace(list(class_ids), [self.class_names[i] for i in class_ids])

    def prediction_name(self, index: int) -> str:
        """Relative file name of a 2D prediction of image ``index`` (Cityscapes: named like its
        ground truth)."""
        return f"{self.item_id(index)}.png"

    def every_slice(self) -> "SliceSource":
        """The same cases with every slice served (semantic evaluation of whole volumes), also the
        empty ones a training source leaves out; 2D sources serve every image already."""
        return self

    def slice_components(self, index: int) -> dict[int, list[int]] | None:
        """Class id -> sizes (px) of its connected components, largest first, when the source has
        them indexed (cached NIfTI); None: the caller computes them from the label map."""
        return None

    def instance_problem(self) -> str | None:
        """None where every image has instance annotations (``prompts.per: instance`` can be used),
        else why not, with the fix."""
        return f"{type(self).__name__} has no instance annotations (data.kind cityscapes with *_gtFine_instanceIds.png, or coco, have them)"

    def load_instances(self, index: int) -> np.ndarray | None:
        """H×W uint16 instance map of image ``index`` (0: no instance; k: one annotated object, of the
        class the label map holds there) for formats that annotate instances (COCO, Cityscapes);
        None: the objects are the label map's classes or its connected components."""
        return None

    def slice_instances(self, index: int) -> dict[int, list[int]] | None:
        """Class id -> visible pixels of each of its annotated instances, largest first (formats with
        instances); None: none annotated."""
        return None

    def instance_ids(self, index: int) -> np.ndarray | None:
        """H×W int32 ground truth of the Cityscapes instance benchmark (labelId × 1000 + n for each
        object of a thing class, the labelId elsewhere), for instance AP; None for other formats."""
        return None

    def consistency_problems(self) -> list[dict]:
        """Costlier checks that only ``samtune inspect`` runs, as ``{"case", "file", "problem"}``
        records (e.g. Cityscapes trainIds files against the official mapping); none by default."""
        return []

    def slice_position(self, index: int) -> tuple[str, int]:
        """(case name, z) of a slice (volumetric sources)."""
        raise TypeError(f"{type(self).__name__} serves 2D images: it has no slice positions")

    def case_volume(self, name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Z×H×W label volume of a case and its spacing in mm along (z, y, x) (volumetric sources)."""
        raise TypeError(f"{type(self).__name__} serves 2D images: it has no volumes")


@dataclass
class DataSplit:
    """The two sides of a dataset and what was found on the way."""

    train: SliceSource
    val: SliceSource
    layout: str  # cityscapes | nnunet_v2 | msd | folders | folder2d | dicom
    skipped: list[dict] = field(default_factory=list)  # every bad case left out, once
    notes: list[str] = field(default_factory=list)  # files ignored (macOS forks, labels without image, ...)
    warnings: list[str] = field(default_factory=list)  # legal but suspicious (all-background labels, ...)
    cache_dir: Path | None = None
    channel_names: dict[int, str] = field(default_factory=dict)
    # class name -> label_codes.ClassCode, or label_codes.UNKNOWN where the data says "Unknown" (DICOM-SEG
    # segment codes, for the checkpoint's classes.json); empty for formats whose files carry no codes
    codes: dict[str, object] = field(default_factory=dict)
