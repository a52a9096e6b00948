"""BDD100K semantic segmentation read as it unzips: ``images/10k/{split}/{name}.jpg`` with
``labels/sem_seg/masks/{split}/{name}.png`` (Yu et al., "BDD100K: A Diverse Driving Dataset for
Heterogeneous Multitask Learning", CVPR 2020; layout and label format from the official
documentation, https://doc.bdd100k.com/format.html, and repository, https://github.com/bdd100k/bdd100k).

Facts used here (same sources): the 10K subset has 7000 train / 1000 val / 2000 test images of
1280×720 px (JPEG); ``bdd100k_images_10k.zip`` unzips to ``bdd100k/images/10k/{train,val,test}``
and ``bdd100k_sem_seg_labels_trainval.zip`` to ``bdd100k/labels/sem_seg/{masks,colormaps,
polygons,rles}/{train,val}``. The masks are 8-bit single-channel PNGs holding the 19 Cityscapes
trainIds directly (0 road ... 18 bicycle, the Cityscapes order) and 255 for "unknown", which
training and evaluation ignore. ``data.root`` is the ``bdd100k`` folder.

Everything after finding the pairs (label checks, counts, trainId class space, loading) is the
Cityscapes code (``samtune.datasets.cityscapes.TrainIdSource``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from samtune import SamtuneError
from samtune.datasets.checks import BadCase
from samtune.datasets.cityscapes import CLASS_NAMES, CLASS_SPACE, LabelPair, TrainIdSource
from samtune.datasets.formats import DataSectionBase, DemoKeys, register_format, register_images
from samtune.datasets.source import DataSplit

IMAGES = "images/10k"  # {split}/{name}.jpg
MASKS = "labels/sem_seg/masks"  # {split}/{name}.png: trainIds 0..18, 255 unknown
LAYOUT = f"{IMAGES}/{{train,val}}/*.jpg with {MASKS}/{{train,val}}/*.png"
_TRAIN_IDS_FIX = ("BDD100K sem_seg masks hold Cityscapes trainIds 0..18 and 255 (unknown): re-extract the mask from "
                  "bdd100k_sem_seg_labels_trainval.zip (not the colormaps/ PNGs), or remove the image")  # fmt: skip


class Bdd100kSource(TrainIdSource):
    """Image/mask pairs of one split; the masks hold trainIds already."""

    def __init__(self, root: str | Path, split: str, on_bad_case: str = "error"):
        self.root = Path(root)
        image_dir, mask_dir = self.root / IMAGES / split, self.root / MASKS / split
        if not image_dir.is_dir():
            raise SamtuneError(
                f"{image_dir}: no such folder. data.root must be the BDD100K folder (`bdd100k/`) as the 10K images and "
                f"the semantic segmentation labels unzip: {LAYOUT} (split {split!r})."
            )
        found = sorted(p for p in image_dir.glob("*.jpg") if not p.name.startswith("._"))
        if not found:
            raise SamtuneError(f"{image_dir}: no *.jpg images; expected {LAYOUT}.")
        pairs: list[LabelPair | BadCase] = []
        for image in found:
            mask = mask_dir / f"{image.stem}.png"
            if mask.is_file():
                pairs.append(LabelPair(image, mask, True, image.stem))
            else:
                pairs.append(BadCase(
                    image.stem, image, f"its mask {mask} is missing",
                    f"unzip bdd100k_sem_seg_labels_trainval.zip into the same bdd100k/ folder ({LAYOUT}), or remove the image",
                ))  # fmt: skip
        super().__init__(pairs, on_bad_case, train_ids_fix=_TRAIN_IDS_FIX)


class Bdd100kData(DataSectionBase, DemoKeys):
    """``data:`` for ``kind: bdd100k``."""

    kind: Literal["bdd100k"] = Field(description="`bdd100k`: BDD100K semantic segmentation, images/10k/ + labels/sem_seg/masks/")
    train_split: str = Field("train", description="split used for training (a folder of images/10k/)")
    val_split: str = Field("val", description="split used for validation")

    def scored_subset(self) -> dict:
        return {"split": self.val_split, "class_space": CLASS_SPACE}


def _make_demo(folder: Path, seed: int) -> Path:
    from samtune.datasets.driving_demo import generate_bdd100k

    return generate_bdd100k(folder / "bdd100k", seed=seed)


@register_format(Bdd100kData, make_demo=_make_demo)
def open_bdd100k(section: Bdd100kData, *, seed: int, on_bad_case: str, progress: bool = True) -> DataSplit:
    """The official splits as they are (train/val; test has no public masks)."""
    train = Bdd100kSource(section.root, section.train_split, on_bad_case)
    val = Bdd100kSource(section.root, section.val_split, on_bad_case)
    return DataSplit(train, val, "bdd100k", train.skipped + val.skipped)


@register_images(Bdd100kData)
def open_bdd100k_images(section: Bdd100kData, paths: list):
    """images/10k JPEGs without masks (e.g. the test split): files or a split folder."""
    from samtune.datasets.folder2d import ImageFilesSource

    return ImageFilesSource(paths, CLASS_NAMES, (".jpg",), "*")
