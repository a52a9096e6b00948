"""The sample contract between datasets and the trainer, defined once.

A sample is one dict. Tensors are batched by ``collate_samples``; ``meta`` stays a list of dicts.

- ``image``:  3×S×S float32, SAM-normalised RGB, longest side resized to S, zero-padded bottom/right
- ``mask``:   1×S×S float32 binary target for the prompted object, same frame (0 in the padding)
- ``boxes``:  1×4 float32 box prompt, xyxy in input pixels (the resized frame)
- ``meta``:   dict with ``item`` (image or case/slice id), ``class_id``, ``class_name``,
              ``original_size`` (H, W), ``resized_size`` (h, w) and, for evaluation samples,
              ``target`` (H×W bool mask at the original resolution, what metrics compare against)
"""

from __future__ import annotations

import torch

IMAGE = "image"
MASK = "mask"
BOXES = "boxes"
META = "meta"


def collate_samples(samples: list[dict]) -> dict:
    return {
        IMAGE: torch.stack([s[IMAGE] for s in samples]),
        MASK: torch.stack([s[MASK] for s in samples]),
        BOXES: torch.stack([s[BOXES] for s in samples]),
        META: [s[META] for s in samples],
    }
