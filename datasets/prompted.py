"""Prompted samples for SAM from any source of 2D images with label maps.

Training: one sample = one image with ``per_image`` objects drawn from the objects it holds
(``prompts.per``: classes, connected components of classes, or annotated instances, each of at
least ``data.min_pixels``), fresh augmentation and prompt jitter on every access. Evaluation: one sample per (image, object), prompts seeded by the sample index, so every
evaluation (before and after fine-tuning, and ``samtune evaluate``) sees the same prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from samtune import SamtuneError
from samtune.datasets import sample as S
from samtune.datasets.checks import check_image_range
from samtune.datasets.prompts import PromptOptions, instance_objects, sample_box, sample_points, split_objects
from samtune.datasets.source import SliceSource

if TYPE_CHECKING:  # albumentations takes a second to import; only training builds augmentations
    import albumentations as A


class InputTransform(Protocol):
    """The model family's preprocessing (samtune.adapters.family.ModelFamily.make_transform):
    ``transform(image=H×W×3, mask=H×W)`` -> {"image": S×S×3 float32 model input, "mask": S×S}."""

    image_size: int

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]: ...
    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]: ...  # (h, w) of the image inside S×S


class PromptedDataset(Dataset):
    def __init__(
        self,
        source: SliceSource,
        transform: InputTransform,
        prompts: PromptOptions,
        min_pixels: int,
        training: bool,
        seed: int,
        classes: list[str] | None = None,
        per_image: int = 1,
        augment: A.Compose | None = None,
        max_samples: int | None = None,
    ):
        """``max_samples`` (evaluation): keep a fixed, seeded subset of at most this many samples;
        ``is_subset`` then tells that volumes are incomplete (no per-case 3D metrics)."""
        self.source = source
        self.transform = transform
        self.image_size = transform.image_size
        self.prompts = prompts
        self.min_pixels = min_pixels
        self.training = training
        self.seed = seed
        self.per_image = per_image if training else 1
        self.augment = augment if training else None
        # points are only ever used when some first prompts are points: skip sampling them otherwise
        self.n_points = (prompts.positive_points, prompts.negative_points) if prompts.box_probability < 1 else (0, 0)
        if prompts.per == "instance" and (problem := source.instance_problem()):
            raise SamtuneError(f"prompts.per=instance: {problem}.")
        wanted = set(classes) if classes else None
        self.class_names = {k: v for k, v in source.class_names.items() if wanted is None or v in wanted}
        # (source index, class id, object rank) triples: the objects big enough to prompt.
        # Evaluation in per-component / per-instance mode has one sample per object.
        self.pairs: list[tuple[int, int, int]] = []
        for index in range(len(source)):
            for class_id, count in sorted(source.slice_classes(index).items()):
                if class_id not in self.class_names or count < min_pixels:
                    continue
                if prompts.per != "class" and not training:
                    n = sum(size >= min_pixels for size in self._object_sizes(index, class_id, count))
                    self.pairs.extend((index, class_id, k) for k in range(n))
                else:
                    self.pairs.append((index, class_id, 0))
        self.is_subset = False
        if not training and max_samples is not None and len(self.pairs) > max_samples:
            keep = np.sort(np.random.default_rng(seed).permutation(len(self.pairs))[:max_samples])
            self.pairs = [self.pairs[i] for i in keep]
            self.is_subset = True
        if training:  # training samples are images; each lists the classes it can prompt
            by_image: dict[int, list[int]] = {}
            for index, class_id, _ in self.pairs:
                by_image.setdefault(index, []).append(class_id)
            self.images = sorted(by_image.items())
        self._draws = 0

    def __len__(self) -> int:
        return len(self.images) if self.training else len(self.pairs)

    @property
    def draws(self) -> int:
        """Training samples served so far (each draws fresh jitter): saved with a training state."""
        return self._draws

    def restore_draws(self, draws: int) -> None:
        """Continue the jitter sequence of a resumed run where its state was written."""
        self._draws = int(draws)

    def _object_sizes(self, index: int, class_id: int, pixels: int) -> list[int]:
        """Pixel counts of one class's objects, largest first: its annotated instances (per: instance;
        the whole class where none is annotated, as ``instance_objects``), else its connected
        components, from the source's slice index when it has one (cached NIfTI) or the label map."""
        if self.prompts.per == "instance":
            return list(self.source.slice_instances(index).get(class_id, [])) or [pixels]
        indexed = self.source.slice_components(index)
        if indexed is not None:
            return list(indexed.get(class_id, []))
        label = self.source.load(index)[1]
        return [int(o.sum()) for o in split_objects(label == class_id, "component")]

    def _rng(self, k: int) -> np.random.Generator:
        if not self.training:
            return np.random.default_rng([self.seed, k])
        self._draws += 1  # new jitter on each access; DataLoader workers differ by torch's seed
        return np.random.default_rng([self.seed, k, self._draws, torch.initial_seed() % 2**32])

    def __getitem__(self, k: int) -> dict:
        rng = self._rng(k)
        if self.training:
            index, class_ids = self.images[k]
        else:
            index, class_id, component = self.pairs[k]
        image, label = self.source.load(index)
        # annotated instances (COCO, Cityscapes) are the objects of per-instance prompting
        instances = self.source.load_instances(index) if self.prompts.per == "instance" else None
        item = self.source.item_id(index)
        check_image_range(image, item)
        original = image.shape[:2]
        if self.augment is not None:
            out = self.augment(image=image, mask=label, **({} if instances is None else {"masks": [instances]}))
            image, label = out["image"], out["mask"]
            instances = None if instances is None else out["masks"][0]
        out = self.transform(image=image, mask=label)
        resized_label = out["mask"]
        resized_instances = None if instances is None else self._resize_instances(instances)

        h, w = self.transform.resized_shape(image.shape[:2])
        smallest = self.min_pixels * h * w / (image.shape[0] * image.shape[1])  # data.min_pixels in the input frame

        def objects_of(class_id: int) -> list[np.ndarray]:
            """The class's objects in the input frame of at least data.min_pixels (the largest if none is)."""
            if resized_instances is None:
                found = split_objects(resized_label == class_id, self.prompts.per)
            else:
                found = instance_objects(resized_instances, resized_label == class_id)
            return [o for o in found if o.sum() >= smallest] or found[:1]
        objects: list[tuple[int, np.ndarray]] = []
        if self.training:
            pixels = np.bincount(resized_label.ravel(), minlength=max(class_ids) + 1)
            present = [c for c in class_ids if pixels[c]]
            if not present and self.augment is not None:  # augmentation removed every object
                return self._fallback(k)
            for class_id in rng.choice(present or class_ids, size=self.per_image):
                if present:
                    candidates = objects_of(class_id)
                    objects.append((int(class_id), candidates[rng.integers(len(candidates))]))
                else:  # every object is under a pixel after resizing
                    objects.append((int(class_id), self._scaled_box_mask(label == class_id, original)))
        else:  # the object at the original resolution, then resized as the label is (the same rank at both)
            if instances is not None:
                target = instance_objects(instances, label == class_id)[component]
            else:
                target = split_objects(label == class_id, self.prompts.per)[component]
            resized_target = self._resize_instances(target.view(np.uint8)).view(bool)
            if resized_target.any():
                objects.append((class_id, resized_target))
            else:  # smaller than one pixel after resizing: prompt with the scaled original box
                objects.append((class_id, self._scaled_box_mask(target, original)))
        boxes, points, labels = [], [], []
        resized = self.transform.resized_shape(original)
        for _, mask in objects:
            box = sample_box(mask, self.prompts.box_jitter_px, rng, self.prompts.box_jitter_frac, resized)
            p, l = sample_points(mask, box, *self.n_points, self.prompts.point_placement, rng, resized)
            boxes.append(box), points.append(p), labels.append(l)
        meta = {
            "item": item,
            "index": index,
            "class_ids": [c for c, _ in objects],
            "class_names": [self.class_names[c] for c, _ in objects],
            "original_size": original,
            "resized_size": resized,
        }
        if not self.training:
            meta["targets"] = [target]
            meta["object"] = component  # rank of the object within its class (instance, component)
            meta["ignore"] = label == self.source.ignore_index
        return {
            S.IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
            S.MASKS: torch.from_numpy(np.stack([m for _, m in objects]).astype(np.float32)),
            S.BOXES: torch.from_numpy(np.stack(boxes)),
            S.POINTS: torch.from_numpy(np.stack(points)),
            S.POINT_LABELS: torch.from_numpy(np.stack(labels)),
            S.META: meta,
        }

    def _fallback(self, k: int) -> dict:
        augment, self.augment = self.augment, None
        try:
            return self[k]
        finally:
            self.augment = augment

    def _resize_instances(self, instances: np.ndarray) -> np.ndarray:
        """H×W instance map -> S×S, as the transform resizes label maps (nearest neighbour at pixel
        centres, the resized image at the top left, zero padding)."""
        h, w = self.transform.resized_shape(instances.shape[:2])
        resized = np.zeros((self.image_size, self.image_size), instances.dtype)
        resized[:h, :w] = cv2.resize(instances, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        return resized

    def _scaled_box_mask(self, target: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        # per axis, as the transform resizes (SAM 2 stretches to a square; SAM keeps the aspect ratio)
        h, w = self.transform.resized_shape(original)
        scale_y, scale_x = h / original[0], w / original[1]
        ys, xs = np.nonzero(target)
        mask = np.zeros((self.image_size, self.image_size), bool)
        mask[int(ys.min() * scale_y) : int(ys.max() * scale_y) + 1, int(xs.min() * scale_x) : int(xs.max() * scale_x) + 1] = True
        return mask
