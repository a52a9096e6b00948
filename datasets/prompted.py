"""One prompted sample per (image or slice, class present) pair, ready for SAM.

Training samples draw a fresh box jitter on every access; evaluation samples are seeded by their
index, so every evaluation (before and after fine-tuning, and ``samtune evaluate``) sees the same
prompts.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from samtune.datasets import sample as S
from samtune.datasets.prompts import sample_box
from samtune.datasets.transforms import check_image_range, make_sam_transform


class SliceSource(Protocol):
    """A list of 2D images with label maps (class ids; ``ignore_index`` ignored)."""

    class_names: dict[int, str]
    ignore_index: int

    def __len__(self) -> int: ...
    def item_id(self, index: int) -> str: ...
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...  # H×W×3 uint8, H×W label
    def slice_classes(self, index: int) -> dict[int, int]: ...  # class id -> pixels, without reading the image


class PromptedDataset(Dataset):
    def __init__(
        self,
        source: SliceSource,
        image_size: int,
        box_jitter_px: float,
        min_pixels: int,
        training: bool,
        seed: int,
        classes: list[str] | None = None,
    ):
        self.source = source
        self.training = training
        self.seed = seed
        self.box_jitter_px = box_jitter_px
        self.transform = make_sam_transform(image_size)
        wanted = set(classes) if classes else None
        self.class_names = {k: v for k, v in source.class_names.items() if wanted is None or v in wanted}
        # (source index, class id) pairs: the objects big enough to prompt
        self.pairs: list[tuple[int, int]] = []
        for index in range(len(source)):
            for class_id, count in sorted(source.slice_classes(index).items()):
                if class_id in self.class_names and count >= min_pixels:
                    self.pairs.append((index, class_id))
        self._draws = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _rng(self, k: int) -> np.random.Generator:
        if not self.training:
            return np.random.default_rng([self.seed, k])
        self._draws += 1  # a new jitter on each access; worker processes differ by torch's seed
        return np.random.default_rng([self.seed, k, self._draws, torch.initial_seed() % 2**32])

    def __getitem__(self, k: int) -> dict:
        index, class_id = self.pairs[k]
        image, label = self.source.load(index)
        check_image_range(image, self.source.item_id(index))
        target = label == class_id
        out = self.transform(image=image, mask=target.astype(np.uint8))
        mask = out["mask"].astype(bool)
        h, w = image.shape[:2]
        scale = self.transform.transforms[0].max_size / max(h, w)
        resized = (int(round(h * scale)), int(round(w * scale)))
        if not mask.any():  # object lost by resizing: prompt with the scaled original box instead
            ys, xs = np.nonzero(target)
            mask = np.zeros_like(mask)
            mask[int(ys.min() * scale) : int(ys.max() * scale) + 1, int(xs.min() * scale) : int(xs.max() * scale) + 1] = True
        box = sample_box(mask, self.box_jitter_px, self._rng(k))
        meta = {
            "item": self.source.item_id(index),
            "class_id": class_id,
            "class_name": self.class_names[class_id],
            "original_size": (h, w),
            "resized_size": resized,
        }
        if not self.training:
            meta["target"] = target
            meta["ignore"] = label == self.source.ignore_index
        return {
            S.IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
            S.MASK: torch.from_numpy(mask[None].astype(np.float32)),
            S.BOXES: torch.from_numpy(box[None]),
            S.META: meta,
        }
