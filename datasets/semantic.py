"""Whole label maps for the automatic mode: one sample = one image with every class at once.

Where a prompted sample (``prompted.py``) holds one object and its prompt, a semantic sample holds
the image's full label map as class indexes of the model's ``LabelSpace``: 0..K-1 the classes,
K every other pixel (background), 255 pixels that never count (ignored labels and the padding
of the square model input). Images without any object are samples too: an automatic model must
learn to predict nothing on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from samtune.constants import IGNORE_INDEX
from samtune.datasets.checks import check_image_range
from samtune.datasets.prompted import InputTransform
from samtune.datasets.source import LabelSpace, SliceSource

if TYPE_CHECKING:  # albumentations takes a second to import; only training builds augmentations
    import albumentations as A

IMAGE = "image"
LABELS = "labels"  # B×S×S uint8 class indexes (K background, 255 not counted)
META = "meta"  # item, index, original_size, resized_size; evaluation: ``label`` (H×W source ids)


class SemanticDataset(Dataset):
    def __init__(self, source: SliceSource, transform: InputTransform, space: LabelSpace, training: bool, augment: A.Compose | None = None):
        self.source = source
        self.transform = transform
        self.image_size = transform.image_size
        self.space = space
        self.training = training
        self.augment = augment if training else None
        self.lut = space.index_lut(source.ignore_index)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, k: int) -> dict:
        image, label = self.source.load(k)
        item = self.source.item_id(k)
        check_image_range(image, item)
        original = image.shape[:2]
        meta = {"item": item, "index": k, "original_size": original, "resized_size": self.transform.resized_shape(original)}
        if not self.training:
            meta["label"] = label
        if self.augment is not None:
            out = self.augment(image=image, mask=label)
            image, label = out["image"], out["mask"]
        out = self.transform(image=image, mask=label)
        labels = self.lut[out["mask"]]
        h, w = self.transform.resized_shape(image.shape[:2])
        labels[h:, :] = IGNORE_INDEX
        labels[:, w:] = IGNORE_INDEX
        return {
            IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
            LABELS: torch.from_numpy(labels),
            META: meta,
        }


def collate_semantic(samples: list[dict]) -> dict:
    return {
        IMAGE: torch.stack([s[IMAGE] for s in samples]),
        LABELS: torch.stack([s[LABELS] for s in samples]),
        META: [s[META] for s in samples],
    }
