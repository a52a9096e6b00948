"""The sample contract between datasets and the trainer, defined once.

A sample is one image with P prompted objects (P = ``prompts.per_image`` in training, 1 in
evaluation). Tensors are batched by ``collate_samples``; ``meta`` stays a list of dicts.

- ``image``:        3×S×S float32, SAM-normalised RGB, longest side resized to S, zero-padded bottom/right
- ``masks``:        P×S×S float32 binary targets, same frame (0 in the padding)
- ``boxes``:        P×4 float32 box prompts, xyxy in input pixels (the resized frame)
- ``points``:       P×N×2 float32 point prompts (x, y), input pixels; N = positive + negative points
- ``point_labels``: P×N int64, 1 positive, 0 negative, -1 padding
- ``meta``:         dict with ``item`` (image or case/slice id), ``index`` (in the source), ``class_ids`` and ``class_names`` (P each),
                    ``original_size`` (H, W), ``resized_size`` (h, w) and, for evaluation samples,
                    ``targets`` (P masks H×W bool at the original resolution, what metrics compare
                    against) and ``ignore`` (H×W bool, pixels that never count)
"""

from __future__ import annotations

import torch

IMAGE = "image"
MASKS = "masks"
BOXES = "boxes"
POINTS = "points"
POINT_LABELS = "point_labels"
META = "meta"
TENSOR_KEYS = (IMAGE, MASKS, BOXES, POINTS, POINT_LABELS)


def collate_samples(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in TENSOR_KEYS}
    batch[META] = [s[META] for s in samples]
    return batch
