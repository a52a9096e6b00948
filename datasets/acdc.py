"""ACDC, the Adverse Conditions Dataset with Correspondences, read as it unzips:
``rgb_anon/{condition}/{split}/{sequence}/{sequence}_frame_{n}_rgb_anon.png`` with
``gt/{condition}/{split}/{sequence}/{sequence}_frame_{n}_gt_labelIds.png`` (Sakaridis, Dai and
Van Gool, "ACDC: The Adverse Conditions Dataset with Correspondences for Semantic Driving Scene
Understanding", ICCV 2021; layout of the official download at https://acdc.vision.ee.ethz.ch,
``rgb_anon_trainvaltest.zip`` and ``gt_trainval.zip``).

Facts used here (same sources): four conditions, ``fog``, ``night``, ``rain``, ``snow``, each with
train / val / test (4006 images of 1920×1080 in all; 400 train and 100 val per condition, night 106
val); the labels use the Cityscapes labelIds and are evaluated on the 19 Cityscapes classes
(``_gt_labelTrainIds.png`` holds the same trainIds ready-made, ``_gt_labelColor.png`` colours and
``_gt_invIds.png`` the invalid-region masks, which this reader does not use); ``{split}_ref``
folders hold unlabelled normal-condition reference images and are never read as a split.

The condition is a split filter (``data.conditions`` / ``data.val_conditions``); one evaluation of
several conditions also scores each of them (``by_condition`` in metrics.json). Everything after
finding the pairs (labelId -> trainId mapping, checks, counts, loading) is the Cityscapes code
(``samtune.datasets.cityscapes.TrainIdSource``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from samtune import SamtuneError
from samtune.constants import ACDC_CONDITIONS
from samtune.datasets.checks import BadCase
from samtune.datasets.cityscapes import CLASS_NAMES, CLASS_SPACE, LabelPair, TrainIdSource
from samtune.datasets.formats import DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit

CONDITIONS = ACDC_CONDITIONS
Condition = Literal["fog", "night", "rain", "snow"]
IMAGE_SUFFIX, LABEL_SUFFIX, TRAIN_IDS_SUFFIX = "_rgb_anon.png", "_gt_labelIds.png", "_gt_labelTrainIds.png"
LAYOUT = (f"rgb_anon/{{condition}}/{{split}}/{{sequence}}/*{IMAGE_SUFFIX} with "
          f"gt/{{condition}}/{{split}}/{{sequence}}/*{LABEL_SUFFIX}")  # fmt: skip
_LABEL_IDS_FIX = "re-extract it from ACDC's gt_trainval.zip, or remove the image"
_TRAIN_IDS_FIX = f"delete the {TRAIN_IDS_SUFFIX} files (the {LABEL_SUFFIX} files are then mapped) or re-extract them from gt_trainval.zip"


class AcdcSource(TrainIdSource):
    """Image/label pairs of one split of the chosen conditions; labels as trainIds."""

    LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX = LABEL_SUFFIX, TRAIN_IDS_SUFFIX

    def __init__(self, root: str | Path, split: str, on_bad_case: str = "error", conditions: list[str] | None = None):
        self.root = Path(root)
        wanted = list(conditions or CONDITIONS)
        present = [c for c in CONDITIONS if (self.root / "rgb_anon" / c / split).is_dir()]
        if not present:
            raise SamtuneError(
                f"{self.root / 'rgb_anon'}: no condition folder holds split {split!r}. data.root must be the ACDC "
                f"folder that holds rgb_anon/ and gt/ as they unzip: {LAYOUT} (conditions: {', '.join(CONDITIONS)})."
            )
        missing = [c for c in wanted if c not in present]
        if missing and conditions:
            raise SamtuneError(f"data.conditions: {missing} have no {split!r} split in {self.root / 'rgb_anon'} (there: {', '.join(present)}).")
        found = [p for c in wanted if c in present
                 for p in sorted((self.root / "rgb_anon" / c / split).glob(f"*/*{IMAGE_SUFFIX}")) if not p.name.startswith("._")]  # fmt: skip
        if not found:
            raise SamtuneError(f"{self.root / 'rgb_anon'}: no *{IMAGE_SUFFIX} images in the sequence folders of split {split!r}; expected {LAYOUT}.")
        pairs: list[LabelPair | BadCase] = []
        for image in found:
            stem = image.name[: -len(IMAGE_SUFFIX)]
            condition, sequence = image.parents[2].name, image.parent.name
            folder = self.root / "gt" / condition / split / sequence
            label, train_ids = folder / f"{stem}{LABEL_SUFFIX}", folder / f"{stem}{TRAIN_IDS_SUFFIX}"
            chosen = train_ids if train_ids.is_file() else label
            if chosen.is_file():
                pairs.append(LabelPair(image, chosen, chosen is train_ids, stem))
            else:
                pairs.append(BadCase(stem, image, f"its label file {label} is missing",
                                     f"unzip gt_trainval.zip beside rgb_anon/ ({LAYOUT}), or remove the image"))  # fmt: skip
        super().__init__(pairs, on_bad_case, train_ids_fix=_TRAIN_IDS_FIX, label_ids_fix=_LABEL_IDS_FIX)
        self.conditions: list[str] = [image.parents[2].name for image in self.images]

    group_name = "condition"

    def group(self, index: int) -> str:
        return self.conditions[index]

    def prediction_name(self, index: int) -> str:
        """``{condition}/{sequence}/{stem}_gt_labelIds.png``, as the ground truth is named."""
        image = self.images[index]
        return f"{image.parents[2].name}/{image.parent.name}/{self.stems[index]}{LABEL_SUFFIX}"


class AcdcData(DataSectionBase, DemoKeys):
    """``data:`` for ``kind: acdc``."""

    kind: Literal["acdc"] = Field(description="`acdc`: ACDC adverse-condition driving scenes, rgb_anon/ + gt/ (Cityscapes labelIds)")
    train_split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for validation")
    conditions: Optional[list[Condition]] = Field(None, description="train only on these conditions (`fog`, `night`, `rain`, `snow`; default: all)")
    val_conditions: Optional[list[Condition]] = Field(None, description="validate only on these conditions (default: `conditions`); with several, metrics.json also holds each one's scores (`by_condition`)")

    def scored_subset(self) -> dict:
        return {"split": self.val_split, "conditions": list(self.val_conditions or self.conditions or CONDITIONS), "class_space": CLASS_SPACE}


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.driving_demo import generate_acdc

    return generate_acdc(folder / "acdc", seed=seed)


@register_format(AcdcData, make_demo=_make_demo)
def open_acdc(section: AcdcData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """The official splits as they are, filtered by condition."""
    train = AcdcSource(section.root, section.train_split, on_bad_case, section.conditions)
    val = AcdcSource(section.root, section.val_split, on_bad_case, section.val_conditions or section.conditions)
    return DataSplit(train, val, "acdc", train.skipped + val.skipped)


@register_images(AcdcData)
def open_acdc_images(section: AcdcData, paths: list):
    """rgb_anon PNGs without labels (e.g. the test split): files, a sequence folder, or a split
    folder holding sequence folders."""
    from samtune.datasets.folder2d import ImageFilesSource

    folders = [Path(p) for p in paths if Path(p).is_dir()]
    nested = any(any(c.is_dir() for c in f.iterdir()) for f in folders)
    return ImageFilesSource(paths, CLASS_NAMES, (IMAGE_SUFFIX,), "*/*" if nested else "*")
