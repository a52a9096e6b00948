"""COCO segmentations to masks through pycocotools (an optional dependency, the ``coco`` extra):
polygons, uncompressed and compressed RLE. Its own module so that the COCO data kind
(datasets/coco.py) and its demo generator (datasets/coco_demo.py) share it without importing
each other."""

from __future__ import annotations

import numpy as np

from samtune import SamtuneError


def mask_api():
    """pycocotools' ``mask`` module (an optional dependency: the ``coco`` extra)."""
    try:
        from pycocotools import mask
    except ImportError:
        raise SamtuneError("data.kind=coco needs pycocotools: pip install 'samtune[coco]' (or pip install pycocotools).") from None
    return mask


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """H×W bool mask of a COCO segmentation (polygons, uncompressed or compressed RLE), decoded as
    pycocotools' ``COCO.annToRLE`` + ``decode`` do; a malformed one raises ValueError."""
    mask = mask_api()
    if isinstance(segmentation, list):
        for poly in segmentation:
            # frPyObjects reads a 4-number list as a box, not a polygon: at least 3 (x, y) vertices
            numbers = isinstance(poly, list) and all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly)
            if not numbers or len(poly) < 6 or len(poly) % 2:
                raise ValueError(f"polygon {str(poly)[:60]} is not a flat list of at least 3 (x, y) pairs")
        if not segmentation:
            raise ValueError("an empty polygon list")
        rle = mask.merge(mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size, counts = list(segmentation["size"]), segmentation["counts"]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} but the image is [{height}, {width}] (height, width)")
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise ValueError(f"RLE counts must be non-negative integers summing to height × width = {height * width}")
            rle = mask.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"RLE counts of type {type(counts).__name__}")
    else:
        raise ValueError(f"segmentation {str(segmentation)[:60]} is neither polygons nor RLE")
    return mask.decode(rle).astype(bool)
