"""Cityscapes instances beside a Cityscapes source: ``*_gtFine_instanceIds.png`` next to each label,
read as cityscapesScripts' json2instanceImg writes it (Cordts et al., 2016): a 16-bit PNG holding
labelId × 1000 + n for the n-th object (from 0) of the thing classes (person, rider, car, truck,
bus, train, motorcycle, bicycle; also caravan and trailer, which have no trainId), and the plain
labelId elsewhere, crowd ("group") regions of thing classes included. Read only where instances
are asked for (``prompts.per: instance``, instance AP).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.cityscapes_labels import LABEL_TO_TRAIN

INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"


class InstanceIdsMixin:
    """The instance side of ``CityscapesSource`` (``SliceSource``'s instance methods), from its
    ``labels``, ``stems``, ``load_label`` and ``item_id``; the last file read is kept."""

    _instances: tuple[int, np.ndarray] | None = None

    def instance_file(self, index: int) -> Path:
        return self.labels[index].parent / f"{self.stems[index]}{INSTANCE_IDS_SUFFIX}"

    def instance_problem(self) -> str | None:
        missing = [self.instance_file(i) for i in range(len(self)) if not self.instance_file(i).is_file()]
        if not missing:
            return None
        return (f"{len(missing)} of {len(self)} images have no {INSTANCE_IDS_SUFFIX} (first: {missing[0]}); put the gtFine "
                "instanceIds files of the official download beside the labelIds files (or write them from the polygons "
                "with cityscapesScripts' json2instanceImg), or use prompts.per: component")

    def consistency_problems(self) -> list[dict]:
        """Also: the first instanceIds file must agree with its labelIds file (id // 1000, or the id
        itself below 1000, is the labelId of every pixel), as json2instanceImg writes them."""
        problems = super().consistency_problems()
        for i in range(len(self)):
            label_ids = self.labels[i].parent / f"{self.stems[i]}{self.LABEL_IDS_SUFFIX}"
            if self.instance_file(i).is_file() and label_ids.is_file():
                try:
                    ids = self.instance_ids(i)
                except SamtuneError as exc:
                    return problems + [{"case": self.item_id(i), "file": str(self.instance_file(i)), "problem": str(exc)}]
                expected = cv2.imread(str(label_ids), cv2.IMREAD_UNCHANGED)
                if expected is None or expected.shape != ids.shape:  # unreadable labelIds beside a trainIds file: nothing to compare
                    break
                expected = expected.astype(np.int32)
                wrong = np.where(ids >= 1000, ids // 1000, ids) != expected
                if wrong.any():
                    y, x = np.argwhere(wrong)[0]
                    problems.append({
                        "case": self.item_id(i), "file": str(self.instance_file(i)),
                        "problem": f"disagrees with {label_ids.name} at {int(wrong.sum())} px (e.g. row {y}, column {x}: instance id "
                        f"{ids[y, x]}, labelId {expected[y, x]}); regenerate the instanceIds files with cityscapesScripts' json2instanceImg",
                    })  # fmt: skip
                break
        return problems

    def instance_ids(self, index: int) -> np.ndarray:
        if self._instances is not None and self._instances[0] == index:
            return self._instances[1]
        path = self.instance_file(index)
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise SamtuneError(f"{path}: missing or not a readable PNG; {self.instance_problem() or 're-extract it'}.")
        label_shape = self.load_label(index).shape
        if ids.ndim != 2 or ids.dtype not in (np.uint16, np.int32, np.uint8) or ids.shape != label_shape:
            raise SamtuneError(
                f"{path}: {ids.dtype} {'×'.join(map(str, ids.shape))} image; an instanceIds file is a single-channel 16-bit PNG "
                f"the size of its label ({label_shape[1]}×{label_shape[0]}). Re-extract it from the official gtFine download."
            )
        self._instances = (index, ids.astype(np.int32))
        return self._instances[1]

    def load_instances(self, index: int) -> np.ndarray:
        """Instance k (1..n) = the k-th distinct id >= 1000 of the instanceIds file; group/crowd regions
        and stuff (ids < 1000) are 0."""
        ids = self.instance_ids(index)
        values, inverse = np.unique(ids, return_inverse=True)
        number = np.cumsum(values >= 1000) * (values >= 1000)
        return number.astype(np.uint16)[inverse.reshape(ids.shape)]

    def slice_instances(self, index: int) -> dict[int, list[int]]:
        """trainId -> sizes of its instances, largest first (caravan/trailer instances: no trainId, left out)."""
        values, counts = np.unique(self.instance_ids(index), return_counts=True)
        sizes: dict[int, list[int]] = {}
        for value, count in zip(values.tolist(), counts.tolist()):
            train_id = int(LABEL_TO_TRAIN[value // 1000]) if value >= 1000 and value // 1000 < 256 else IGNORE_INDEX
            if train_id != IGNORE_INDEX:
                sizes.setdefault(train_id, []).append(int(count))
        return {c: sorted(s, reverse=True) for c, s in sorted(sizes.items())}
